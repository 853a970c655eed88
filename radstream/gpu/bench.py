"""The measurements of ``radstream gpu-check``, one part per process: ``python -m radstream.gpu.bench PART``.

Parts: ``mae`` (``radstream.gpu.mae``: the trainer's MAE step on the ViT-B/16 recipe, eager and compiled, fixed
224 and smart bins + border-aware masking: images/s, MFU, the attention kernel, peak memory), ``resnet`` (the
supervised ResNet50 step of ``configs/supervised/resnet50.yaml``, bf16), ``decode`` and ``e2e``
(``radstream.gpu.data``). Each writes its JSON result after every row, so a part stopped at its time limit
still reports what it finished. Timing, FLOPs and peak memory: ``radstream.gpu.measure``. Both training parts
time the trainer's own step on what the trainer builds from the recipe, under the trainer's settings (no TF32
or cuDNN autotuning that a run would not have).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed

from radstream.core.config import load_config
from radstream.gpu.measure import peak_memory_gib, prepare_for_training, reset_peak_memory, timed
from radstream.gpu.report import peak_tflops, save
from radstream.train import supervised
from radstream.train.classifier import build_classifier
from radstream.train.optim import param_groups
from radstream.train.steps import build_accelerator
from radstream.train.supervised import SupervisedConfig

RESNET_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "supervised" / "resnet50.yaml"
RESNET_CLASSES = 8


@dataclass(frozen=True)
class ResnetSize:
    """How big the ResNet measurement is."""

    batch: int
    steps: int
    side: int = 224
    """Image height and width (the CPU tests make it small)."""
    overrides: tuple[str, ...] = ()
    """``key=value`` overrides of the recipe (the CPU tests shrink the network and run on the CPU)."""


RESNET_FULL = ResnetSize(batch=256, steps=15)
RESNET_QUICK = ResnetSize(batch=64, steps=5)


def run_resnet(out: Path, size: ResnetSize) -> None:
    """The supervised baseline's training step itself (``radstream.train.supervised.train_step``, as
    ``SupervisedTask.step`` calls it) on the network, parameter groups, AdamW and accelerator (bf16) the trainer
    builds from ``configs/supervised/resnet50.yaml``, on one random batch (224x224, 8 classes)."""
    cfg = load_config(SupervisedConfig, RESNET_RECIPE, ["shards=.", "run_dir=.", *size.overrides])
    accelerator = build_accelerator(cfg.run, cfg.run_dir, cfg.optim.grad_accum_steps)
    device = accelerator.device
    set_seed(cfg.run.seed)
    model = build_classifier(cfg.model, RESNET_CLASSES)
    groups = param_groups(model, cfg.optim.weight_decay)
    model, optimizer = prepare_for_training(accelerator, model, groups, cfg.optim, size.batch)
    gen = torch.Generator(device).manual_seed(0)
    batch = {"image": torch.rand(size.batch, 1, size.side, size.side, device=device, generator=gen),
             "label": torch.randint(0, RESNET_CLASSES, (size.batch,), device=device, generator=gen),
             "valid": torch.ones(size.batch, dtype=torch.bool, device=device),
             "key": [str(i) for i in range(size.batch)]}  # fmt: skip

    def step(i: int) -> None:
        supervised.train_step(accelerator, model, optimizer, [batch], step=i, optim=cfg.optim,
                              drop_padding=not cfg.run.compile)  # fmt: skip

    reset_peak_memory(device)
    seconds = timed(step, 3, size.steps, device)
    save(out, {"model": f"{cfg.model.arch}, {cfg.run.mixed_precision}", "batch": size.batch, "steps": size.steps,
               "images_per_s": size.batch * size.steps / seconds, "peak_mem_gib": peak_memory_gib(device)})  # fmt: skip


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
    if args.part in ("decode", "e2e"):
        from radstream.gpu import data

        return data.run(args.part, out, args.quick, deadline)
    if args.part == "mae":
        from radstream.gpu.mae import MAE_FULL, MAE_QUICK, run_mae

        run_mae(out, MAE_QUICK if args.quick else MAE_FULL, peak)
    else:
        run_resnet(out, RESNET_QUICK if args.quick else RESNET_FULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
