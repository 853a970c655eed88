"""The pure functions of the data plan, over many world sizes and shapes (no torch, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from radstream.bucketing.dataplan import (
    assign_parts,
    crop_params,
    padding_masks,
    stable_hash,
    transform_boxes,
)
from radstream.bucketing.schedule import epoch_schedule

SHAPES = [(64, 128), (224, 224), (384, 160), (16, 16)]


def test_crop_params_respect_scale_and_ratio() -> None:
    rng = np.random.default_rng(0)
    crops = crop_params(rng, 500, 64, 128, scale=[0.5, 1.0], ratio=[1.0, 1.0])
    top, left, h, w = crops.T
    assert ((top >= 0) & (top <= 64 - h) & (left >= 0) & (left <= 128 - w)).all()
    assert ((h * w / (64 * 128) >= 0.45) & (np.abs(w / h - 2.0) < 0.1)).all()
    assert len({tuple(c) for c in crops.tolist()}) > 400  # really random
    whole = crop_params(rng, 5, 64, 128, scale=[1.0, 1.0], ratio=[4.0, 4.0])
    assert whole.tolist() == [[0, 0, 64, 128]] * 5  # nothing fits: the whole image


@pytest.mark.parametrize("height,width", SHAPES)
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.5, 0.5), (1.0, 1.0)])
def test_crops_lie_inside_the_image_and_repeat_with_the_seed(height, width, scale) -> None:
    crops = crop_params(np.random.default_rng(3), 200, height, width, scale, (3 / 4, 4 / 3))
    top, left, h, w = crops.T
    assert crops.dtype == np.int64 and crops.shape == (200, 4)
    assert ((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0)).all()
    assert ((top + h <= height) & (left + w <= width)).all()
    assert (h * w <= height * width).all()
    again = crop_params(np.random.default_rng(3), 200, height, width, scale, (3 / 4, 4 / 3))
    assert np.array_equal(crops, again)


def test_transform_boxes_follow_crop_and_flip() -> None:
    boxes = np.array([[10, 20, 30, 60], [0, 0, 64, 128]])
    crops = np.array([[10, 20, 32, 64], [0, 0, 64, 128]])
    assert transform_boxes(boxes, crops, np.array([False, False]), 64, 128).tolist() == [
        [0, 0, 40, 80],
        [0, 0, 64, 128],
    ]
    assert transform_boxes(boxes, crops, np.array([True, True]), 64, 128).tolist() == [
        [0, 48, 40, 128],
        [0, 0, 64, 128],
    ]
    outside = transform_boxes(
        np.array([[0, 0, 8, 8]]), np.array([[32, 64, 32, 64]]), np.array([False]), 64, 128
    )
    assert outside[0, 0] == outside[0, 2]  # no foreground in view: an empty box


def _random_boxes(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    ys, xs = (
        np.sort(rng.integers(0, height + 1, (count, 2)), 1),
        np.sort(rng.integers(0, width + 1, (count, 2)), 1),
    )
    return np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], 1)


@pytest.mark.parametrize("height,width", SHAPES)
def test_boxes_stay_in_the_image_and_whole_crops_keep_them(height, width) -> None:
    rng = np.random.default_rng(height * width)
    boxes = _random_boxes(rng, 100, height, width)
    whole = np.tile([0, 0, height, width], (100, 1))
    no_flip, flip = np.zeros(100, dtype=bool), np.ones(100, dtype=bool)
    assert np.array_equal(transform_boxes(boxes, whole, no_flip, height, width), boxes)
    mirrored = boxes.copy()
    mirrored[:, 1], mirrored[:, 3] = width - boxes[:, 3], width - boxes[:, 1]
    assert np.array_equal(transform_boxes(boxes, whole, flip, height, width), mirrored)
    crops = crop_params(rng, 100, height, width, (0.2, 1.0), (0.5, 2.0))
    out = transform_boxes(boxes, crops, rng.random(100) < 0.5, height, width)
    assert ((out[:, 0] <= out[:, 2]) & (out[:, 1] <= out[:, 3])).all()
    assert (out >= 0).all() and (out[:, [0, 2]] <= height).all() and (out[:, [1, 3]] <= width).all()


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("drop_incomplete", [False, True])
def test_padding_masks_mark_each_sample_once_per_epoch(world_size, drop_incomplete) -> None:
    counts, batch = {"224x224": 37, "224x288": 5, "160x320": 64}, {"224x224": 4, "224x288": 3, "160x320": 8}
    args = {"seed": 11, "epoch": 2, "world_size": world_size, "drop_incomplete": drop_incomplete}
    seen = {name: np.zeros(n, dtype=np.int64) for name, n in counts.items()}
    for rank in range(world_size):
        steps = epoch_schedule(counts, batch, rank=rank, **args)
        masks = padding_masks(counts, batch, rank=rank, **args)
        assert len(masks) == len(steps)
        for step, mask in zip(steps, masks, strict=True):
            assert mask.dtype == bool and len(mask) == len(step.indices)
            np.add.at(seen[step.bin], np.asarray(step.indices)[mask], 1)
    for name, hits in seen.items():
        assert hits.max() <= 1, name  # no sample valid twice
        if not drop_incomplete:
            assert hits.min() == 1, name  # and, padded, every sample valid once


def _walked_masks(counts, batch, *, world_size: int, rank: int, **args) -> list[np.ndarray]:
    """The masks by their definition: walk every rank's schedule (steps in order, ranks in order within a
    step) and flag what was seen before (O(W x N): the oracle, not the loader's way)."""
    per_rank = [
        epoch_schedule(counts, batch, world_size=world_size, rank=r, **args) for r in range(world_size)
    ]
    seen = {name: np.zeros(n, dtype=bool) for name, n in counts.items()}
    masks = []
    for s, step in enumerate(per_rank[rank]):
        for r in range(world_size):
            idx = np.asarray(per_rank[r][s].indices, dtype=np.int64)
            first = np.zeros(len(idx), dtype=bool)
            first[np.unique(idx, return_index=True)[1]] = True
            if r == rank:
                masks.append(first & ~seen[step.bin][idx])
            seen[step.bin][idx] = True
    return masks


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8, 13, 40])
def test_padding_masks_are_this_ranks_places_and_match_the_walk_over_every_rank(world_size) -> None:
    # bins larger than a global batch, one smaller (cycled more than once at 40 ranks), per-bin batch sizes
    counts, batch = {"224x224": 101, "224x288": 5, "160x320": 64}, {"224x224": 4, "224x288": 3, "160x320": 8}
    args = {"seed": 3, "epoch": 1, "drop_incomplete": False}
    expected = {
        r: _walked_masks(counts, batch, world_size=world_size, rank=r, **args) for r in range(world_size)
    }
    for rank in range(world_size):
        masks = padding_masks(counts, batch, world_size=world_size, rank=rank, **args)
        assert len(masks) == len(expected[rank])
        for got, want in zip(masks, expected[rank], strict=True):
            assert np.array_equal(got, want)


def test_stable_hash_ignores_the_interpreter_hash_seed() -> None:
    assert stable_hash("part", 0, "patient-1") == stable_hash("part", 0, "patient-1")
    assert stable_hash("part", 0, "patient-1") != stable_hash("part", 1, "patient-1")
    assert stable_hash("a", "bc") != stable_hash("ab", "c")  # parts are separated
    assert stable_hash(1, "x") == 6343199631984200525


@pytest.mark.parametrize("part_size", [1, 3, 10, 1000])
@pytest.mark.parametrize("patients_count", [1, 7, 50])
def test_parts_keep_patients_whole_and_sized(part_size, patients_count) -> None:
    rng = np.random.default_rng(part_size + patients_count)
    sizes = rng.integers(1, 6, patients_count)
    patients = [f"p{i}" for i, n in enumerate(sizes) for _ in range(n)]
    parts = assign_parts(patients, part_size, seed=5)
    assert parts.dtype == np.int64 and len(parts) == len(patients)
    of_patient = {}
    for patient, part in zip(patients, parts.tolist(), strict=True):
        assert of_patient.setdefault(patient, part) == part  # a patient is never split
    per_part = np.bincount(parts)
    assert set(parts.tolist()) == set(range(len(per_part)))  # parts are numbered densely
    assert (per_part[:-1] >= part_size).all()
    assert (per_part < part_size + sizes.max()).all()
    shuffled = rng.permutation(len(patients))
    again = assign_parts([patients[i] for i in shuffled], part_size, seed=5)
    assert np.array_equal(again, parts[shuffled])  # a patient's part does not depend on the input order


def test_importable_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, radstream.bucketing.dataplan; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
