"""The batch schedule over many world sizes: equal steps, same bin per step, exact coverage, bounded padding."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from radstream.bucketing import (
    Step,
    epoch_schedule,
    schedule_stats,
    steps_per_epoch,
    token_budget_batch_sizes,
)

# Uneven bins: a large one, a middling one, one smaller than a global batch at world size ≥ 2, one with a
# single sample, and an empty one.
COUNTS = {"224x224": 103, "192x256": 40, "256x192": 5, "160x304": 1, "304x160": 0}
WORLD_SIZES = [1, 2, 3, 4, 8]


def all_ranks(counts, batch_size, world_size, *, seed=0, epoch=0, drop_incomplete=False) -> list[list[Step]]:
    return [
        epoch_schedule(
            counts,
            batch_size,
            seed=seed,
            epoch=epoch,
            world_size=world_size,
            rank=rank,
            drop_incomplete=drop_incomplete,
        )
        for rank in range(world_size)
    ]


def multiplicities(schedules: list[list[Step]]) -> dict[str, Counter]:
    seen: dict[str, Counter] = {}
    for schedule in schedules:
        for step in schedule:
            seen.setdefault(step.bin, Counter()).update(step.indices)
    return seen


def check_lockstep(schedules: list[list[Step]], batch_size) -> None:
    """Every rank has the same number of steps, the same bin at each step and full batches."""
    assert len({len(s) for s in schedules}) == 1
    for steps in zip(*schedules, strict=True):
        assert len({step.bin for step in steps}) == 1
        expected = batch_size if isinstance(batch_size, int) else batch_size[steps[0].bin]
        assert all(len(step.indices) == expected for step in steps)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_size", [4, {"224x224": 4, "192x256": 3, "256x192": 8, "160x304": 2}])
def test_padded_schedule_covers_every_sample(world_size: int, batch_size) -> None:
    schedules = all_ranks(COUNTS, batch_size, world_size)
    check_lockstep(schedules, batch_size)
    assert len(schedules[0]) == steps_per_epoch(COUNTS, batch_size, world_size)
    seen = multiplicities(schedules)
    assert "304x160" not in seen
    for name, count in COUNTS.items():
        if count == 0:
            continue
        size = batch_size if isinstance(batch_size, int) else batch_size[name]
        global_batch = size * world_size
        mult = seen[name]
        assert set(mult) == set(range(count))  # every sample, nothing outside the bin
        padding = sum(mult.values()) - count
        assert padding == -(-count // global_batch) * global_batch - count
        assert 0 <= padding <= global_batch - 1
        assert max(mult.values()) - min(mult.values()) <= 1  # wrap-around repeats samples evenly


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_drop_incomplete_drops_exactly_the_remainders(world_size: int) -> None:
    batch_size = 4
    schedules = all_ranks(COUNTS, batch_size, world_size, drop_incomplete=True)
    check_lockstep(schedules, batch_size)
    assert len(schedules[0]) == steps_per_epoch(COUNTS, batch_size, world_size, drop_incomplete=True)
    seen = multiplicities(schedules)
    global_batch = batch_size * world_size
    for name, count in COUNTS.items():
        used = seen.get(name, Counter())
        assert all(n == 1 for n in used.values())  # no sample twice
        assert set(used) <= set(range(count))
        assert count - len(used) == count % global_batch
    stats = schedule_stats(COUNTS, batch_size, world_size, True, 16)
    assert stats["skipped_samples"] == sum(c % global_batch for c in COUNTS.values())
    assert stats["padded_samples"] == 0


def test_random_configurations_keep_the_contract() -> None:
    rng = np.random.default_rng(123)
    for _ in range(60):
        names = [
            f"{16 * int(h)}x{16 * int(w)}" for h, w in rng.integers(1, 30, size=(int(rng.integers(1, 6)), 2))
        ]
        counts = {name: int(rng.integers(0, 60)) for name in names}
        world_size, batch_size = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        drop = bool(rng.integers(0, 2))
        schedules = all_ranks(
            counts, batch_size, world_size, seed=int(rng.integers(0, 1000)), drop_incomplete=drop
        )
        check_lockstep(schedules, batch_size)
        global_batch = batch_size * world_size
        seen = multiplicities(schedules)
        for name, count in counts.items():
            total = sum(seen.get(name, Counter()).values())
            if drop:
                assert total == count - count % global_batch and len(seen.get(name, ())) == total
            else:
                assert set(seen.get(name, ())) == set(range(count))
                assert count <= total <= count + global_batch - 1
        stats = schedule_stats(counts, batch_size, world_size, drop, 16)
        assert stats["steps_per_epoch"] == len(schedules[0])


def test_deterministic_per_seed_and_epoch() -> None:
    base = all_ranks(COUNTS, 4, 2, seed=7, epoch=3)
    assert base == all_ranks(COUNTS, 4, 2, seed=7, epoch=3)
    assert base == all_ranks(dict(reversed(list(COUNTS.items()))), 4, 2, seed=7, epoch=3)  # dict order
    assert base != all_ranks(COUNTS, 4, 2, seed=7, epoch=4)
    assert base != all_ranks(COUNTS, 4, 2, seed=8, epoch=3)


def test_independent_of_python_hash_seed() -> None:
    code = (
        "from bucketing import epoch_schedule;"
        "print(epoch_schedule({'224x224': 50, '192x256': 30}, 4, seed=1, epoch=2, world_size=2, rank=1))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout
        for hash_seed in ("1", "2", "3")
    }
    assert len(outputs) == 1


def test_bins_are_interleaved() -> None:
    schedule = epoch_schedule({"224x224": 80, "192x256": 80}, 4, seed=0, epoch=0, world_size=1, rank=0)
    order = [step.bin for step in schedule]
    assert Counter(order) == {"224x224": 20, "192x256": 20}
    assert order != sorted(order) and order != sorted(order, reverse=True)
    switches = sum(a != b for a, b in zip(order, order[1:], strict=False))
    assert switches >= 10  # far from one bin after another


def test_token_budget_batch_sizes() -> None:
    sizes = token_budget_batch_sizes(["224x224", "112x112", "448x448", "224x448"], 1568, 16)
    assert sizes == {"224x224": 8, "112x112": 32, "448x448": 2, "224x448": 4}
    assert token_budget_batch_sizes(["112x112", "448x448"], 1568, 16, max_batch=16) == {
        "112x112": 16,
        "448x448": 2,
    }
    # Rounded down to a multiple, but never below it (a bin larger than the budget still gets a batch).
    capped = token_budget_batch_sizes(["224x224", "448x448", "896x896"], 1568 + 300, 16, multiple_of=4)
    assert capped == {"224x224": 8, "448x448": 4, "896x896": 4}
    with pytest.raises(ValueError):
        token_budget_batch_sizes(["200x224"], 1568, 16)


def test_token_budgets_even_out_tokens_per_step() -> None:
    counts = {"224x224": 400, "112x112": 900, "448x448": 120, "224x448": 200}
    single = schedule_stats(counts, 8, 2, False, 16)
    budget = token_budget_batch_sizes(list(counts), 1568, 16)
    balanced = schedule_stats(counts, budget, 2, False, 16)
    assert balanced["tokens_per_step_cv"] < single["tokens_per_step_cv"]
    assert balanced["tokens_per_step_min"] == balanced["tokens_per_step_max"] == 1568
    assert single["tokens_per_step_min"] == 8 * 49 and single["tokens_per_step_max"] == 8 * 784
    schedule = epoch_schedule(counts, budget, seed=0, epoch=0, world_size=2, rank=0)
    assert all(len(step.indices) == budget[step.bin] for step in schedule)


def test_schedule_stats_hand_example() -> None:
    stats = schedule_stats({"224x224": 10}, 4, 1, False, 16)
    assert stats["steps_per_epoch"] == 3
    assert stats["padded_samples"] == 2 and stats["padding_fraction"] == pytest.approx(0.2)
    assert stats["skipped_samples"] == 0
    assert stats["tokens_per_step_mean"] == 4 * 196 and stats["tokens_per_step_cv"] == 0.0
    dropped = schedule_stats({"224x224": 10, "112x112": 3}, 4, 1, True, 16)
    assert dropped["steps_per_epoch"] == 2 and dropped["skipped_samples"] == 2 + 3
    assert dropped["padded_samples"] == 0
    assert schedule_stats({}, 4, 1, False, 16)["steps_per_epoch"] == 0


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        epoch_schedule(COUNTS, 4, seed=0, epoch=0, world_size=2, rank=2)
    with pytest.raises(ValueError):
        epoch_schedule(COUNTS, 4, seed=0, epoch=0, world_size=0, rank=0)
    with pytest.raises(ValueError):
        epoch_schedule({"224x224": -1}, 4, seed=0, epoch=0, world_size=1, rank=0)
    with pytest.raises(ValueError):
        epoch_schedule({"224x224": 3}, {"192x256": 4}, seed=0, epoch=0, world_size=1, rank=0)
    with pytest.raises(ValueError):
        epoch_schedule({"224x224": 3}, 0, seed=0, epoch=0, world_size=1, rank=0)
    with pytest.raises(ValueError):
        epoch_schedule({"224x224": 3}, 4, seed=-1, epoch=0, world_size=1, rank=0)


def test_a_ranks_steps_hold_only_its_share_of_the_order() -> None:
    # a step's indices are a numpy view (no Python int per sample) of this rank's share alone: a view of the
    # whole epoch's order would keep every rank's samples alive as long as the steps (O(N), not O(N/W))
    counts, world = {"64x64": 4000, "32x32": 1000}, 16
    steps = epoch_schedule(counts, 8, seed=0, epoch=0, world_size=world, rank=3)
    for step in steps:
        assert step.indices.dtype == np.int64 and len(step.indices) == 8
        held = step.indices.base if step.indices.base is not None else step.indices
        assert held.size <= -(-counts[step.bin] // world) + 8  # this rank's share (and its padding)
