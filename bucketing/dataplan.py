"""Pure functions of the data plan: which samples of a batch are padding, training crops and the boxes they
move, hashing that ignores Python's hash seed, and cutting patients into build parts.

numpy only (no torch, no I/O): seed, epoch, rank and world size are explicit arguments, so every function is
tested over many world sizes and shapes without a GPU. The loader (``radstream.shards.loader``) and the build plan
(``radstream.shards.builder.plan``) call these.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from radstream.bucketing.schedule import (
    BatchSize,
    ShardCounts,
    _batch_size_of,
    _check,
    bin_sequence,
    bin_total,
)

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that does not depend on Python's hash randomisation."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def assign_parts(patients: Sequence[str], part_size: int, seed: int) -> np.ndarray:
    """Cut whole patients into parts of about ``part_size`` images, independent of the number of tasks.

    Patients are taken in an order hashed from (seed, patient id); a part is closed once it holds
    ``part_size`` images or more, so no patient is split and parts differ from the target by less than one
    patient's images.

    Returns:
        int64 [len(patients)], the part of each entry.
    """
    unique, inverse, sizes = np.unique(
        np.array(patients, dtype=object), return_inverse=True, return_counts=True
    )
    order = sorted(range(len(unique)), key=lambda i: stable_hash("part", seed, unique[i]))
    part_of_patient = np.zeros(len(unique), dtype=np.int64)
    part, filled = 0, 0
    for i in order:
        if filled >= part_size:
            part, filled = part + 1, 0
        part_of_patient[i] = part
        filled += int(sizes[i])
    return part_of_patient[inverse]


def crop_params(
    rng: np.random.Generator,
    count: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> np.ndarray:
    """Random resized crops (torchvision's algorithm, vectorized), the aspect range relative to the image's.

    Each crop takes the first of 10 (area, aspect) draws that fits inside the image, else the whole image.

    Args:
        rng: the draws come from here (seeded by the caller from seed, epoch, rank and step).
        count: crops to draw.
        height: image height in pixels.
        width: image width in pixels.
        scale: (low, high) of the crop's area as a fraction of the image's.
        ratio: (low, high) of the crop's aspect ratio relative to the image's.

    Returns:
        int64 [count, 4]: (top, left, crop height, crop width) per crop.
    """
    area, aspect = height * width, width / height
    scale = rng.uniform(scale[0], scale[1], (count, _CROP_ATTEMPTS))
    ratio = aspect * np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (count, _CROP_ATTEMPTS)))
    w, h = np.rint(np.sqrt(area * scale * ratio)), np.rint(np.sqrt(area * scale / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first, found = fits.argmax(1), fits.any(1)
    pick = np.arange(count)
    h = np.where(found, h[pick, first], height).astype(np.int64)
    w = np.where(found, w[pick, first], width).astype(np.int64)
    corner = rng.random((count, 2))
    top = np.floor(corner[:, 0] * (height - h + 1)).astype(np.int64)
    left = np.floor(corner[:, 1] * (width - w + 1)).astype(np.int64)
    return np.stack([top, left, h, w], 1)


def transform_boxes(
    boxes: np.ndarray, crops: np.ndarray, flips: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Foreground boxes [B, 4] (y0, x0, y1, x1) through crops (top, left, h, w) resized to (height, width)
    and horizontal flips; rounded outwards so the box never loses foreground, clipped to the image."""
    sy, sx = height / crops[:, 2], width / crops[:, 3]
    y0 = np.floor((boxes[:, 0] - crops[:, 0]) * sy)
    y1 = np.ceil((boxes[:, 2] - crops[:, 0]) * sy)
    x0 = np.floor((boxes[:, 1] - crops[:, 1]) * sx)
    x1 = np.ceil((boxes[:, 3] - crops[:, 1]) * sx)
    x0, x1 = np.where(flips, width - x1, x0), np.where(flips, width - x0, x1)
    out = np.stack(
        [np.clip(y0, 0, height), np.clip(x0, 0, width), np.clip(y1, 0, height), np.clip(x1, 0, width)], 1
    )
    out[:, 2], out[:, 3] = np.maximum(out[:, 2], out[:, 0]), np.maximum(out[:, 3], out[:, 1])
    return out.astype(np.int64)


def padding_masks(
    counts: Mapping[str, ShardCounts],
    batch_sizes: BatchSize,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    drop_incomplete: bool,
) -> list[np.ndarray]:
    """Per step of ``rank``, which samples are first appearances in the epoch's global batch order (steps in
    order, ranks in order within a step).

    A bin's global batches cut its bin order front to back and wrap around it (``epoch_schedule``), so the
    sample at place ``p`` of the order is a repeat exactly when ``p >= count``: each sample sits at one place
    below ``count``, and every earlier place comes earlier in the global order. So only this rank's places
    are needed, O(N / W) at an epoch boundary instead of every rank's schedule (O(N) per rank, W ranks).
    """
    _check(counts, world_size, rank)
    sequence = bin_sequence(
        counts, batch_sizes, seed=seed, epoch=epoch, world_size=world_size, drop_incomplete=drop_incomplete
    )
    totals = {name: bin_total(counts[name]) for name in set(sequence)}
    batches = dict.fromkeys(totals, 0)
    masks = []
    for name in sequence:
        size = _batch_size_of(batch_sizes, name)
        first = (batches[name] * world_size + rank) * size  # this rank's first place in the bin order
        masks.append(first + np.arange(size) < totals[name])
        batches[name] += 1
    return masks
