"""The one trainer: session, resume, cadence, logging, trackers, early stopping, stop signals, checkpoints and
the results file, for every training task.

A task (``radstream.train.pretrain``'s MAE, ``radstream.train.supervised``'s classifier, ``radstream.train.finetune``'s encoder with a head)
is a small ``TrainTask``: it builds its model and parameter groups, runs one optimizer step, validates and
tests; its config is a ``radstream.train.config.BaseRunConfig`` with an ``OptimConfig``, from which the trainer derives
the LR schedule the same way for every task. The trainer does the rest, the same way for all:

- setup: seed, model, the train/val loaders of this rank, schedule, AdamW, ``accelerator.prepare``; the resolved
  config in ``run_dir/config.yaml``; TensorBoard when ``run.tensorboard``.
- resume: from ``checkpoints/latest`` (model, optimizer, RNGs, loop, loader position mid-epoch, early
  stopping), warning when the config differs from the checkpoint's; a finished run (its results file is of
  the current step) is not trained again.
- each epoch: steps of ``grad_accum_steps`` micro-batches, a ``metrics.jsonl`` line every ``run.log_every``
  steps, a checkpoint every ``checkpoint.every_steps``; at the end (every ``run.val_every_steps``) validation,
  early stopping on the task's score, the best weights to ``run_dir/best``, a checkpoint (``keep_last`` kept).
- stops: ``run.max_steps``, early stopping, or SIGTERM/SIGUSR1 (every rank finishes its step, a checkpoint,
  ``stopped.json``, exit 124); a non-finite loss raises ``NonFiniteLossError`` without a checkpoint.
- finish: test with the best weights (``run.test_on_best``), the task's results file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from radstream.core.atomic import write_json, write_text
from radstream.core.config import flat_hparams, to_dict, to_yaml
from radstream.core.progress import progress
from radstream.shards.loader import ShardLoader, build_loader
from radstream.train.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights
from radstream.train.entry import EXIT_OK, EXIT_REQUEUE, StopSignal, clear_stopped, mark_stopped
from radstream.train.optim import (
    Schedule,
    build_optimizer,
    make_schedule,
    optimizer_steps,
    param_groups,
    set_lr,
)
from radstream.train.run_layout import CONFIG, METRICS, RESULTS, best_dir, latest_checkpoint
from radstream.train.steps import (
    EarlyStopping,
    LoopState,
    Meter,
    StepStats,
    agree_after_step,
    allow_graphs,
    build_accelerator,
    epochs_for,
    training_over,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Validation:
    """A task's validation of one epoch."""

    name: str
    """What ``value`` is ("loss", "acc"): the log has ``best_<name>``, the best weights' meta ``val_<name>``."""
    value: float
    lower_is_better: bool
    """Early stopping and the best weights follow ``value`` down (a loss) or up (an accuracy)."""
    metrics: dict
    """The "val" line of metrics.jsonl (best value and bad epochs are added)."""


class TrainTask:
    """What one kind of training supplies to the trainer; subclass it and override the hooks.

    Its config is a ``radstream.train.config.BaseRunConfig`` (``shards``, ``run_dir``, ``loader``, ``run``,
    ``checkpoint``) with an ``optim`` that is a ``radstream.train.config.OptimConfig``.
    """

    results_name = RESULTS
    """The file in run_dir the task's ``test`` results go to; its "steps" marks the run finished."""
    mean_batch_size: float = 0.0
    """Images per device batch averaged over an epoch (the train loader's), set by the trainer before
    ``schedule``: the schedule's position in images."""
    mean_step_tokens: float = 0.0
    """Real patches per device batch averaged over an epoch, padding excluded, set by the trainer before
    ``schedule``: the MAE's LR scaling (``radstream.train.optim.make_schedule``)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def build_model(self) -> torch.nn.Module:
        """The task's model, on the CPU, under the run's seed."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """AdamW parameter groups (default: no weight decay on norms, biases and tokens)."""
        return param_groups(model, self.cfg.optim.weight_decay)

    def schedule(self, loader_batches: int, num_processes: int) -> Schedule:
        """Step counts and learning rates from the train loader's batches per epoch and the world size (every
        task: ``radstream.train.optim.make_schedule`` of its ``optim``)."""
        cfg = self.cfg
        return make_schedule(cfg.optim, cfg.run.epochs, self.mean_batch_size, loader_batches, num_processes,
                             self.mean_step_tokens)  # fmt: skip

    def step(self, s: Session, batches: list[dict]) -> StepStats:
        """One optimizer step over ``batches`` (``grad_accum_steps`` micro-batches) at ``s.state.step``."""
        raise NotImplementedError

    def validate(self, s: Session) -> Validation:
        """Score the model on ``s.val_loader`` (every rank calls it) at the end of epoch ``s.state.epoch``."""
        raise NotImplementedError

    def test(self, s: Session, loader: ShardLoader, reason: str, weights: str) -> tuple[dict, dict]:
        """Score the test split with the ``weights`` ("best" or "last") loaded; returns (the "test" line of
        metrics.jsonl, the results file's content)."""
        raise NotImplementedError


@dataclass
class Session:
    """Everything one run holds, passed between the trainer's functions and to the task's hooks."""

    task: TrainTask
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: ShardLoader
    val_loader: ShardLoader
    schedule: Schedule
    early: EarlyStopping
    stop: StopSignal
    config_yaml: str
    state: LoopState
    last_saved: int = -1

    @property
    def cfg(self):
        """The task's config."""
        return self.task.cfg

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def loader(self, split: str) -> ShardLoader:
        """This rank's loader of ``split`` (never passed through accelerator.prepare)."""
        return _loader(self.cfg, self.accelerator, split)

    def log(self, split: str, metrics: dict) -> None:
        """One line of metrics.jsonl and TensorBoard scalars (main process)."""
        if not self.main:
            return
        line = {
            "split": split,
            "epoch": self.state.epoch,
            "step": self.state.step,
            **metrics,
            "time": time.time(),
        }
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(line) + "\n")
        scalars = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=self.state.step)


def run(task: TrainTask) -> int:
    """Train (or resume) the run of ``task.cfg`` to its end; returns the exit code (0, or 124 when stopped)."""
    cfg = task.cfg
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    accelerator = build_accelerator(cfg.run, cfg.run_dir, cfg.optim.grad_accum_steps)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one log, from the main process
    with StopSignal() as stop:
        s = _setup(task, accelerator, stop)
        try:
            if _already_done(s):
                logger.info("%s is finished (%s at step %d); nothing to do", s.run_dir, task.results_name,
                            s.state.step)  # fmt: skip
                return EXIT_OK
            reason = _train(s)
            if reason == "signal":
                mark_stopped(accelerator, stop, cfg.run_dir, s.state.step)  # job scripts requeue on it
                return EXIT_REQUEUE
            _finish(s, reason)
            return EXIT_OK
        finally:
            accelerator.end_training()
            s.train_loader.close()
            s.val_loader.close()


def _loader(cfg, accelerator: Accelerator, split: str) -> ShardLoader:
    return build_loader(
        cfg.loader, cfg.shards, split, run_seed=cfg.run.seed, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, device=accelerator.device, train=split == "train",
    )  # fmt: skip


def _setup(task: TrainTask, accelerator: Accelerator, stop: StopSignal) -> Session:
    """Build model, loaders, schedule and optimizer; resume from the latest checkpoint when there is one."""
    cfg = task.cfg
    set_seed(cfg.run.seed)  # the same initial weights on every rank
    model = task.build_model()
    loaders = [_loader(cfg, accelerator, split) for split in ("train", "val")]
    epochs = epochs_for(cfg.run, optimizer_steps(len(loaders[0]), cfg.optim.grad_accum_steps))
    if epochs != cfg.run.epochs:  # the schedule spans the minimum; config.yaml records what ran
        logger.info("run.min_steps %d: %d epochs instead of %d", cfg.run.min_steps, epochs, cfg.run.epochs)
        task.cfg = cfg = replace(cfg, run=replace(cfg.run, epochs=epochs))
    task.mean_batch_size, task.mean_step_tokens = loaders[0].mean_batch_size, loaders[0].mean_step_tokens
    if cfg.run.compile:  # one static graph per bin and mode (train, evaluation); 8 more for test-only bins
        allow_graphs(2 * len(set(loaders[0].data.bins) | set(loaders[1].data.bins)) + 8)
    schedule = task.schedule(len(loaders[0]), accelerator.num_processes)
    cuda = accelerator.device.type == "cuda"
    optimizer = build_optimizer(task.param_groups(model), cfg.optim.betas, schedule.peak_lr, fused=cuda)
    model, optimizer = accelerator.prepare(model, optimizer)
    early = EarlyStopping(cfg.run.patience, cfg.run.min_delta)
    s = Session(
        task, accelerator, model, optimizer, *loaders, schedule, early, stop, to_yaml(cfg), LoopState()
    )
    _resume(s)
    if s.main:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(s.run_dir / CONFIG, s.config_yaml)
    clear_stopped(accelerator, s.run_dir)
    if cfg.run.tensorboard:
        accelerator.init_trackers("tensorboard", config=flat_hparams(to_dict(cfg)))
    logger.info(
        "global batch %d, peak lr %.3g, %d steps/epoch, %d steps, warmup %d, %d process(es), %s",
        schedule.global_batch, schedule.peak_lr, schedule.steps_per_epoch, schedule.total_steps,
        schedule.warmup_steps, accelerator.num_processes, accelerator.device,
    )  # fmt: skip
    return s


def _resume(s: Session) -> None:
    """Restore model, optimizer, scaler, RNGs, loop, loader and early stopping from ``latest``, if any."""
    path = latest_checkpoint(s.run_dir)
    if path is None:
        return
    saved = load_checkpoint(s.accelerator, path)
    s.state = LoopState(**saved["loop"])
    if "images" not in saved["loop"]:  # saved before LoopState.images: every step had the saved global batch
        s.state.images = s.state.step * saved["schedule"]["global_batch"]
    s.early.load_state_dict(saved["early_stopping"])
    if s.state.epoch_step:  # mid-epoch: the loader skips what was trained (elastic at another world size)
        s.train_loader.load_state_dict(saved["loader"])
    world, saved_world = (
        s.accelerator.num_processes,
        saved["loader"].get("num_processes", s.accelerator.num_processes),
    )
    if world != saved_world:
        _reseed_elastic(s.cfg.run.seed, s.state.step, s.accelerator.process_index)
        logger.info(
            "elastic resume: %d -> %d processes; global batch %d -> %d, %d images trained = step %d of the "
            "new LR schedule", saved_world, world, saved["schedule"]["global_batch"], s.schedule.global_batch,
            s.state.images, s.schedule.lr_step(s.state.images),
        )  # fmt: skip
    s.last_saved = s.state.step
    if (path / CONFIG).read_text() != s.config_yaml:
        logger.warning("resuming with a config that differs from the checkpoint's (%s/config.yaml)", path)
    logger.info("resumed from %s: epoch %d, step %d", path, s.state.epoch, s.state.step)


def _reseed_elastic(seed: int, step: int, rank: int) -> None:
    """After a resume at another world size, seed every rank's RNGs from (seed, step, rank).

    Accelerate restores rank r's python/numpy/torch RNG states from ``random_states_r.pkl`` and silently keeps
    the current ones where the file is missing (ranks the old run did not have); rather than a mix of
    restored and fresh states, every rank starts from a new state that differs across ranks and is the same
    on a rerun. (The MAE's masks do not depend on it: they are a function of (seed, step, rank).)
    """
    set_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


def _already_done(s: Session) -> bool:
    """Whether the run ended before (a restart of a finished job): its results are of the current step."""
    path = s.run_dir / s.task.results_name
    over = training_over(s.cfg.run, s.state, s.early) is not None
    return over and path.is_file() and json.loads(path.read_text())["steps"] == s.state.step


def _train(s: Session) -> str:
    """Epochs until the end; returns why training stopped: done | early_stop | max_steps | signal."""
    while (reason := training_over(s.cfg.run, s.state, s.early)) is None:
        reason = _train_epoch(s)
        if reason is not None:
            return reason
        _end_epoch(s)
        if agree_after_step(s.accelerator, s.stop.requested):
            return "signal"
    return reason


def _train_epoch(s: Session) -> str | None:
    """The rest of the current epoch; returns max_steps or signal when stopping inside it."""
    cfg, st = s.cfg, s.state
    s.train_loader.set_epoch(st.epoch)  # a no-op for a loader restored mid-epoch
    s.model.train()
    meter, accum = Meter(), cfg.optim.grad_accum_steps
    # the epoch's last step: the schedule's steps_per_epoch, unless an elastic resume re-dealt its rest
    steps = st.epoch_step + s.train_loader.batches_left // accum
    # a step is global_batch images (at most)
    bar = progress(total=steps, initial=st.epoch_step, desc=f"epoch {st.epoch}", main_process=s.main, unit="img",
                   unit_scale=s.schedule.global_batch)  # fmt: skip
    batches = iter(s.train_loader)
    try:
        while st.epoch_step < steps:
            start = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            waited = time.perf_counter() - start
            set_lr(s.optimizer, lr := s.schedule.lr(s.schedule.lr_step(st.images)))
            stats = s.task.step(s, micro)
            stop = agree_after_step(s.accelerator, s.stop.requested, stats=stats, step=st.step)
            st.step, st.epoch_step = st.step + 1, st.epoch_step + 1
            st.images += s.schedule.global_batch
            meter.add(stats, waited, time.perf_counter() - start)
            bar.update()
            if st.step % cfg.run.log_every == 0:
                metrics = {"lr": lr, **meter.read(s.accelerator)}
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                s.log("train", metrics)
            if stop or (cfg.run.max_steps is not None and st.step >= cfg.run.max_steps):
                _checkpoint(s)  # every rank finished this step: the checkpoint resumes right after it
                return "signal" if stop else "max_steps"
            every = cfg.checkpoint.every_steps
            if every and st.step % every == 0 and st.epoch_step < steps:
                _checkpoint(s)
    finally:
        batches.close()  # a stop mid-epoch: release the loader's pipeline now, not at garbage collection
        bar.close()
    return None


def _validation_due(s: Session) -> bool:
    """Whether this epoch's end validates: every epoch, or once ``run.val_every_steps`` steps have passed since
    the last validation, and always at the last epoch."""
    every, st = s.cfg.run.val_every_steps, s.state
    return not every or st.epoch + 1 >= s.cfg.run.epochs or st.step - st.val_step >= every


def _end_epoch(s: Session) -> None:
    """Validation, early stopping, best weights, then the epoch's checkpoint (when the epoch validates)."""
    st = s.state
    due = _validation_due(s)
    if due:
        v = s.task.validate(s)
        sign = 1.0 if v.lower_is_better else -1.0  # EarlyStopping minimises
        if s.early.update(sign * v.value, st.epoch):
            meta = {"epoch": st.epoch, "step": st.step, f"val_{v.name}": v.value}
            save_weights(s.accelerator, s.model, best_dir(s.run_dir), meta)
        s.log("val", {**v.metrics, f"best_{v.name}": sign * s.early.best, "bad_epochs": s.early.bad_epochs})
        st.val_step = st.step
    st.epoch, st.epoch_step = st.epoch + 1, 0
    s.train_loader.set_epoch(st.epoch)
    if due:  # between validations a kill resumes from the last one's checkpoint, replaying its epochs exactly
        _checkpoint(s)


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
    keep = s.cfg.checkpoint.keep_last
    save_checkpoint(s.accelerator, s.run_dir, s.state.step, loop_state, s.config_yaml, keep)
    s.last_saved = s.state.step


def _finish(s: Session, reason: str) -> None:
    """Final checkpoint, the test split (best weights by default), the task's results file."""
    _checkpoint(s)
    best = s.cfg.run.test_on_best and load_weights(s.accelerator, s.model, best_dir(s.run_dir))
    loader = s.loader("test")
    try:
        metrics, results = s.task.test(s, loader, reason, "best" if best else "last")
    finally:
        loader.close()
    s.log("test", metrics)
    if s.main:
        write_json(s.run_dir / s.task.results_name, results)
