"""The learning-rate sweep: the study's ten rates, written once, and the one way a sweep is laid out.

The rates are read by ``optim.lr_grid=study`` (``radstream.train.supervised``, ``radstream.train.finetune``, ``radstream.train.pretrain``),
by ``radstream study``'s full protocol (``radstream.workflow``) and by the SLURM sweep
(``slurm/sweep_lr.sbatch`` runs ``python -m radstream.train.sweep``, which prints them one a line). Every rate trains
into ``run_dir/lr-<rate>`` (``radstream.train.run_layout.lr_dir``); ``radstream report`` picks the rate on validation.

Nothing here imports torch: a login node prints the rates in a blink.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from radstream.train.run_layout import lr_dir

STUDY_LR_GRID = (1e-5, 1.9e-5, 3.6e-5, 6.7e-5, 1.3e-4, 2.4e-4, 4.5e-4, 8.4e-4, 1.6e-3, 3e-3)
"""The study's ten log-spaced AdamW rates (1e-5 to 3e-3), swept for every trained model."""


def sweep_configs(cfg: Any) -> list[Any]:
    """One config per rate of ``cfg.optim.lr_grid`` (its ``run_dir/lr-<rate>``, ``optim.lr`` the rate, no
    grid), or ``[cfg]`` when it sweeps nothing."""
    rates = cfg.optim.rates()
    if rates is None:
        return [cfg]
    return [
        replace(cfg, run_dir=f"{cfg.run_dir}/{lr_dir(lr)}", optim=replace(cfg.optim, lr=lr, lr_grid=None))
        for lr in rates
    ]


def run_sweep(cfg: Any, run_one: Callable[[Any], int]) -> int:
    """``run_one`` on every config of ``sweep_configs(cfg)``, one after another; returns 0, or the first
    non-zero exit code (124 when stopped: a restart resumes the stopped rate, finished ones are skipped)."""
    for one in sweep_configs(cfg):
        code = run_one(one)
        if code != 0:
            return code
    return 0


def main() -> int:
    """``python -m radstream.train.sweep``: the study's rates, one a line (for shell scripts)."""
    print("\n".join(f"{lr:g}" for lr in STUDY_LR_GRID))
    return 0


if __name__ == "__main__":
    sys.exit(main())
