"""MAE pretraining on a shard dataset, under Accelerate.

    accelerate launch -m train.pretrain --config configs/pretrain/vit_b16_224.yaml shards=/data/irma run_dir=runs/b16

Accelerate owns devices, processes (DDP, or FSDP from the accelerate config) and precision; every rank builds
its own loader from its process index. Each epoch: train, validation loss on "val" (early stopping), a
reconstruction grid in samples/, a checkpoint. At the end: test loss and the study's test MSE (masked
patches, [0, 1] pixel space) on "test", in metrics.jsonl and summary.json.

Restarting the same command resumes exactly from ``checkpoints/latest`` (mid-epoch included).

Exit codes: 0 finished (all epochs, early stopping or ``run.max_steps``), 1 non-finite loss, 2 bad config,
124 stopped by SIGTERM/SIGUSR1 after finishing the current step and writing a checkpoint (the SLURM script
requeues the job on 124; every rank agrees on the signal, so none hangs). ``accelerate launch`` (torchrun)
itself exits 1 when its workers exit 124, so a stop also leaves ``run_dir/stopped.json`` for job scripts.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from core.atomic import write_json
from core.config import to_dict, to_yaml
from shards.loader import ShardLoader, build_loader
from train.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint, save_weights
from train.config import PretrainConfig
from train.loop import (
    EXIT_OK,
    EXIT_REQUEUE,
    EarlyStopping,
    LoopState,
    Meter,
    Schedule,
    StopSignal,
    agree_after_step,
    build_accelerator,
    build_optimizer,
    clear_stopped,
    evaluate,
    lr_at,
    make_schedule,
    mark_stopped,
    set_lr,
    stage_main,
    train_step,
    training_over,
)
from train.mae import build_mae
from train.visualize import save_reconstruction_grid

logger = logging.getLogger(__name__)

BEST_DIR = "best"
"""run_dir/best/model.safetensors: the weights of the best validation epoch (MAE state dict)."""


@dataclass
class Session:
    """Everything one run holds, passed between the loop's functions."""

    cfg: PretrainConfig
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: ShardLoader
    val_loader: ShardLoader
    schedule: Schedule
    state: LoopState
    early: EarlyStopping
    stop: StopSignal
    run_dir: Path
    config_yaml: str
    last_saved: int = -1

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--config`` and ``key=value`` overrides, then run. Returns the exit code."""
    return stage_main(
        argv,
        prog="accelerate launch -m train.pretrain",
        description=__doc__.split("\n")[0],
        config_cls=PretrainConfig,
        run=run,
        example_recipe="configs/pretrain/debug.yaml",
        example_override="optim.base_lr=1e-3",
    )


def run(cfg: PretrainConfig) -> int:
    """Train (or resume) the run of ``cfg`` to its end; returns the exit code (0, or 124 when stopped)."""
    accelerator = build_accelerator(cfg.run, cfg.run_dir, cfg.optim.grad_accum_steps)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    with StopSignal() as stop:
        session = _setup(cfg, accelerator, stop)
        try:
            if _already_done(session):
                logger.info(
                    "%s is finished (summary.json at step %d); nothing to do", cfg.run_dir, session.state.step
                )
                return EXIT_OK
            reason = _train(session)
            if reason == "signal":
                mark_stopped(accelerator, stop, cfg.run_dir, session.state.step)
                return EXIT_REQUEUE
            _finish(session, reason)
            return EXIT_OK
        finally:
            accelerator.end_training()
            for loader in (session.train_loader, session.val_loader):
                loader.close()


def _setup(cfg: PretrainConfig, accelerator: Accelerator, stop: StopSignal) -> Session:
    """Build model, optimizer and loaders; resume from the latest checkpoint when there is one."""
    run_dir = Path(cfg.run_dir)
    set_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_mae(cfg.model)
    loaders = [_loader(cfg, accelerator, split, train=split == "train") for split in ("train", "val")]
    schedule = make_schedule(
        cfg.optim, cfg.run.epochs, cfg.loader.batch_size, len(loaders[0]), accelerator.num_processes
    )
    optimizer = build_optimizer(model, cfg.optim, schedule.peak_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    early = EarlyStopping(cfg.run.patience, cfg.run.min_delta)
    config_yaml = to_yaml(cfg)
    s = Session(
        cfg, accelerator, model, optimizer, *loaders, schedule, LoopState(), early, stop, run_dir, config_yaml
    )
    _resume(s)
    if s.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_yaml)
    clear_stopped(accelerator, run_dir)
    if cfg.run.tensorboard:
        accelerator.init_trackers("tensorboard", config=_flat_hparams(to_dict(cfg)))
    logger.info(
        "global batch %d, peak lr %.3g, %d steps/epoch, %d steps, warmup %d, %d process(es), %s",
        schedule.global_batch, schedule.peak_lr, schedule.steps_per_epoch, schedule.total_steps,
        schedule.warmup_steps, accelerator.num_processes, accelerator.device,
    )  # fmt: skip
    return s


def _loader(cfg: PretrainConfig, accelerator: Accelerator, split: str, train: bool) -> ShardLoader:
    """This rank's loader of ``split`` (never passed through accelerator.prepare)."""
    return build_loader(
        cfg.loader, cfg.shards, split, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, device=accelerator.device, train=train,
    )  # fmt: skip


def _resume(s: Session) -> None:
    """Restore model, optimizer, scaler, RNGs, loop, loader and early stopping from ``latest``, if any."""
    path = latest_checkpoint(s.run_dir)
    if path is None:
        return
    saved = load_checkpoint(s.accelerator, path)
    s.state = LoopState(**saved["loop"])
    s.early.load_state_dict(saved["early_stopping"])
    if s.state.epoch_step:  # mid-epoch: the loader must skip what was trained (same world size and batches)
        s.train_loader.load_state_dict(saved["loader"])
    s.last_saved = s.state.step
    old_config = (path / "config.yaml").read_text()
    if old_config != s.config_yaml:
        logger.warning("resuming with a config that differs from the checkpoint's (%s/config.yaml)", path)
    logger.info("resumed from %s: epoch %d, step %d", path, s.state.epoch, s.state.step)


def _train(s: Session) -> str:
    """Epochs until the end; returns why training stopped: done | early_stop | max_steps | signal."""
    while True:
        reason = training_over(s.cfg.run, s.state, s.early)
        if reason is not None:
            return reason
        reason = _train_epoch(s)
        if reason is not None:
            return reason
        _end_epoch(s)
        stop = agree_after_step(s.accelerator, s.stop.requested)
        if stop:
            return "signal"


def _already_done(s: Session) -> bool:
    """Whether the run ended before (a restart of a finished job): its summary is of the current step."""
    path = s.run_dir / "summary.json"
    over = training_over(s.cfg.run, s.state, s.early) is not None
    return over and path.is_file() and json.loads(path.read_text())["steps"] == s.state.step


def _train_epoch(s: Session) -> str | None:
    """The rest of the current epoch; returns max_steps or signal when stopping inside it."""
    cfg, acc, st = s.cfg, s.accelerator, s.state
    s.train_loader.set_epoch(st.epoch)  # no-op for a loader restored mid-epoch
    meter, accum = Meter(), cfg.optim.grad_accum_steps
    bar = tqdm(
        total=s.schedule.steps_per_epoch, initial=st.epoch_step, desc=f"epoch {st.epoch}", disable=not s.main
    )
    batches = iter(s.train_loader)
    try:
        while st.epoch_step < s.schedule.steps_per_epoch:
            start = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            waited = time.perf_counter() - start
            lr = lr_at(st.step, peak_lr=s.schedule.peak_lr, min_lr=cfg.optim.min_lr,
                       warmup_steps=s.schedule.warmup_steps, total_steps=s.schedule.total_steps)  # fmt: skip
            set_lr(s.optimizer, lr)
            stats = train_step(acc, s.model, s.optimizer, micro, seed=cfg.run.seed, step=st.step,
                               grad_clip=cfg.optim.grad_clip)  # fmt: skip
            stop = agree_after_step(acc, s.stop.requested, stats=stats, step=st.step)
            st.step, st.epoch_step = st.step + 1, st.epoch_step + 1
            meter.add(stats, waited, time.perf_counter() - start)
            bar.update()
            if st.step % cfg.run.log_every == 0:
                metrics = {"lr": lr, **meter.read(acc)}
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                _log(s, "train", metrics)
            if stop:
                _checkpoint(s)
                return "signal"
            if cfg.run.max_steps is not None and st.step >= cfg.run.max_steps:
                _checkpoint(s)
                return "max_steps"
            every = cfg.checkpoint.every_steps
            if every and st.step % every == 0 and st.epoch_step < s.schedule.steps_per_epoch:
                _checkpoint(s)
    finally:
        batches.close()
        bar.close()
    return None


def _end_epoch(s: Session) -> None:
    """Validation loss, early stopping, best weights, reconstruction grid, then the epoch's checkpoint."""
    cfg, st = s.cfg, s.state
    keep = cfg.run.grid_images if s.main else 0
    result = evaluate(s.accelerator, s.model, s.val_loader, seed=cfg.run.seed, keep=keep)
    improved = s.early.update(result.loss, st.epoch)
    if improved:
        _save_best(s)
    _log(s, "val", {"loss": result.loss, "pixel_mse": result.pixel_mse, "images": result.images,
                    "best_loss": s.early.best, "bad_epochs": s.early.bad_epochs})  # fmt: skip
    if s.main and result.samples:
        save_reconstruction_grid(s.run_dir / "samples" / f"epoch-{st.epoch:03d}.png", result.samples)
    st.epoch, st.epoch_step = st.epoch + 1, 0
    s.train_loader.set_epoch(st.epoch)
    _checkpoint(s)


def _save_best(s: Session) -> None:
    """The weights of the best validation epoch to run_dir/best. Every rank must call it."""
    meta = {"epoch": s.state.epoch, "step": s.state.step, "val_loss": s.early.best}
    save_weights(s.accelerator, s.model, s.run_dir / BEST_DIR, meta)


def _checkpoint(s: Session) -> None:
    """A checkpoint of the current state (skipped when this step was already saved)."""
    if s.last_saved == s.state.step:
        return
    loop_state = {
        "loop": asdict(s.state),
        "loader": s.train_loader.state_dict(),
        "early_stopping": s.early.state_dict(),
        "schedule": asdict(s.schedule),
    }
    save_checkpoint(
        s.accelerator, s.run_dir, s.state.step, loop_state, s.config_yaml, s.cfg.checkpoint.keep_last
    )
    s.last_saved = s.state.step


def _finish(s: Session, reason: str) -> None:
    """Final checkpoint, test loss and pixel MSE (best weights by default), summary.json."""
    _checkpoint(s)
    best = s.cfg.run.test_on_best and load_weights(s.accelerator, s.model, s.run_dir / BEST_DIR)
    weights = "best" if best else "last"
    test_loader = _loader(s.cfg, s.accelerator, "test", train=False)
    try:
        result = evaluate(s.accelerator, s.model, test_loader, seed=s.cfg.run.seed)
    finally:
        test_loader.close()
    test = {"loss": result.loss, "pixel_mse": result.pixel_mse, "images": result.images, "weights": weights}
    _log(s, "test", test)
    summary = {
        "stopped": reason, "epochs_completed": s.state.epoch, "steps": s.state.step,
        "best_val_loss": s.early.best if s.early.best_epoch >= 0 else None, "best_epoch": s.early.best_epoch,
        "test_loss": result.loss, "test_mse": result.pixel_mse, "test_images": result.images,
        "tested_weights": weights, "global_batch": s.schedule.global_batch, "peak_lr": s.schedule.peak_lr,
        "num_processes": s.accelerator.num_processes,
    }  # fmt: skip
    if s.main:
        write_json(s.run_dir / "summary.json", summary)
    msg = "finished (%s) at step %d: test MSE %.6f (%s weights)"
    logger.info(msg, reason, s.state.step, result.pixel_mse, weights)


def _log(s: Session, split: str, metrics: dict) -> None:
    """One line of metrics.jsonl and TensorBoard scalars (main process)."""
    if not s.main:
        return
    line = {"split": split, "epoch": s.state.epoch, "step": s.state.step, **metrics, "time": time.time()}
    with open(s.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    scalars = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    s.accelerator.log(scalars, step=s.state.step)


def _flat_hparams(tree: dict, prefix: str = "") -> dict:
    """A nested config as flat TensorBoard hyperparameters (lists and None as strings)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_hparams(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


if __name__ == "__main__":
    sys.exit(main())
