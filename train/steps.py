"""The parts of a training step under Accelerate: the accelerator, one optimizer step over accumulated
micro-batches, agreement across ranks, throughput meters, early stopping and the loop state (the optimizer and
its LR schedule: ``radstream.train.optim``).

``radstream.train.trainer`` composes them for every task; what is specific to a task (the MAE's masks and noise
in ``radstream.train.mae_step``, the classifier's loss in ``radstream.train.supervised``) lives with the task.
"step" always means an optimizer step; a loader batch is a micro-batch (``grad_accum_steps`` of them make one).
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin

from radstream.train.config import RunConfig


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops without writing a checkpoint."""


def build_accelerator(run: RunConfig, run_dir: str, grad_accum_steps: int = 1) -> Accelerator:
    """The Accelerator of a run: devices, processes, precision, accumulation, compile, TensorBoard in run_dir."""
    return Accelerator(
        cpu=run.cpu,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        log_with="tensorboard" if run.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
        dynamo_plugin=dynamo_plugin(run),
    )


def dynamo_plugin(run: RunConfig) -> TorchDynamoPlugin | None:
    """How a run compiles (None: eager): ``run.compile_backend`` with static shapes (``dynamic=False``).

    Every bin has its own fixed batch shape and the MAE pads visible tokens to the bin's static width, so each
    bin compiles one graph per train / eval mode. Dynamo's default would turn the image dimensions dynamic at
    the second shape: slower kernels, and no CUDA graphs (``mode="reduce-overhead"`` needs static shapes).
    """
    if not run.compile:
        return None
    return TorchDynamoPlugin(backend=run.compile_backend, dynamic=False)


def allow_graphs(graphs: int) -> None:
    """Let dynamo keep ``graphs`` compiled graphs per function instead of its default of 8, past which it
    silently runs that function eagerly: a run needs one per bin shape and mode (``dynamo_plugin``)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), graphs))


def epochs_for(run: RunConfig, steps_per_epoch: int) -> int:
    """The run's epochs: ``run.epochs``, raised so that they hold ``run.min_steps`` optimizer steps."""
    return max(run.epochs, -(-run.min_steps // steps_per_epoch))


@dataclass
class StepStats:
    """What one optimizer step did on this rank. A task adds its own counters by subclassing it
    (``counts`` and ``rates``)."""

    loss: torch.Tensor
    """0-d, mean of the micro-batches' losses (on the device, not synchronised)."""
    images: int = 0
    keys: list[str] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    """Global gradient norm before clipping (only when clipping)."""

    def counts(self) -> dict[str, torch.Tensor | float]:
        """The task's counters of this step, summed over the steps of a log window and over ranks."""
        return {}

    @staticmethod
    def rates(counts: dict[str, float], images: float, seconds: float) -> dict[str, float]:
        """The task's metrics of a log window from its summed ``counts``, images and busy seconds."""
        return {}


def accumulate_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict],
    loss_of: Callable[[int, dict], tuple[torch.Tensor, torch.Tensor]],
    *,
    step: int,
    grad_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over ``batches`` (``grad_accum_steps`` micro-batches) with ``accelerator.accumulate``:
    ``loss_of(micro, batch)`` is the forward pass of one micro-batch and returns (the SUM of its per-sample or
    per-patch losses on this rank, with its graph; their count).

    The step's gradient is that of the mean over every counted sample (or patch) of all its micro-batches on
    all ranks: the sums are backpropagated and the gradients divided by the step's global count once, before
    clipping. A mean per micro-batch (accelerate divides each micro-batch's loss by the step count) would be
    a mean of means: a 224² and a 512² micro-batch of one step would weigh their patches 5:1.

    Returns:
        (this rank's mean loss over the step's counted samples, detached; the gradient norm before
        clipping, or None).

    Raises:
        RuntimeError: the accelerator's accumulation counter is out of step with ``len(batches)``.
    """
    total, count, grad_norm = torch.zeros(()), torch.zeros(()), None
    for micro, batch in enumerate(batches):
        with accelerator.accumulate(model):
            local_sum, local_count = loss_of(micro, batch)
            accelerator.backward(local_sum)
            total = total.to(local_sum.device) + local_sum.detach().float()
            count = count.to(local_sum.device) + local_count.detach().float()
            if accelerator.sync_gradients != (micro == len(batches) - 1):
                raise RuntimeError(f"gradient accumulation out of step at step {step}, micro-batch {micro}")
            if accelerator.sync_gradients:
                divide_gradients(accelerator, model, count, len(batches))
                if grad_clip is not None:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return total / count.clamp_min(1.0), grad_norm


def divide_gradients(
    accelerator: Accelerator, model: torch.nn.Module, count: torch.Tensor, micro: int
) -> None:
    """Turn the accumulated gradient of the micro-batches' loss sums into that of the step's global mean.

    Accelerate divided every micro-batch's loss by ``micro`` and DDP averages gradients over the ranks, so
    the gradient holds sum / (micro x world): multiplying by micro x world / global count leaves the mean over
    all counted samples of the step (one small all-reduce of ``count``, this rank's). A rank holding only
    padding (at 1% labels on 8 GPUs) adds nothing and does not shrink the others' update, and the LR chosen
    does not depend on the world size or on how a step's images are cut into micro-batches.
    """
    world = accelerator.num_processes
    total = accelerator.reduce(count.reshape(1), reduction="sum").reshape(()) if world > 1 else count
    scale = micro * world / total.clamp_min(1.0)
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(scale.to(param.grad.device, param.grad.dtype))


def agree(accelerator: Accelerator, *flags: bool | torch.Tensor) -> list[bool]:
    """Whether any rank raised each flag: one small all-reduce, so every rank takes the same branch."""
    device = accelerator.device
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in flags])
    return [v > 0 for v in accelerator.reduce(values, reduction="sum").tolist()]


def agree_after_step(
    accelerator: Accelerator, stop_requested: bool, stats: StepStats | None = None, step: int | None = None
) -> bool:
    """After a step, agree across ranks whether to stop (any rank got a stop signal) and whether any loss was
    non-finite, in one all-reduce; returns the stop decision.

    Raises:
        NonFiniteLossError: on every rank when any rank's loss is not finite, naming the step and, on the
            rank that saw it, the batch keys.
    """
    bad_here = ~torch.isfinite(stats.loss) if stats is not None else False
    bad_anywhere, stop = agree(accelerator, bad_here, stop_requested)
    if bad_anywhere:
        if bool(bad_here):
            raise NonFiniteLossError(
                f"non-finite loss ({float(stats.loss)}) at step {step} on rank {accelerator.process_index}; "
                f"batch keys: {', '.join(stats.keys)}"
            )
        raise NonFiniteLossError(
            f"non-finite loss at step {step} on another rank (its log names the batch keys)"
        )
    return stop


@torch.no_grad()
def split_sums(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    batch_sums: Callable[[dict], torch.Tensor],
    size: int,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The one skeleton of every evaluation of a split (the MAE's losses and study MSE, a classifier's
    confusion): ``batch_sums(batch)`` gives a batch's [size] sums on the device, added up and all-reduced once.

    The model evaluates in eval mode and gets its own mode back after; the loader restarts at epoch 0, so the
    batches (and thus border-aware batch masks) are the same at every evaluation. Every rank must call it.
    """
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    total = torch.zeros(size, dtype=dtype, device=accelerator.device)
    try:
        for batch in loader:
            total += batch_sums(batch)
    finally:
        model.train(was_training)
    return accelerator.reduce(total, reduction="sum")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Meter:
    """Throughput and timing over the steps since the last ``read``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.losses, self.grad_norms = 0, [], []
        self.images = 0
        self.counts: dict[str, torch.Tensor | float] = {}
        self.rates = StepStats.rates
        self.wait_s = self.busy_s = 0.0

    def add(self, stats: StepStats, wait_s: float, step_s: float) -> None:
        """Record one step: its stats, seconds waiting for the loader and seconds in all."""
        self.steps += 1
        self.losses.append(stats.loss.float())
        if stats.grad_norm is not None:
            self.grad_norms.append(torch.as_tensor(stats.grad_norm, dtype=torch.float32))
        self.images += stats.images
        for name, value in stats.counts().items():
            self.counts[name] = self.counts.get(name, 0.0) + value
        self.rates = type(stats).rates
        self.wait_s += wait_s
        self.busy_s += step_s

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """Window metrics, loss averaged over ranks, counts summed over ranks; then reset."""
        loss = accelerator.reduce(torch.stack(self.losses).mean().to(accelerator.device), reduction="mean")
        device = accelerator.device
        values = (self.images, *self.counts.values())
        counts = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        images, *sums = accelerator.reduce(counts, reduction="sum").tolist()
        seconds = max(self.busy_s, 1e-9)
        out = {
            "loss": float(loss),
            "images_per_s": images / seconds,
            **self.rates(dict(zip(self.counts, sums, strict=True)), images, seconds),
            "data_wait_frac": self.wait_s / seconds,
            "peak_memory_mb": peak_memory_mb(accelerator.device),
        }
        if self.grad_norms:  # this rank's (after the all-reduce of gradients it is the same on every rank)
            out["grad_norm"] = float(torch.stack(self.grad_norms).mean())
        self.reset()
        return out


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a validation loss lower than the best by ``min_delta``."""

    patience: int
    """Epochs without improvement before stopping; 0: never stop."""
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, loss: float, epoch: int) -> bool:
        """Record an epoch's validation loss; True when it is the new best."""
        if loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # patience and min_delta come from the current config, so a resumed run may change them
        self.best, self.best_epoch, self.bad_epochs = (
            float(state["best"]),
            state["best_epoch"],
            state["bad_epochs"],
        )


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0
    """Optimizer steps done in all."""
    epoch_step: int = 0
    """Optimizer steps done in ``epoch``."""
    images: int = 0
    """Images trained in all, each step counted as its schedule's global batch: the LR schedule's position
    (``Schedule.lr_step``), which stays right when a resume at another world size changes the global batch."""
    val_step: int = 0
    """``step`` at the last validation (``run.val_every_steps`` counts from it)."""


def training_over(run: RunConfig, state: LoopState, early: EarlyStopping) -> str | None:
    """Why training is over at ``state``: early_stop (never before ``run.min_steps``) | done | max_steps; None
    while it goes on."""
    if early.should_stop and state.step >= run.min_steps:
        return "early_stop"
    if state.epoch >= run.epochs:
        return "done"
    if run.max_steps is not None and state.step >= run.max_steps:
        return "max_steps"
    return None
