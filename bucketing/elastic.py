"""Elastic resume: the rest of an epoch, after part of it was trained at other world sizes, dealt to new ranks.

Every bin's *bin order* (:func:`radstream.bucketing.schedule.bin_order`) is independent of the world size, and the
schedule cuts it front to back into global batches. So after ``s`` steps at world size ``W``, bin ``b`` has
used exactly the first ``used_b = sequence[:s].count(b) x batch_size[b] x W`` places of its order
(:func:`radstream.bucketing.schedule.bin_sequence`), whatever the rank; its not yet seen samples are
``order[used_b:]`` (none when ``used_b >= count``: the bin's padded last batch was trained).

The rest is dealt exactly like a whole epoch, at the new world size ``W'``: each bin's remaining places are
cut into global batches of ``batch_size[b] x W'``, rank ``r`` takes the ``r``-th slice of each, and the global
batches of all bins are interleaved in one seeded order, the same on every rank. So the guarantees hold: one
bin per step, the same number of steps on every rank, each remaining sample exactly once, and

- padding (default): a bin's last incomplete global batch goes on around the bin order (place ``p`` is
  sample ``order[p % count]``), at most ``batch_size x W' - 1`` repeats per bin; a repeat is a place
  ``p >= count`` (:func:`remaining_padding_masks` flags it);
- ``drop_incomplete``: the last ``len(rest) % (batch_size x W')`` remaining samples of a bin are skipped.

Example: one bin of 10 samples, batch 2, trained 1 step at W = 2 (places 0-3 of its order used), resumed
at W' = 3: the remaining places 4..9 make one global batch of 6 — rank 0 gets places 4, 5; rank 1 6, 7;
rank 2 8, 9. At W' = 4 they make one global batch of 8, places 4..11: rank 3's places 10, 11 wrap around to
samples ``order[0]`` and ``order[1]`` (trained before, flagged as repeats).

A resume can itself be stopped and resumed at a third size: ``consumed`` lists every stretch of the epoch
already trained, as (world size, steps), in order; the first stretch is the plain schedule, each later one the
remaining schedule of the stretches before it. Later epochs are the plain schedule of the new world size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from radstream.bucketing.schedule import (
    BatchSize,
    ShardCounts,
    Step,
    _batch_size_of,
    _check,
    _rng,
    bin_order,
    bin_sequence,
    bin_total,
    interleave,
)

# The interleaving of a stretch after a resume; apart from the schedule's own streams (0, 1).
_ELASTIC_STREAM = 2


def _stretch(
    counts: Mapping[str, ShardCounts],
    batch_size: BatchSize,
    used: Mapping[str, int],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    stretch: int,
    drop_incomplete: bool,
) -> list[tuple[str, int]]:
    """The (bin, first place of its global batch) of every step of a stretch starting at places ``used``."""
    left = {name: max(bin_total(counts[name]) - start, 0) for name, start in used.items()}
    rng = _rng(seed, epoch, _ELASTIC_STREAM, stretch)
    next_place, steps = dict(used), []
    for name in interleave(left, batch_size, world_size, drop_incomplete, rng):
        steps.append((name, next_place[name]))
        next_place[name] += _batch_size_of(batch_size, name) * world_size
    return steps


def remaining_places(
    counts: Mapping[str, ShardCounts],
    batch_size: BatchSize,
    *,
    seed: int,
    epoch: int,
    consumed: Sequence[tuple[int, int]],
    world_size: int,
    drop_incomplete: bool = False,
) -> list[tuple[str, int]]:
    """Per remaining step (the same on every rank): its bin and the place in the bin order where its global
    batch of ``batch_size x world_size`` starts (see the module docstring)."""
    _check(counts, world_size)
    names = sorted(name for name, shards in counts.items() if bin_total(shards) > 0)
    used = dict.fromkeys(names, 0)
    for k, (world, steps) in enumerate(consumed):
        _check(counts, world)
        if k == 0:
            plain = bin_sequence(
                counts, batch_size, seed=seed, epoch=epoch, world_size=world, drop_incomplete=drop_incomplete
            )
            done = [(name, 0) for name in plain]
        else:
            done = _stretch(counts, batch_size, used, seed=seed, epoch=epoch, world_size=world, stretch=k,
                            drop_incomplete=drop_incomplete)  # fmt: skip
        if not 0 <= steps <= len(done):
            raise ValueError(
                f"stretch {k} of the epoch has {len(done)} steps at world size {world}, not {steps}"
            )
        for name, _ in done[:steps]:
            used[name] += _batch_size_of(batch_size, name) * world
    return _stretch(counts, batch_size, used, seed=seed, epoch=epoch, world_size=world_size,
                    stretch=len(consumed), drop_incomplete=drop_incomplete)  # fmt: skip


def remaining_schedule(
    counts: Mapping[str, ShardCounts],
    batch_size: BatchSize,
    *,
    seed: int,
    epoch: int,
    consumed: Sequence[tuple[int, int]],
    world_size: int,
    rank: int,
    drop_incomplete: bool = False,
    shuffle_block: int = 0,
) -> list[Step]:
    """The rest of an epoch for one rank of the new world size.

    Args:
        counts: per bin name, its per-shard sample counts (as for ``epoch_schedule``).
        batch_size: per-rank batch size, one for all bins or one per bin name.
        seed: the run's seed.
        epoch: the epoch number.
        consumed: the stretches of the epoch already trained, in order, as (world size, steps); the first at
            the plain schedule of its world size. Empty: the whole epoch remains (re-dealt, not the plain
            schedule's interleaving).
        world_size: the new number of ranks.
        rank: this rank, in ``[0, world_size)``.
        drop_incomplete: drop each bin's last incomplete global batch instead of padding it.
        shuffle_block: shards per shuffle block, as for ``epoch_schedule``.

    Returns:
        The same number of steps on every rank, with the same bin at every step index.

    Raises:
        ValueError: a stretch claims more steps than it had.
    """
    _check(counts, world_size, rank)
    places = remaining_places(counts, batch_size, seed=seed, epoch=epoch, consumed=consumed,
                              world_size=world_size, drop_incomplete=drop_incomplete)  # fmt: skip
    orders = {
        name: bin_order(counts[name], name=name, seed=seed, epoch=epoch, shuffle_block=shuffle_block)
        for name in {name for name, _ in places}
    }
    return [
        Step(name, orders[name][mine % len(orders[name])])
        for name, mine in _rank_places(places, batch_size, rank)
    ]


def remaining_padding_masks(
    counts: Mapping[str, ShardCounts],
    batch_size: BatchSize,
    *,
    seed: int,
    epoch: int,
    consumed: Sequence[tuple[int, int]],
    world_size: int,
    rank: int,
    drop_incomplete: bool = False,
) -> list[np.ndarray]:
    """Per step of :func:`remaining_schedule`, False where a sample is a padded repeat (a place past the end
    of its bin order: that sample was trained earlier in the epoch, or comes earlier in the rest)."""
    _check(counts, world_size, rank)
    places = remaining_places(counts, batch_size, seed=seed, epoch=epoch, consumed=consumed,
                              world_size=world_size, drop_incomplete=drop_incomplete)  # fmt: skip
    return [mine < bin_total(counts[name]) for name, mine in _rank_places(places, batch_size, rank)]


def _rank_places(
    places: Sequence[tuple[str, int]], batch_size: BatchSize, rank: int
) -> list[tuple[str, np.ndarray]]:
    """Per remaining step, its bin and this rank's places in the bin order (its slice of the global batch)."""
    out = []
    for name, start in places:
        size = _batch_size_of(batch_size, name)
        out.append((name, start + rank * size + np.arange(size)))
    return out
