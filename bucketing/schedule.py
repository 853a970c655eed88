"""The batch schedule: which bin and which samples every rank trains on at every step of an epoch.

A pure function of (per-bin per-shard sample counts, batch sizes, seed, epoch, world size, rank, shuffle
block), so every rank computes its own share without talking to the others, and a resumed run recomputes the
same epoch.

Per bin, the samples ``0..count-1`` (the bin's stored order, shard after shard) are put into the epoch's
*bin order* (:func:`bin_order`) by a generator seeded by ``(seed, epoch, bin name)``, independent of dict order,
of Python's hash seed and of the world size:

- ``shuffle_block = 0``: a uniform permutation of the bin's samples;
- ``shuffle_block = k``: the bin's shards in a random order, cut into blocks of ``k`` shards, the samples of
  each block permuted among themselves (mosaicml/streaming's ``py1b``, with blocks of whole shards). Reading the
  order front to back touches one block (``k`` shards) at a time, and the next block is known in advance.

The bin order is cut into global batches of ``batch_size x world_size``; rank ``r`` takes the ``r``-th slice
of ``batch_size`` from each, so all ranks read the same block at the same time. The last, incomplete global
batch of a bin is either

- padded (default) by wrapping around the bin's permutation (cycling it again when the bin is smaller than
  one global batch), so every rank gets a full batch: at most ``batch_size x world_size - 1`` repeated
  samples per bin and epoch; or
- dropped (``drop_incomplete=True``, strict/VariViT mode): its ``count % (batch_size x world_size)`` samples
  are skipped this epoch (a different subset every epoch, as the permutation changes).

The global batches of all bins are then interleaved in one seeded random order, the same on every rank, so
every rank has the same number of steps and the same bin at each step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from radstream.bucketing.geometry import Bin

BatchSize = int | Mapping[str, int]
ShardCounts = int | Sequence[int]
"""A bin's samples: its per-shard counts in stored order, or one int (the bin read as a single shard)."""

# Separate seed streams for the per-bin permutations and the interleaving of bins.
_PERMUTE_STREAM, _INTERLEAVE_STREAM = 0, 1


@dataclass(frozen=True, eq=False)
class Step:
    """One step of one rank: a batch of samples from one bin."""

    bin: str
    """The bin's name, ``HxW``."""
    indices: np.ndarray
    """int64 [batch]: indices into the bin's samples (0..count-1, in the bin's stored order); a view of the
    epoch's order, not a Python int per sample."""

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Step) and self.bin == other.bin and np.array_equal(self.indices, other.indices)
        )

    def __hash__(self) -> int:
        return hash((self.bin, np.asarray(self.indices, np.int64).tobytes()))


def _name_key(name: str) -> int:
    """A stable 64-bit integer for a bin name (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


def _rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, *stream]))


def bin_total(shards: ShardCounts) -> int:
    """The number of samples of a bin given as :data:`ShardCounts`."""
    return int(shards) if isinstance(shards, (int, np.integer)) else int(sum(shards))


def _check(counts: Mapping[str, ShardCounts], world_size: int, rank: int | None = None) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    bad = [name for name, shards in counts.items() if min(np.atleast_1d(shards), default=0) < 0]
    if bad:
        raise ValueError(f"negative sample count for bin {bad[0]!r}")


def bin_order(shards: ShardCounts, *, name: str, seed: int, epoch: int, shuffle_block: int = 0) -> np.ndarray:
    """The epoch's order of one bin's samples; the same for every world size and rank.

    Args:
        shards: the bin's per-shard sample counts in stored order (samples ``0..count-1`` lie shard after
            shard), or the bin's count.
        name: the bin's name (a seed stream of its own).
        seed: the run's seed.
        epoch: the epoch number.
        shuffle_block: shards per shuffle block; 0 (or at least the bin's number of shards) permutes the
            whole bin uniformly.

    Returns:
        int64 [count], every sample index once.
    """
    sizes = np.atleast_1d(np.asarray(shards, dtype=np.int64))
    rng = _rng(seed, epoch, _PERMUTE_STREAM, _name_key(name))
    if shuffle_block < 1 or len(sizes) <= shuffle_block:
        return rng.permutation(int(sizes.sum()))  # today's uniform shuffle, draw for draw
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    shard_order = rng.permutation(len(sizes))
    blocks = []
    for first in range(0, len(sizes), shuffle_block):
        block = shard_order[first : first + shuffle_block]
        samples = np.concatenate([np.arange(starts[s], starts[s] + sizes[s]) for s in block])
        blocks.append(rng.permutation(samples))
    return np.concatenate(blocks)


def _batch_size_of(batch_size: BatchSize, name: str) -> int:
    """The per-rank batch size for one bin."""
    if isinstance(batch_size, Mapping):
        if name not in batch_size:
            raise ValueError(f"no batch size given for bin {name!r}")
        size = batch_size[name]
    else:
        size = batch_size
    if size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {size} for bin {name!r}")
    return int(size)


def _num_global_batches(count: int, global_batch: int, drop_incomplete: bool) -> int:
    return count // global_batch if drop_incomplete else -(-count // global_batch)


def epoch_schedule(
    counts: Mapping[str, ShardCounts],
    batch_size: BatchSize,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    drop_incomplete: bool = False,
    shuffle_block: int = 0,
) -> list[Step]:
    """The ordered steps of one epoch for one rank.

    Args:
        counts: per bin name, its per-shard sample counts (or its count: the bin read as one shard); bins
            with 0 samples contribute nothing.
        batch_size: per-rank batch size, one for all bins or one per bin name (e.g. token budgets).
        seed: the run's seed (≥ 0).
        epoch: the epoch number (≥ 0); another epoch gives another order.
        world_size: number of ranks.
        rank: this rank, in ``[0, world_size)``.
        drop_incomplete: drop each bin's last incomplete global batch instead of padding it.
        shuffle_block: shards per shuffle block (:func:`bin_order`); 0: uniform shuffle of each bin.

    Returns:
        The same number of steps on every rank, with the same bin at every step index.
    """
    _check(counts, world_size, rank)
    if seed < 0 or epoch < 0 or shuffle_block < 0:
        raise ValueError(f"seed, epoch, shuffle_block must be ≥ 0, got {seed}, {epoch}, {shuffle_block}")
    names = sorted(name for name, shards in counts.items() if bin_total(shards) > 0)
    rank_batches: dict[str, np.ndarray] = {}
    for name in names:
        size = _batch_size_of(batch_size, name)
        global_batch = size * world_size
        n_batches = _num_global_batches(bin_total(counts[name]), global_batch, drop_incomplete)
        bin_samples = bin_order(counts[name], name=name, seed=seed, epoch=epoch, shuffle_block=shuffle_block)
        # np.resize cycles the order: the wrap-around padding of the last global batch.
        taken = np.resize(bin_samples, n_batches * global_batch) if n_batches else bin_samples[:0]
        # this rank's share, copied: a view would keep every rank's order alive as long as the steps
        rank_batches[name] = taken.reshape(n_batches, world_size, size)[:, rank, :].copy()
    sequence = bin_sequence(
        counts, batch_size, seed=seed, epoch=epoch, world_size=world_size, drop_incomplete=drop_incomplete
    )
    next_batch = dict.fromkeys(names, 0)
    steps = []
    for name in sequence:
        steps.append(Step(name, rank_batches[name][next_batch[name]]))
        next_batch[name] += 1
    return steps


def bin_sequence(
    counts: Mapping[str, ShardCounts],
    batch_size: BatchSize,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    drop_incomplete: bool = False,
) -> list[str]:
    """The bin of every step of the epoch (the same on every rank).

    With :func:`bin_order`, this is all an elastic resume needs: after ``s`` steps at world size ``W``, bin
    ``b`` has used the first ``sequence[:s].count(b) x batch_size[b] x W`` places of its bin order, and the
    remaining samples of the epoch are the rest of each bin order.
    """
    _check(counts, world_size)
    totals = {name: bin_total(shards) for name, shards in counts.items() if bin_total(shards) > 0}
    return interleave(totals, batch_size, world_size, drop_incomplete, _rng(seed, epoch, _INTERLEAVE_STREAM))


def interleave(
    samples: Mapping[str, int],
    batch_size: BatchSize,
    world_size: int,
    drop_incomplete: bool,
    rng: np.random.Generator,
) -> list[str]:
    """The bin of each global batch of ``samples`` (samples per bin name) in one random order drawn from
    ``rng``: a bin of ``n`` samples gives ``_num_global_batches(n, batch x world_size)`` steps."""
    names = sorted(samples)
    sizes = [
        _num_global_batches(samples[n], _batch_size_of(batch_size, n) * world_size, drop_incomplete)
        for n in names
    ]
    labels = np.repeat(np.arange(len(names)), sizes)
    return [names[i] for i in rng.permutation(labels)]


def steps_per_epoch(
    counts: Mapping[str, ShardCounts], batch_size: BatchSize, world_size: int, drop_incomplete: bool = False
) -> int:
    """Number of steps per rank in an epoch (the length of :func:`epoch_schedule`), without building it."""
    _check(counts, world_size)
    return sum(
        _num_global_batches(bin_total(shards), _batch_size_of(batch_size, name) * world_size, drop_incomplete)
        for name, shards in counts.items()
        if bin_total(shards) > 0
    )


def mean_batch_size(
    counts: Mapping[str, ShardCounts], batch_size: BatchSize, world_size: int, drop_incomplete: bool = False
) -> float:
    """Images per rank per step, averaged over the steps of an epoch (padding repeats included: they fill the
    batch slots of a bin's last global batch). With one batch size it is that size; with per-bin sizes (a
    token budget) it is the real batch the optimizer sees on average, which the LR scaling follows."""
    _check(counts, world_size)
    sizes = {n: _batch_size_of(batch_size, n) for n, shards in counts.items() if bin_total(shards) > 0}
    steps = {
        n: _num_global_batches(bin_total(counts[n]), s * world_size, drop_incomplete)
        for n, s in sizes.items()
    }
    total = sum(steps.values())
    return sum(steps[n] * sizes[n] for n in sizes) / total if total else 0.0


REFERENCE_TOKENS = 196
"""Patches of one image of the reference MAE (224x224 at patch 16): the unit of the LR scaling rule."""


def mean_step_tokens(
    counts: Mapping[str, ShardCounts], batch_size: BatchSize, world_size: int, patch_size: int,
    drop_incomplete: bool = False,
) -> float:  # fmt: skip
    """Real patches per rank per step, averaged over the steps of an epoch: what the optimizer really sees.

    Padding repeats (the slots of a bin's last global batch) are not counted, and an image counts by its
    patches, so a step of 49 images of 512x512 (1024 patches each) weighs what 256 of 224x224 do. Divided by
    ``REFERENCE_TOKENS`` it is the batch in reference (224x224) images of MAE's LR rule: the MAE loss is the
    mean over every masked patch of the step (``radstream.train.steps.accumulate_step``), so the gradient averages over
    patches, and at 224x224 it is exactly the reference's image count. With a token budget every step holds
    about the same patches, so one peak LR fits every bin, which an image count cannot give."""  # noqa: D205
    _check(counts, world_size)
    steps = seen = 0
    for name, shards in counts.items():
        total = bin_total(shards)
        if total == 0:
            continue
        global_batch = _batch_size_of(batch_size, name) * world_size
        n = _num_global_batches(total, global_batch, drop_incomplete)
        real = min(total, n * global_batch)  # dropped incomplete batches are not seen
        steps, seen = steps + n, seen + real * Bin.parse(name).tokens(patch_size)
    return seen / (steps * world_size) if steps else 0.0


def token_budget_batch_sizes(
    bins: Sequence[str | Bin],
    tokens_per_batch: int,
    patch_size: int,
    max_batch: int | None = None,
    multiple_of: int = 1,
) -> dict[str, int]:
    """Per-bin batch sizes that hold about ``tokens_per_batch`` tokens each: ``tokens_per_batch // tokens``.

    The result is capped at ``max_batch``, rounded down to a multiple of ``multiple_of``, and at least
    ``multiple_of`` (so at least 1; a bin larger than the budget gets ``multiple_of`` images).

    Returns:
        Batch size per bin name.
    """
    if tokens_per_batch < 1 or patch_size < 1 or multiple_of < 1:
        raise ValueError("tokens_per_batch, patch_size and multiple_of must be ≥ 1")
    if max_batch is not None and max_batch < multiple_of:
        raise ValueError(f"max_batch ({max_batch}) must be ≥ multiple_of ({multiple_of})")
    sizes = {}
    for entry in bins:
        b = Bin.parse(entry) if isinstance(entry, str) else entry
        size = tokens_per_batch // b.tokens(patch_size)
        if max_batch is not None:
            size = min(size, max_batch)
        sizes[b.name] = max(size // multiple_of * multiple_of, multiple_of)
    return sizes


def schedule_stats(
    counts: Mapping[str, ShardCounts],
    batch_size: BatchSize,
    world_size: int,
    drop_incomplete: bool,
    patch_size: int,
) -> dict[str, float | int]:
    """Cost of a schedule, computed from the counts alone (bin names must be ``HxW``).

    Returns:
        ``steps_per_epoch``; ``real_samples`` (sum of counts); ``padded_samples`` and ``padding_fraction``
        (repeated samples / real samples, pad mode); ``skipped_samples`` (drop mode); tokens per step of one
        rank: ``tokens_per_step_mean``, ``_min``, ``_max`` and ``_cv`` (coefficient of variation, std / mean).
    """
    _check(counts, world_size)
    step_tokens, step_counts = [], []
    padded = skipped = 0
    for name, shards in counts.items():
        count = bin_total(shards)
        if count == 0:
            continue
        size = _batch_size_of(batch_size, name)
        n_batches = _num_global_batches(count, size * world_size, drop_incomplete)
        covered = n_batches * size * world_size
        padded += max(covered - count, 0)
        skipped += max(count - covered, 0)
        if n_batches:
            step_tokens.append(size * Bin.parse(name).tokens(patch_size))
            step_counts.append(n_batches)
    real = sum(bin_total(shards) for shards in counts.values())
    tokens, weights = np.array(step_tokens, dtype=np.float64), np.array(step_counts, dtype=np.float64)
    mean = float(np.average(tokens, weights=weights)) if len(tokens) else 0.0
    std = float(np.sqrt(np.average((tokens - mean) ** 2, weights=weights))) if len(tokens) else 0.0
    return {
        "steps_per_epoch": int(weights.sum()),
        "real_samples": int(real),
        "padded_samples": int(padded),
        "padding_fraction": padded / real if real else 0.0,
        "skipped_samples": int(skipped),
        "tokens_per_step_mean": mean,
        "tokens_per_step_min": int(tokens.min()) if len(tokens) else 0,
        "tokens_per_step_max": int(tokens.max()) if len(tokens) else 0,
        "tokens_per_step_cv": std / mean if mean else 0.0,
    }
