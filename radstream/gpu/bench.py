"""The measurements of ``radstream gpu-check``, one part per process: ``python -m radstream.gpu.bench PART``.

Parts: ``mae`` (``radstream.gpu.mae``: the trainer's MAE step on the ViT-B/16 recipe, eager and compiled, fixed
224 and smart bins + border-aware masking: images/s, MFU, the attention kernel, peak memory), ``resnet``
(ResNet50, channels-last, bf16), ``decode`` and ``e2e`` (``radstream.gpu.data``). Each writes its JSON result
after every row, so a part stopped at its time limit still reports what it finished. Timing, FLOPs and peak
memory: ``radstream.gpu.measure``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from radstream.gpu.measure import peak_memory_gib, reset_peak_memory, timed
from radstream.gpu.report import peak_tflops, save


def run_resnet(out: Path, quick: bool) -> None:
    """ResNet50 supervised steps (bf16 autocast, channels-last, fused AdamW) on one random batch."""
    import timm

    batch, device = (64 if quick else 256), torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model("resnet50", in_chans=1, num_classes=8).to(
        device, memory_format=torch.channels_last
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images = torch.rand(batch, 1, 224, 224, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 8, (batch,), device=device)

    def step(_: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.backends.cudnn.benchmark = True
    reset_peak_memory(device)
    steps = 5 if quick else 15
    seconds = timed(step, 3, steps, device)
    save(out, {"batch": batch, "steps": steps, "images_per_s": batch * steps / seconds,
               "peak_mem_gib": peak_memory_gib(device)})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["mae", "resnet", "decode", "e2e"])
    p.add_argument("--out", required=True, help="the part's JSON result")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--limit-s", type=float, default=600.0, help="the part's time limit (e2e stops training)")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.limit_s - 5.0
    out = Path(args.out)
    if not torch.cuda.is_available():
        save(out, {"skipped": "no CUDA device"})
        return 0
    peak = peak_tflops(torch.cuda.get_device_name(), args.peak_tflops)
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.part in ("decode", "e2e"):
        from radstream.gpu import data

        return data.run(args.part, out, args.quick, deadline)
    if args.part == "mae":
        from radstream.gpu.mae import MAE_FULL, MAE_QUICK, run_mae

        run_mae(out, MAE_QUICK if args.quick else MAE_FULL, peak)
    else:
        run_resnet(out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
