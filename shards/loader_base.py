"""The loader of one rank, less its backend: schedule → :class:`StepPlan` per batch → batches.

``radstream.shards.loader.build_loader`` builds one; the backends (``radstream.shards.dali_backend``, ``radstream.shards.torch_backend``)
subclass :class:`ShardLoader`.

Everything that decides *what* a batch holds lives here and is shared by both backends: the samples of the
split (from ``samples.parquet``), the schedule (``radstream.bucketing.schedule``), the padding mask, the augmentation
parameters, resumption. A backend only turns a list of :class:`StepPlan` into image tensors:
``radstream.shards.dali_backend`` (DALI pipeline) or ``radstream.shards.torch_backend`` (DataLoader workers + Pillow). So both
yield the same keys, labels and crops for the same (config, epoch, rank).

A batch is a dict::

    image       the stored integers, uint8 or uint16 [B, 1, H, W], on the training device (H x W = the bin's
                shape); ``radstream.shards.images.unit_float`` makes them float32 [0, 1] where they are consumed
    label       int64 [B]; -1 for unlabeled samples
    key         list[str], the samples' keys
    bin         str, the bin's name "HxW"
    foreground  int64 [B, 4], the foreground box (y0, x0, y1, x1, half-open) in the pixels of ``image``:
                the stored box in bin coordinates, moved through the training crop and flip (clipped to
                the image; y0 == y1 or x0 == x1 when the crop shows no foreground)
    valid       bool [B]; False for a padded repeat: a sample that already appeared earlier in this epoch's
                global batch order (steps in order, ranks in order within a step). Evaluation ignores these.

Every rank gets ``len(loader)`` steps, with the same bin at each step on every rank. Each bin's last global
batch is padded by wrap-around (at most ``batch x world - 1`` repeats per bin and epoch, flagged invalid) or,
training with ``strict``, dropped (``loader.skipped_samples``).

Mid-epoch resume: ``state_dict()`` holds (epoch, step), the number of batches handed out so far; a loader
given it yields exactly the remaining batches of that epoch (identical augmentation included), without
decoding the skipped ones. After a full pass the loader moves on to the next epoch by itself;
``set_epoch(e)`` with another epoch starts that epoch from its first step, with the current one it is a
no-op (so a resumed loop can call it unconditionally).

Elastic resume: a state saved at another world size (same seed, shuffle block and batch sizes) is not
refused: the samples of that epoch not yet trained are dealt to the new ranks
(``radstream.bucketing.elastic.remaining_schedule``; ``consumed`` in the state lists the stretches of the epoch trained
so far, as (world size, batches)), so ``batches_left`` may differ from ``len(loader) - step``; the next
epochs are the plain schedule of the new world size.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from radstream.bucketing.dataplan import crop_params, padding_masks, transform_boxes
from radstream.bucketing.elastic import remaining_padding_masks, remaining_schedule
from radstream.bucketing.schedule import (
    epoch_schedule,
    mean_batch_size,
    mean_step_tokens,
    schedule_stats,
    steps_per_epoch,
    token_budget_batch_sizes,
)
from radstream.shards.loader_config import LoaderConfig
from radstream.shards.loader_data import SplitSamples
from radstream.shards.store import ShardStore

log = logging.getLogger(__name__)

_AUGMENT_STREAM = 7  # seed stream of the augmentation, apart from the schedule's streams


@dataclass(frozen=True, eq=False)
class StepPlan:
    """Everything about one batch except its pixels."""

    step: int
    """Position in the epoch's schedule."""
    bin: str
    rows: np.ndarray
    """int64 [B], indices into the bin's ``BinSamples``."""
    valid: np.ndarray
    """bool [B], False for padded repeats."""
    draw: Callable[[int, str, int], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)
    """``draw(step, bin, B)``: the step's (crops, flips), from its own seed; None: no augmentation. Drawn
    when first asked, not at the epoch boundary (~100 µs a step: 3-5 s there for 10M samples on 8 ranks)."""

    @functools.cached_property
    def _augmentation(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return self.draw(self.step, self.bin, len(self.rows)) if self.draw is not None else (None, None)

    @property
    def crops(self) -> np.ndarray | None:
        """int64 [B, 4] (top, left, height, width) of the training crop in stored pixels; None: no
        augmentation."""
        return self._augmentation[0]

    @property
    def flips(self) -> np.ndarray | None:
        """bool [B], horizontal flip after the crop; None: no augmentation."""
        return self._augmentation[1]


def shard_schedule(data: SplitSamples, plans: list[StepPlan]) -> list[list[str]]:
    """Per planned step, the shard paths its rows read."""
    return [sorted({data.shards[i] for i in data.bins[p.bin].shard[p.rows].tolist()}) for p in plans]


class Lookahead:
    """Keeps ``store.prefetch`` fed with the next ``shards_ahead`` shards of the schedule, in first-use order.

    Args:
        store: the dataset's store.
        steps: per step, the shards it reads (``shard_schedule``).
        shards_ahead: shards to keep requested beyond those of the current step.
    """

    def __init__(self, store: ShardStore, steps: list[list[str]], shards_ahead: int) -> None:
        self.store, self.ahead, self.order, self.ends, self.sent = store, shards_ahead, [], [], 0
        seen = set()
        for shards in steps:
            for shard in shards:
                if shard not in seen:
                    seen.add(shard)
                    self.order.append(shard)
            self.ends.append(len(self.order))  # shards in first-use order needed through this step

    def advance(self, step: int) -> None:
        """Step ``step`` (index into ``steps``) is next: request through it plus ``shards_ahead`` more."""
        if not self.ends:
            return
        end = min(len(self.order), self.ends[min(step, len(self.ends) - 1)] + self.ahead)
        if end > self.sent:
            self.store.prefetch(self.order[self.sent : end])
            self.sent = end


def batch_sizes(bins: list[str], cfg: LoaderConfig) -> dict[str, int]:
    """Images per device batch of each bin: ``cfg.batch_size``, or with a token budget each bin's share of it
    (capped at ``batch_size``)."""
    if cfg.token_budget is None:
        return dict.fromkeys(bins, cfg.batch_size)
    return token_budget_batch_sizes(bins, cfg.token_budget, cfg.patch_size, max_batch=cfg.batch_size)


class ShardLoader:
    """The loader of one rank; backends subclass it and implement ``_images`` (and ``close``).

    Build it with :func:`build_loader`.
    """

    backend = "base"

    def __init__(
        self,
        data: SplitSamples,
        cfg: LoaderConfig,
        *,
        process_index: int,
        num_processes: int,
        device: str | torch.device,
        train: bool,
        store: ShardStore | None = None,
    ) -> None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is outside 0..{num_processes - 1}")
        self.data, self.cfg, self.train, self.store = data, cfg, train, store
        self.rank, self.world_size = process_index, num_processes
        self.device = torch.device(device)
        self.augment = train and cfg.augment.enabled
        self.drop_incomplete = train and cfg.strict
        self.batch_sizes = batch_sizes(list(data.bins), cfg)
        stats = schedule_stats(data.counts, self.batch_sizes, num_processes, self.drop_incomplete, 1)
        self.padded_samples = int(stats["padded_samples"])
        """Repeats added per epoch (all ranks) to fill the bins' last global batches."""
        self.skipped_samples = int(stats["skipped_samples"])
        """Samples left out per epoch (all ranks) by strict binning."""
        if self.skipped_samples:
            log.info(
                "strict binning skips %d of %d %s samples per epoch (incomplete global batches)",
                self.skipped_samples,
                stats["real_samples"],
                data.split,
            )
        self.epoch = 0
        self.step = 0
        self.consumed: list[tuple[int, int]] = []
        """Stretches of ``epoch`` trained before this one at other world sizes: (world size, batches)."""
        self._plans: tuple[tuple, list[StepPlan]] | None = None

    @property
    def mean_batch_size(self) -> float:
        """Images per device batch averaged over an epoch's steps: ``batch_size`` unless a token budget gives
        each bin its own size (then the real mean, which the LR scaling follows, not the cap)."""
        return mean_batch_size(self.data.counts, self.batch_sizes, self.world_size, self.drop_incomplete)

    @property
    def mean_step_tokens(self) -> float:
        """Real patches per device batch averaged over an epoch's steps, padding repeats excluded (the MAE's
        LR scaling, ``radstream.bucketing.schedule.mean_step_tokens``)."""
        return mean_step_tokens(
            self.data.counts, self.batch_sizes, self.world_size, self.cfg.patch_size, self.drop_incomplete
        )

    def __len__(self) -> int:
        return steps_per_epoch(self.data.counts, self.batch_sizes, self.world_size, self.drop_incomplete)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; another epoch than the current one starts at its first step."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self.step, self.consumed = epoch, 0, []

    @property
    def batches_left(self) -> int:
        """Batches this rank still yields in the current epoch (equal on every rank)."""
        return len(self.epoch_plans(self.epoch)) - self.step

    def state_dict(self) -> dict:
        """(epoch, step): the position to resume from, plus what must match on restore."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "consumed": [list(c) for c in self.consumed],
            "num_processes": self.world_size,
            "seed": self.cfg.seed,
            "steps_per_epoch": len(self),
            "shuffle_block": self.cfg.shuffle_block,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s position; the next iteration yields the rest of that epoch.

        A state of another world size resumes elastically (the module docstring); its ``steps_per_epoch``
        is checked against this loader's schedule at that world size.

        Raises:
            ValueError: the state was saved with another seed, shuffle block or batch sizes, or its step lies
                outside its epoch.
        """
        mine = self.state_dict()
        if (
            "num_processes" in state
        ):  # a whole state_dict; saved before shuffle blocks existed: uniform shuffle
            state = {"shuffle_block": 0, "consumed": [], **state}
        world = state.get("num_processes", self.world_size)
        if world != self.world_size:
            mine["steps_per_epoch"] = steps_per_epoch(self.data.counts, self.batch_sizes, world,
                                                      self.drop_incomplete)  # fmt: skip
        for name in ("seed", "steps_per_epoch", "shuffle_block"):
            if name in state and state[name] != mine[name]:
                raise ValueError(
                    f"loader state has {name}={state[name]}, this loader {mine[name]}: "
                    "resuming mid-epoch needs the same seed, shuffle block and batch sizes"
                )
        consumed = [(int(w), int(n)) for w, n in state.get("consumed", [])]
        step = int(state["step"])
        if world != self.world_size and step:
            consumed, step = [*consumed, (world, step)], 0
        self.epoch, self.step, self.consumed = int(state["epoch"]), 0, consumed
        if not 0 <= step <= self.batches_left:  # checks every stretch of consumed too
            raise ValueError(f"loader state step {step} is outside 0..{self.batches_left}")
        self.step = step
        if world != self.world_size:
            log.info("elastic resume: epoch %d trained as %s (world size, batches), %d batches left at world size %d",
                     self.epoch, consumed, self.batches_left, self.world_size)  # fmt: skip

    def epoch_plans(self, epoch: int) -> list[StepPlan]:
        """The batches of ``epoch`` on this rank: bins, rows, padding masks and augmentation parameters (the
        rest of the epoch after ``consumed`` when resumed elastically)."""
        key = (epoch, tuple(self.consumed) if epoch == self.epoch else ())
        if self._plans is not None and self._plans[0] == key:
            return self._plans[1]
        args = {
            "seed": self.cfg.seed,
            "epoch": epoch,
            "world_size": self.world_size,
            "drop_incomplete": self.drop_incomplete,
        }
        counts, block = self.data.shard_counts, self.cfg.shuffle_block
        if epoch == self.epoch and self.consumed:
            args["consumed"] = self.consumed
            steps = remaining_schedule(counts, self.batch_sizes, rank=self.rank, shuffle_block=block, **args)
            masks = remaining_padding_masks(counts, self.batch_sizes, rank=self.rank, **args)
        else:
            steps = epoch_schedule(counts, self.batch_sizes, rank=self.rank, shuffle_block=block, **args)
            if self.padded_samples:
                masks = padding_masks(counts, self.batch_sizes, rank=self.rank, **args)
            else:
                masks = [np.ones(len(s.indices), dtype=bool) for s in steps]
        draw = None
        if self.augment:
            stretch = (len(self.consumed),) if epoch == self.epoch and self.consumed else ()  # fresh draws
            draw = functools.partial(self._draw, epoch=epoch, stretch=stretch)
        plans = [
            StepPlan(i, s.bin, s.indices.astype(np.int64, copy=False), m, draw)
            for i, (s, m) in enumerate(zip(steps, masks, strict=True))
        ]
        self._plans = (key, plans)
        return plans

    def _draw(self, step: int, name: str, count: int, *, epoch: int, stretch: tuple[int, ...]):
        """The step's crops and flips, from its own seed (seed, epoch, rank, step[, stretch])."""
        aug, b = self.cfg.augment, self.data.bins[name]
        rng = np.random.default_rng(
            np.random.SeedSequence([self.cfg.seed, epoch, self.rank, step, _AUGMENT_STREAM, *stretch])
        )
        crops = crop_params(rng, count, b.height, b.width, aug.scale, aug.ratio)
        flips = rng.random(count) < aug.flip_prob
        return crops, flips

    def __iter__(self) -> Iterator[dict]:
        plans = self.epoch_plans(self.epoch)[self.step :]
        ahead = None
        if self.store is not None and self.store.remote:  # fetch the next shards while these are decoded
            # at least one shuffle block ahead: the next block is on its way while this one is read
            shards_ahead = max(self.cfg.remote.prefetch_shards, self.cfg.shuffle_block)
            ahead = Lookahead(self.store, shard_schedule(self.data, plans), shards_ahead)
            ahead.advance(0)
        images = self._images(plans)
        try:
            for i, (plan, image) in enumerate(zip(plans, images, strict=True)):
                if ahead is not None:
                    ahead.advance(i + 1)
                self.step = plan.step + 1
                yield self._batch(plan, image)
        finally:
            images.close()
        self.epoch, self.step, self.consumed = self.epoch + 1, 0, []

    def _batch(self, plan: StepPlan, image: torch.Tensor) -> dict:
        b = self.data.bins[plan.bin]
        boxes = b.foreground[plan.rows].astype(np.int64)
        if plan.crops is not None:
            boxes = transform_boxes(boxes, plan.crops, plan.flips, b.height, b.width)
        to = {"device": self.device, "non_blocking": True}
        return {
            "image": image.to(**to),  # integers cross to the device (from pinned memory with torch workers)
            "label": torch.from_numpy(b.label[plan.rows].astype(np.int64)).to(**to),
            "key": b.keys[plan.rows].tolist(),
            "bin": plan.bin,
            "foreground": torch.from_numpy(boxes).to(**to),
            "valid": torch.from_numpy(plan.valid).to(**to),
        }

    def _images(self, plans: list[StepPlan]) -> Iterator[torch.Tensor]:
        """The stored integers [B, 1, H, W] (uint8 or uint16, on the CPU or already on the device) of
        ``plans``, in order (a generator). Integers, not floats: a quarter of the bytes to move, and the
        conversion runs inside the consumer's step, on the training device (``radstream.shards.images``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the backend's workers, pipelines and files."""

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
