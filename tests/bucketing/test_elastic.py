"""Elastic resume: an epoch stopped after s steps at world size W and finished at W' (then maybe W'') trains
every sample of the epoch exactly once, up to the documented padding, over many shapes and (W, W', s)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from radstream.bucketing import bin_order, bin_total, epoch_schedule
from radstream.bucketing.dataplan import padding_masks
from radstream.bucketing.elastic import remaining_padding_masks, remaining_schedule


def random_case(seed: int) -> dict:
    """1–3 bins of 0–12 shards of 1–9 samples, batch sizes, a shuffle block, pad or drop."""
    rng = np.random.default_rng(seed)
    counts = {
        f"{16 * (b + 1)}x{16 * (b + 2)}": [int(n) for n in rng.integers(1, 10, int(rng.integers(0, 13)))]
        for b in range(int(rng.integers(1, 4)))
    }
    batch = {name: int(rng.integers(1, 6)) for name in counts}
    return {
        "counts": counts,
        "batch_size": batch if rng.integers(0, 2) else int(rng.integers(1, 6)),
        "shuffle_block": int(rng.choice([0, 1, 2, 50])),
        "drop_incomplete": bool(rng.integers(0, 2)),
        "seed": int(rng.integers(0, 1000)),
        "epoch": int(rng.integers(0, 4)),
    }


def size_of(batch_size, name: str) -> int:
    return batch_size if isinstance(batch_size, int) else batch_size[name]


def plain_seen(case: dict, world: int, steps: int) -> Counter:
    """(bin, sample) -> times trained as a first appearance in the first ``steps`` steps, all ranks."""
    seen = Counter()
    args = {("batch_sizes" if k == "batch_size" else k): v for k, v in case.items() if k != "shuffle_block"}
    for r in range(world):
        sched = epoch_schedule(**case, world_size=world, rank=r)[:steps]
        masks = padding_masks(**args, world_size=world, rank=r)
        for step, valid in zip(sched, masks, strict=False):
            seen.update((step.bin, i) for i, ok in zip(step.indices, valid, strict=True) if ok)
    return seen


def rest_seen(case: dict, consumed: list, world: int) -> tuple[Counter, Counter, int]:
    """The remaining stretch at ``world``: (first appearances, repeats per bin, steps), checking that every
    rank has the same steps and bins."""
    seen, repeats, bins = Counter(), Counter(), None
    mask_args = {k: v for k, v in case.items() if k != "shuffle_block"}
    for r in range(world):
        sched = remaining_schedule(**case, consumed=consumed, world_size=world, rank=r)
        masks = remaining_padding_masks(**mask_args, consumed=consumed, world_size=world, rank=r)
        assert len(masks) == len(sched)
        bins = bins or [s.bin for s in sched]
        assert [s.bin for s in sched] == bins  # one bin per step, the same on every rank
        for step, valid in zip(sched, masks, strict=True):
            assert len(step.indices) == size_of(case["batch_size"], step.bin)
            seen.update((step.bin, i) for i, ok in zip(step.indices, valid, strict=True) if ok)
            repeats[step.bin] += int((~valid).sum())
    return seen, repeats, len(bins or [])


def check_epoch(case: dict, seen: Counter, worlds: list[int]) -> None:
    """Each sample at most once; pad mode: all of them; drop mode: fewer than batch x max(world) missing."""
    assert max(seen.values(), default=1) == 1
    for name, shards in case["counts"].items():
        missing = bin_total(shards) - sum(1 for b, _ in seen if b == name)
        if case["drop_incomplete"]:
            assert 0 <= missing < size_of(case["batch_size"], name) * max(worlds)
        else:
            assert missing == 0
    assert all(0 <= i < bin_total(case["counts"][b]) for b, i in seen)


@pytest.mark.parametrize("seed", range(60))
def test_stop_at_w_resume_at_w2_trains_each_sample_once(seed: int) -> None:
    case = random_case(seed)
    rng = np.random.default_rng(1000 + seed)
    old, new = (int(w) for w in rng.integers(1, 7, 2))
    total = len(epoch_schedule(**case, world_size=old, rank=0))
    for stop in sorted({0, total, int(rng.integers(0, total + 1))}):
        consumed = plain_seen(case, old, stop)
        rest, repeats, _ = rest_seen(case, [(old, stop)], new)
        assert not set(consumed) & set(rest), (old, new, stop)
        check_epoch(case, consumed + rest, [old, new])
        for name, n in repeats.items():  # the documented padding of the rest
            assert n < size_of(case["batch_size"], name) * new
            assert n == 0 or not case["drop_incomplete"]


@pytest.mark.parametrize("seed", range(20))
def test_a_resumed_epoch_resumed_again_at_a_third_size(seed: int) -> None:
    case = random_case(seed)
    rng = np.random.default_rng(2000 + seed)
    w0, w1, w2 = (int(w) for w in rng.integers(1, 6, 3))
    s0 = int(rng.integers(0, len(epoch_schedule(**case, world_size=w0, rank=0)) + 1))
    first = plain_seen(case, w0, s0)
    _, _, n1 = rest_seen(case, [(w0, s0)], w1)
    s1 = int(rng.integers(0, n1 + 1))
    second = Counter()
    mask_args = {k: v for k, v in case.items() if k != "shuffle_block"}
    for r in range(w1):
        sched = remaining_schedule(**case, consumed=[(w0, s0)], world_size=w1, rank=r)[:s1]
        masks = remaining_padding_masks(**mask_args, consumed=[(w0, s0)], world_size=w1, rank=r)
        for step, valid in zip(sched, masks, strict=False):
            second.update((step.bin, i) for i, ok in zip(step.indices, valid, strict=True) if ok)
    third, _, _ = rest_seen(case, [(w0, s0), (w1, s1)], w2)
    check_epoch(case, first + second + third, [w0, w1, w2])


def test_the_small_example_of_the_docs() -> None:
    """One bin of 10, batch 2, 1 step at W = 2, resumed at W' = 3 and at W' = 4 (one step each)."""
    case = {"counts": {"16x16": 10}, "batch_size": 2, "seed": 0, "epoch": 0}
    order = bin_order(10, name="16x16", seed=0, epoch=0).tolist()
    at3 = [remaining_schedule(**case, consumed=[(2, 1)], world_size=3, rank=r) for r in range(3)]
    assert [[s.indices.tolist() for s in rank] for rank in at3] == [
        [order[4 + 2 * r : 6 + 2 * r]] for r in range(3)
    ]
    at4 = [remaining_schedule(**case, consumed=[(2, 1)], world_size=4, rank=r) for r in range(4)]
    assert [len(rank) for rank in at4] == [1] * 4
    assert at4[3][0].indices.tolist() == [order[0], order[1]]  # places 10, 11 wrap around
    masks = remaining_padding_masks(**case, consumed=[(2, 1)], world_size=4, rank=3)
    assert masks[0].tolist() == [False, False]


def test_same_world_size_gives_the_same_batches_as_the_plain_rest() -> None:
    case = random_case(7) | {"drop_incomplete": False}
    plain = epoch_schedule(**case, world_size=3, rank=1)
    rest = remaining_schedule(**case, consumed=[(3, 4)], world_size=3, rank=1)
    assert Counter(plain[4:]) == Counter(rest)


def test_more_steps_than_the_stretch_had_is_an_error() -> None:
    case = {"counts": {"16x16": [4, 4]}, "batch_size": 2, "seed": 0, "epoch": 0}
    with pytest.raises(ValueError, match="stretch 0"):
        remaining_schedule(**case, consumed=[(2, 3)], world_size=1, rank=0)
