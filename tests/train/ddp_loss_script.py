"""One optimizer step of each loss under ``accelerate launch`` (or alone) for tests/train/test_loss_ddp.py.

    accelerate launch --multi_gpu --num_processes 2 ... tests/train/ddp_loss_script.py OUT

Rank 0 holds four real samples, rank 1 only padding repeats (``valid`` False). Every rank writes
``OUT/rank-<i>.json``: the gradient of the supervised ``masked_loss`` (one SGD step at LR 1) and the MAE weights' change after one
``radstream.train.mae_step.train_step`` with SGD at LR 1 (= minus the gradient). Run as one process (no launcher) it
steps on rank 0's samples alone: the reference the two ranks must match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed


def batch(real: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(4, 1, 32, 32, generator=gen),
        "label": torch.tensor([0, 2, 1, -1]),
        "valid": torch.full((4,), real),
        "key": [f"k{i}" for i in range(4)],
    }


def supervised_grad(accelerator: Accelerator, data: dict) -> list[float]:
    from radstream.train.steps import accumulate_step
    from radstream.train.supervised import masked_loss

    set_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 3))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    accumulate_step(accelerator, model, optimizer, [data], lambda _, b: masked_loss(model(b["image"]), b, 0.0),
                    step=0, grad_clip=None)  # fmt: skip
    after = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
    return (before - after).tolist()


def mae_update(accelerator: Accelerator, data: dict) -> list[float]:
    from radstream.train.mae import MAEConfig, build_mae
    from radstream.train.mae_step import train_step

    set_seed(0)
    cfg = MAEConfig(encoder="vit_tiny_patch16_224", embed_dim=16, depth=1, num_heads=2, decoder_dim=16,
                    decoder_depth=1, decoder_heads=2, border_aware=False)  # fmt: skip
    model = build_mae(cfg)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    train_step(accelerator, model, optimizer, [data], seed=0, step=0, grad_clip=None)
    after = torch.cat([p.detach().flatten() for p in accelerator.unwrap_model(model).parameters()])
    return (after - before).tolist()


def main() -> int:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    data = batch(real=accelerator.process_index == 0)
    report = {"supervised": supervised_grad(accelerator, data), "mae": mae_update(accelerator, data)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{accelerator.process_index}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
