"""MAE pretraining on a shard dataset, under Accelerate.

    accelerate launch -m radstream.train.pretrain --config configs/pretrain/vit_b16_224.yaml shards=/data/irma run_dir=runs/b16

Accelerate owns devices, processes (DDP, or FSDP from the accelerate config) and precision; every rank builds
its own loader from its process index. Each epoch: train, validation loss on "val" (early stopping), a
reconstruction grid in samples/, a checkpoint. At the end, on "test", in metrics.jsonl and summary.json: the
study's one MSE (``test_mse_study``: [0, 1] pixels over the hidden patches of a uniform random 75% mask of all
patches, the same masks for every model of the dataset, ``radstream.train.mae_step.study_mse``), the run's own objective
under its own name (``test_loss``, ``objective``: the masked foreground for border-aware masking), and under
the run's own masks the MSE of every hidden patch (``test_mse``, background included) and of the scored
foreground ones (``test_mse_foreground``). The pixel MSEs are None with norm_pix_loss, whose prediction has no
pixel values without the hidden patch's own statistics.

The MAE task of ``radstream.train.trainer``, which owns the loop. Restarting the same command resumes exactly from
``checkpoints/latest`` (mid-epoch included).

It ends with all epochs, early stopping or ``run.max_steps``; stop signals, the requeue marker
(``run_dir/stopped.json``) and exit codes are ``radstream.train.entry``'s, the same for every stage.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from radstream.shards.loader import ShardLoader
from radstream.train import trainer
from radstream.train.config import PretrainConfig
from radstream.train.entry import stage_main
from radstream.train.mae import build_mae
from radstream.train.mae_step import evaluate, objective_name, study_mse, train_step
from radstream.train.run_layout import SUMMARY
from radstream.train.trainer import Session, TrainTask, Validation
from radstream.train.visualize import save_reconstruction_grid

logger = logging.getLogger(__name__)


class MAETask(TrainTask):
    """MAE pretraining as a trainer task: masked-patch loss, validation loss (early stopping), the study's
    test MSE. Its own hook: a reconstruction grid of ``run.grid_images`` validation images each epoch (only
    this task has reconstructions to show)."""

    results_name = SUMMARY

    def build_model(self):
        return build_mae(self.cfg.model)

    def step(self, s: Session, batches: list[dict]):
        cfg = self.cfg
        return train_step(s.accelerator, s.model, s.optimizer, batches, seed=cfg.run.seed, step=s.state.step,
                          grad_clip=cfg.optim.grad_clip)  # fmt: skip

    def validate(self, s: Session) -> Validation:
        keep = self.cfg.run.grid_images if s.main else 0
        result = evaluate(s.accelerator, s.model, s.val_loader, seed=self.cfg.run.seed, keep=keep)
        if s.main and result.samples:
            save_reconstruction_grid(s.run_dir / "samples" / f"epoch-{s.state.epoch:03d}.png", result.samples)
        metrics = {"loss": result.loss, "mse_masked": result.mse_masked, "mse_foreground": result.mse_foreground,
                   "images": result.images}  # fmt: skip
        return Validation("loss", result.loss, lower_is_better=True, metrics=metrics)

    def test(self, s: Session, loader: ShardLoader, reason: str, weights: str) -> tuple[dict, dict]:
        result = evaluate(s.accelerator, s.model, loader, seed=self.cfg.run.seed)
        study = study_mse(s.accelerator, s.model, loader)
        objective = objective_name(s.accelerator.unwrap_model(s.model))
        test = {
            "mse_study": study,
            "loss": result.loss,
            "mse_masked": result.mse_masked,
            "mse_foreground": result.mse_foreground,
            "images": result.images,
            "weights": weights,
        }
        summary = {
            "stopped": reason, "epochs_completed": s.state.epoch, "steps": s.state.step,
            "best_val_loss": s.early.best if s.early.best_epoch >= 0 else None, "best_epoch": s.early.best_epoch,
            "test_mse_study": study, "objective": objective, "test_loss": result.loss,
            "test_mse": result.mse_masked, "test_mse_foreground": result.mse_foreground,
            "test_images": result.images,
            "tested_weights": weights, "global_batch": s.schedule.global_batch, "peak_lr": s.schedule.peak_lr,
            "num_processes": s.accelerator.num_processes,
        }  # fmt: skip
        msg = "finished (%s) at step %d: study MSE %s, test %s %.6f (%s weights)"
        logger.info(msg, reason, s.state.step, study, objective, result.loss, weights)
        return test, summary


STAGE_CONFIG = PretrainConfig
"""The config this stage loads (``radstream.workflow`` loads it the same way to count a run's steps)."""


def run(cfg: PretrainConfig) -> int:
    """Train (or resume) the run of ``cfg`` to its end; returns the exit code (0, or 124 when stopped)."""
    return trainer.run(MAETask(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--config`` and ``key=value`` overrides, then run. Returns the exit code."""
    return stage_main(
        argv,
        prog="accelerate launch -m radstream.train.pretrain",
        description=__doc__.split("\n")[0],
        config_cls=STAGE_CONFIG,
        run=run,
        example_recipe="configs/pretrain/debug.yaml",
        example_override="optim.lr=1e-3",
    )


if __name__ == "__main__":
    sys.exit(main())
