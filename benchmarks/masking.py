"""Border-aware masking at every image's own ratio: three ways to run the encoder on visible sets of different
sizes, timed on the same batches (encoder forward + backward; the decoder sees all L tokens in every way).

- ``per-batch``: before issue 11, one ``len_keep = min(int(F_max * (1 - r)), F_min)`` per batch, no mask.
  Fast but wrong: one near-empty image makes every image of its batch keep almost nothing.
- ``padded``: each image keeps ``int(F_i * (1 - r))``; rows padded to the widest and a key-padding mask in
  ``scaled_dot_product_attention`` (what ``radstream.train.mae`` does).
- ``packed``: the same visible sets packed into one sequence with a block-diagonal (document) mask; dense here
  (FlexAttention's block-sparse kernel needs ``torch.compile`` and pays off on a GPU).

Two batch sets: the synthetic radiographs of ``benchmarks/train_step.py`` in smart bins, and the same with one
near-empty image per batch (a random crop that missed the body). Each (batch, variant) is timed ``--repeats``
times, interleaved, and the fastest counts. Reports ms per batch, the ratio to ``padded``, and encoder tokens
per image (real and padded slots).

    python benchmarks/masking.py                 # CPU, 192-wide 4-block encoder
    python benchmarks/masking.py --device cuda --model vit_base_patch16_224 --full
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts  # noqa: E402

from radstream.train.mae import MAEConfig, build_mae  # noqa: E402
from radstream.train.masking import attention_mask, random_masking, visible_counts  # noqa: E402

VARIANTS = ("per-batch", "padded", "packed")


def keep_bias_of(batch: dict) -> torch.Tensor:
    background = ts.foreground_background(batch)
    return torch.zeros(background.shape, device=background.device).masked_fill(background, math.inf)


def run_encoder(model, imgs: torch.Tensor, keep_bias: torch.Tensor, noise: torch.Tensor, variant: str):
    """Encoder tokens of ``variant``; returns (output, real tokens per image, token slots per image)."""
    x, cls = model._embed_patches(imgs)
    if variant == "per-batch":
        keepable = torch.isfinite(keep_bias).sum(dim=1)
        len_keep = max(1, min(int(int(keepable.max()) * (1 - model.cfg.mask_ratio)), int(keepable.min())))
        ids = torch.argsort(noise + keep_bias, dim=1)[:, :len_keep]
        visible = torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))
        return model._encode(visible, cls), len_keep + 1, len_keep + 1
    visible, mask, _ = random_masking(x, model.cfg.mask_ratio, noise=noise, keep_bias=keep_bias)
    counts = visible_counts(mask)
    real = float(counts.float().mean()) + 1
    if variant == "padded":
        out = model._encode(visible, cls, attention_mask(counts, visible.shape[1]))
        return out, real, visible.shape[1] + 1
    rows = [torch.cat([cls[i], visible[i, : int(k)]]) for i, k in enumerate(counts)]  # [1+K_i, D] each
    packed = torch.cat(rows)[None]  # [1, T, D]
    doc = torch.repeat_interleave(torch.arange(len(rows), device=imgs.device), counts + 1)
    same_image = doc[:, None] == doc[None]  # [T, T] block-diagonal, True = attend
    enc = model.encoder
    h = enc.norm_pre(packed)
    for block in enc.blocks:
        h = block(h, attn_mask=same_image[None, None])
    return enc.norm(h), real, len(doc) / len(rows)


def time_variants(model, batches: list[dict], repeats: int) -> dict[str, tuple[float, float, float]]:
    """Per variant: ms per batch (each (batch, variant) timed ``repeats`` times, interleaved, its fastest
    counted: load on a shared machine only slows a run down), mean real tokens and slots per image."""
    best = {(b, v): math.inf for b in range(len(batches)) for v in VARIANTS}
    tokens: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for r in range(repeats + 1):  # the first pass warms up
        for b, batch in enumerate(batches):
            imgs = batch["image"]
            noise = torch.rand(imgs.shape[0], imgs.shape[-2] * imgs.shape[-1] // ts.PATCH**2,
                               generator=torch.Generator().manual_seed(b)).to(imgs.device)  # fmt: skip
            for v in VARIANTS:
                start = time.perf_counter()
                out, n_real, n_slots = run_encoder(model, imgs, keep_bias_of(batch), noise, v)
                out.float().pow(2).mean().backward()
                model.zero_grad(set_to_none=True)
                ts.sync(imgs.device)
                if r:
                    best[b, v] = min(best[b, v], time.perf_counter() - start)
                else:
                    tokens[v].append((n_real, n_slots))
    return {
        v: (1e3 * sum(best[b, v] for b in range(len(batches))) / len(batches),
            sum(t[0] for t in tokens[v]) / len(batches), sum(t[1] for t in tokens[v]) / len(batches))
        for v in VARIANTS
    }  # fmt: skip


def with_near_empty(batches: list[dict]) -> list[dict]:
    """The same batches, the first image of each reduced to a sliver of foreground (two patch columns)."""
    out = []
    for batch in batches:
        image, box = batch["image"].clone(), batch["foreground"].clone()
        y0, x0, y1, _ = box[0].tolist()
        image[0, :, :, x0 + 2 * ts.PATCH :] = 0
        box[0] = torch.tensor([y0, x0, y1, x0 + 2 * ts.PATCH])
        out.append({**batch, "image": image, "foreground": box})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--full", action="store_true", help="the model's own width and depth (default: 192 x 4)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    tiny = {} if args.full else {"embed_dim": 192, "depth": 4, "num_heads": 3}
    model = build_mae(MAEConfig(encoder=args.model, decoder_depth=1, border_aware=True, **tiny)).to(device)
    batches = ts.make_batches(ts.synthetic_radiographs(args.images, seed=0), "smart", args.batch, device)
    print(
        f"device {device}, model {args.model} {tiny or 'full'}, {len(batches)} batches of up to {args.batch}"
    )
    print("| batches | variant | ms/batch | vs padded | enc tokens/img | enc slots/img |")
    print("|---|---|---|---|---|---|")
    for name, group in (("smart bins", batches), ("+1 near-empty", with_near_empty(batches))):
        rows = time_variants(model, group, args.repeats)
        for v, (ms, real, slots) in rows.items():
            print(f"| {name} | {v} | {ms:.1f} | {ms / rows['padded'][0]:.2f} | {real:.1f} | {slots:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
