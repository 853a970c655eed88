"""MAE training-step throughput for three ways to feed radiographs of many shapes, on the same synthetic images.

- ``fixed``: the study's 224x224, every image letterboxed (fit=pad: resized to fit, black margins).
- ``smart``: a few bin shapes planned from the sizes (``bucketing.plan_smart``, at most 196 patches), each
  image stretched to its closest bin; batches of a fixed token budget (bins with fewer patches get more images).
- ``smart+border``: the same batches with border-aware masking: patches outside the foreground box or pure
  black are never shown to the encoder and never scored.

Each mode times ``radstream.train.mae_step.train_step`` (forward, backward, AdamW) under Accelerate on pre-made device
batches (no loading), after one warm-up pass over its batches (compilation); the timed passes of the modes are
interleaved and the fastest pass of each counts (other load on the machine only slows a pass down). It
reports images/s, patch tokens/s, foreground ("useful") tokens/s, encoder tokens per image, the foreground
share of the visible patches (expected value: the foreground share of all patches under random masking, 100%
with border-aware masking), FLOPs per image (one eager step per batch), model FLOP utilisation on a GPU of
known peak, peak memory, and the compute saved against ``fixed``. Sync, FLOPs, peak memory and the GPU peaks
are ``radstream gpu-check``'s (``radstream.gpu.measure``, ``radstream.gpu.report``).

    python benchmarks/train_step.py                       # CPU, a small ViT
    python benchmarks/train_step.py --device cuda --model vit_base_patch16_224 --batch 256 --bf16 --compile

``--eager-vs-compiled`` instead times the demo's MAE (``configs/demo/pretrain.yaml``: smart bins, border-aware)
eager and compiled (inductor, static shapes: one graph per bin) on the same batches in one run, and prints
the ratio with dynamo's graph and graph-break counts:

    python benchmarks/train_step.py --eager-vs-compiled --batch 8 --images 64
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import TorchDynamoPlugin  # noqa: E402

from radstream.bucketing.bins import assign_bins, plan_smart  # noqa: E402
from radstream.bucketing.geometry import Bin, fit_geometry  # noqa: E402
from radstream.core.config import load_config  # noqa: E402
from radstream.gpu.measure import peak_memory_gib, prepare_for_training, reset_peak_memory, step_flops, sync  # noqa: E402
from radstream.gpu.report import peak_tflops  # noqa: E402
from radstream.train.config import OptimConfig, PretrainConfig  # noqa: E402
from radstream.train.mae import MAEConfig, background_patches, build_mae  # noqa: E402
from radstream.train.mae_step import train_step  # noqa: E402
from radstream.train.optim import param_groups  # noqa: E402
from radstream.train.steps import allow_graphs  # noqa: E402

PATCH = 16
MAX_TOKENS = 196
BORDER_THRESHOLD = 0.02
MODES = {"fixed": ("fixed", False), "smart": ("smart", False), "smart+border": ("smart", True)}
"""Mode name -> (binning, border-aware masking)."""
# Aspect ratios (height / width) of a radiograph archive: hands and long bones tall, chests square-ish,
# extremities and spine very tall, a few landscape (pelvis, skull laterals).
ASPECTS = np.array([0.75, 1.0, 1.25, 1.33, 1.5, 2.0, 2.5])
ASPECT_WEIGHTS = np.array([0.15, 0.2, 0.2, 0.15, 0.15, 0.1, 0.05])


@dataclass
class Radiograph:
    pixels: np.ndarray
    """float32 [H, W] in [0, 1]; exactly 0 outside the collimated field."""
    box: tuple[int, int, int, int]
    """Foreground (y0, x0, y1, x1), half-open."""


def synthetic_radiographs(n: int, seed: int, long_side: int = 384) -> list[Radiograph]:
    """Smooth anatomy-like fields inside a black collimation border of random width, various aspect ratios."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        aspect = rng.choice(ASPECTS, p=ASPECT_WEIGHTS) * rng.uniform(0.9, 1.1)
        h, w = (long_side, int(long_side / aspect)) if aspect >= 1 else (int(long_side * aspect), long_side)
        fh, fw = int(h * rng.uniform(0.55, 0.95)), int(w * rng.uniform(0.55, 0.95))
        y0, x0 = int(rng.integers(0, h - fh + 1)), int(rng.integers(0, w - fw + 1))
        coarse = torch.from_numpy(rng.uniform(0.2, 1.0, (1, 1, 6, 6)).astype(np.float32))
        field = F.interpolate(coarse, size=(fh, fw), mode="bicubic", align_corners=False)[0, 0].clamp(0.1, 1)
        pixels = np.zeros((h, w), np.float32)
        pixels[y0 : y0 + fh, x0 : x0 + fw] = field.numpy()
        out.append(Radiograph(pixels, (y0, x0, y0 + fh, x0 + fw)))
    return out


def fit(image: Radiograph, bin_: Bin, mode: str) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The image in its bin ([1, H, W], pad or stretch) and its foreground box in bin pixels."""
    geo = fit_geometry(*image.pixels.shape, bin_, mode)
    resized = F.interpolate(torch.from_numpy(image.pixels)[None, None], size=geo.resized, mode="bilinear",
                            antialias=True, align_corners=False)[0]  # fmt: skip
    canvas = torch.zeros(1, bin_.height, bin_.width)
    (py, px), (cy, cx, cy1, cx1) = geo.paste_offset, geo.crop_box
    canvas[:, py : py + cy1 - cy, px : px + cx1 - cx] = resized[:, cy:cy1, cx:cx1]
    return canvas.clamp(0, 1), geo.map_box(image.box)


def make_batches(images: list[Radiograph], mode: str, batch: int, device: torch.device) -> list[dict]:
    """Device batches of one bin each: fixed 224x224 letterbox, or smart bins with a token budget per batch."""
    sizes = np.array([im.pixels.shape for im in images])
    if mode == "fixed":
        bins, assigned, fit_mode = [Bin(224, 224)], np.zeros(len(images), dtype=np.int64), "pad"
    else:
        bins = plan_smart(sizes, num_bins=4, patch_size=PATCH, max_tokens=MAX_TOKENS)
        assigned, fit_mode = assign_bins(sizes, bins, patch_size=PATCH, max_tokens=MAX_TOKENS), "stretch"
    batches = []
    for b, bin_ in enumerate(bins):
        members = np.flatnonzero(assigned == b)
        per_batch = max(1, batch * MAX_TOKENS // bin_.tokens(PATCH))  # the same tokens per batch in every bin
        for start in range(0, len(members) - per_batch + 1, per_batch):  # full batches only
            fitted = [fit(images[i], bin_, fit_mode) for i in members[start : start + per_batch]]
            batches.append({
                "image": torch.stack([f[0] for f in fitted]).to(device),
                "foreground": torch.tensor([f[1] for f in fitted], device=device),
                "key": [str(i) for i in members[start : start + per_batch]],
                "valid": torch.ones(per_batch, dtype=torch.bool, device=device),
                "bin": bin_.name,
            })  # fmt: skip
    np.random.default_rng(0).shuffle(batches)  # bins interleaved, as the loader's schedule does
    return batches


@dataclass
class Mode:
    """One way of feeding the images, ready to time."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[dict]
    flops: float
    """FLOPs of one pass over ``batches`` (forward + backward)."""
    passes: list[float] = field(default_factory=list)
    """Seconds of each timed pass."""
    border_aware: bool = False
    encoder_tokens: float = 0.0
    """Encoder tokens per pass."""
    peak_mem_gb: float = 0.0
    """Peak memory over the passes (CUDA allocated; peak RSS of the process on a CPU)."""


def prepare_mode(
    accelerator: Accelerator, cfg: MAEConfig, batches: list[dict], compile_: bool = False
) -> Mode:
    """Model and optimizer for a mode (the same initial weights for all), its FLOPs (one eager step per
    batch), one warm-up pass; ``compile_``: the model compiled as a run compiles it (inductor, static shapes),
    whatever the accelerator."""
    torch.manual_seed(0)
    model = build_mae(cfg).to(accelerator.device)
    optim = OptimConfig()
    model, optimizer = prepare_for_training(accelerator, model, param_groups(model, optim.weight_decay), optim,
                                            len(batches[0]["key"]))  # fmt: skip
    flops = sum(
        step_flops(lambda b=b: train_step(accelerator, model, optimizer, [b], seed=0, step=0))
        for b in batches
    )
    if compile_:
        allow_graphs(2 * len({b["bin"] for b in batches}))
        model = torch.compile(model, backend="inductor", dynamic=False)
    mode = Mode(model, optimizer, batches, flops, border_aware=cfg.border_aware)
    time_pass(accelerator, mode)  # warm-up: compiles every shape once
    mode.passes.clear()
    return mode


def time_pass(accelerator: Accelerator, mode: Mode) -> None:
    """One timed pass of training steps over the mode's batches."""
    device = accelerator.device
    enc = torch.zeros((), device=device)
    reset_peak_memory(device)
    sync(device)
    start = time.perf_counter()
    for i, b in enumerate(mode.batches):
        stats = train_step(accelerator, mode.model, mode.optimizer, [b], seed=0, step=i)
        enc = enc + stats.encoder_tokens
    sync(device)
    mode.passes.append(time.perf_counter() - start)
    mode.encoder_tokens = float(enc)
    mode.peak_mem_gb = max(mode.peak_mem_gb, peak_memory_gib(device))


def summarize(mode: Mode, device: torch.device) -> dict:
    """Throughput of the fastest pass (other processes on the machine only ever slow a pass down)."""
    seconds = min(mode.passes)
    images = sum(len(b["key"]) for b in mode.batches)
    patches = sum(b["image"][0, 0].numel() // PATCH**2 * len(b["key"]) for b in mode.batches)
    useful = sum(int((~foreground_background(b)).sum()) for b in mode.batches)
    return {"images_per_s": images / seconds, "tokens_per_s": patches / seconds, "useful_per_s": useful / seconds,
            "encoder_tokens": mode.encoder_tokens / images, "ms_per_image": 1e3 * seconds / images,
            "visible_fg": 1.0 if mode.border_aware else useful / patches,
            "gflops_per_image": mode.flops / images / 1e9, "tflops_per_s": mode.flops / seconds / 1e12,
            "peak_mem_gb": mode.peak_mem_gb, "bins": sorted({b["bin"] for b in mode.batches})}  # fmt: skip


def foreground_background(batch: dict) -> torch.Tensor:
    """[B, L] background patches by the box and threshold rule, whatever the model's masking."""
    return background_patches(batch["image"], PATCH, BORDER_THRESHOLD, boxes=batch["foreground"])


def report(rows: dict[str, dict], peak: float | None) -> str:
    """The results table and the compute saved against ``fixed``."""
    head = ("mode", "img/s", "tok/s", "useful tok/s", "enc tok/img", "fg of visible", "GFLOP/img", "ms/img",
            "MFU", "peak GB", "bins")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        mfu = f"{100 * r['tflops_per_s'] / peak:.1f}%" if peak else "n/a"
        cells = (name, f"{r['images_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['useful_per_s']:.0f}",
                 f"{r['encoder_tokens']:.1f}", f"{r['visible_fg']:.0%}", f"{r['gflops_per_image']:.2f}",
                 f"{r['ms_per_image']:.1f}", mfu, f"{r['peak_mem_gb']:.2f}", " ".join(r["bins"]))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    base = rows["fixed"]
    for name, r in rows.items():
        if name != "fixed":
            lines.append(
                f"{name} vs fixed: encoder tokens/image {_pct(r['encoder_tokens'], base['encoder_tokens'])}, "
                f"FLOPs/image {_pct(r['gflops_per_image'], base['gflops_per_image'])}, "
                f"time/image {_pct(r['ms_per_image'], base['ms_per_image'])}, "
                f"useful tokens/s {_pct(r['useful_per_s'], base['useful_per_s'])}"
            )
    return "\n".join(lines)


def _pct(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.1f}%"


def eager_vs_compiled(args, accelerator: Accelerator) -> str:
    """The demo's MAE eager and compiled on the same smart-bin batches, timed interleaved; the table and the
    compiled / eager ratio, with dynamo's counts (graphs: one per bin; breaks: none)."""
    from torch._dynamo.utils import counters

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo" / "pretrain.yaml"
    cfg = load_config(PretrainConfig, demo, ["shards=.", "run_dir=."]).model
    images = synthetic_radiographs(args.images or 8 * args.batch, seed=0)
    batches = make_batches(images, "smart", args.batch, accelerator.device)
    counters.clear()
    start = time.perf_counter()
    modes = {"eager": prepare_mode(accelerator, cfg, batches)}
    modes["compiled"] = prepare_mode(accelerator, cfg, batches, compile_=True)
    compile_s = time.perf_counter() - start
    for _ in range(args.repeats):
        for mode in modes.values():
            time_pass(accelerator, mode)
    rows = {name: summarize(mode, accelerator.device) for name, mode in modes.items()}
    lines = ["| MAE step | images/s | ms/step | bins |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images_per_s']:.1f} | {1e3 * min(modes[name].passes) / len(batches):.1f} "
                     f"| {' '.join(r['bins'])} |")  # fmt: skip
    breaks = sum(counters["graph_break"].values())
    lines.append(
        f"compiled / eager images/s: {rows['compiled']['images_per_s'] / rows['eager']['images_per_s']:.2f}x; "
        f"{counters['stats']['unique_graphs']} graphs for {len(rows['eager']['bins'])} bins, {breaks} graph "
        f"breaks; setup and compilation {compile_s:.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="vit_small_patch16_224", help="timm ViT for the encoder")
    p.add_argument(
        "--tiny", action="store_true", help="CPU default: shrink the encoder to 192 wide, 4 blocks"
    )
    p.add_argument("--decoder-dim", type=int, default=None, help="default: 512 on cuda, 128 on cpu")
    p.add_argument("--decoder-depth", type=int, default=None, help="default: 8 on cuda, 2 on cpu")
    p.add_argument("--batch", type=int, default=16, help="images per batch in the 196-patch bins")
    p.add_argument("--images", type=int, default=None, help="synthetic images (default: 8 batches' worth)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed passes over the batches (the fastest counts)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--eager-vs-compiled", action="store_true", help="the demo's MAE eager and compiled, one run"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)"
    )
    args = p.parse_args(argv)

    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MAEConfig(encoder=args.model, decoder_dim=args.decoder_dim or (512 if cuda else 128),
                    decoder_depth=args.decoder_depth or (8 if cuda else 2), decoder_heads=16 if cuda else 4,
                    border_threshold=BORDER_THRESHOLD,
                    **({"embed_dim": 192, "depth": 4, "num_heads": 3} if args.tiny else {}))  # fmt: skip
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if args.bf16 else "no",
                              dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.compile else None)  # fmt: skip
    if args.eager_vs_compiled:
        print(
            f"device {accelerator.device}, demo MAE (configs/demo/pretrain.yaml), inductor, static shapes, batch {args.batch}, bf16 {args.bf16}"
        )
        print(eager_vs_compiled(args, accelerator))
        return 0
    images = synthetic_radiographs(args.images or 8 * args.batch, seed=0)
    modes = {}
    for name, (binning, border) in MODES.items():
        batches = make_batches(images, binning, args.batch, accelerator.device)
        modes[name] = prepare_mode(accelerator, dataclasses.replace(cfg, border_aware=border), batches)
    # passes interleaved over the modes, so drift in the machine's load hits them alike
    for _ in range(args.repeats):
        for mode in modes.values():
            time_pass(accelerator, mode)
    rows = {name: summarize(mode, accelerator.device) for name, mode in modes.items()}
    print(f"device {accelerator.device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), model {args.model}, "
          f"batch {args.batch}, bf16 {args.bf16}, compile {args.compile}, {len(images)} images")  # fmt: skip
    peak = peak_tflops(torch.cuda.get_device_name(), args.peak_tflops) if cuda else args.peak_tflops
    print(report(rows, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
