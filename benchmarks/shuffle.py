"""What shard-local shuffling costs in randomness, on a synthetic samples table (no images, seconds).

A table of ``--patients`` patients with 1–6 radiographs each (geometric), one body-region label per patient
(skewed over ``--classes`` classes), cut into shards of ``--per-shard`` samples in one of two stored orders:

- build order: whole patients in parts of ``--part-size`` images, each part's images in a hashed order (what
  ``radstream.shards.builder`` writes), so a shard is a random draw from its part;
- patient order: each patient's images next to each other, patients in random order (a writer that keeps
  studies together: the worst case for a small shuffle block).

For each ``loader.shuffle_block`` value (0 = today's uniform shuffle) it prints the mean distinct shards,
distinct patients and label entropy (bits) per batch of one epoch, and the most distinct shards any
``--window`` consecutive steps read (what the node cache must hold at once).

    python benchmarks/shuffle.py --blocks 0,1,2,4,8,16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from radstream.bucketing.schedule import epoch_schedule  # noqa: E402


def synthetic_table(args, order: str) -> tuple[np.ndarray, np.ndarray]:
    """(patient, label) per sample in stored order."""
    rng = np.random.default_rng(0)
    images = np.minimum(rng.geometric(0.5, args.patients), 6)
    weights = 1 / np.arange(1, args.classes + 1)  # a few common regions, a long tail
    region = rng.choice(args.classes, args.patients, p=weights / weights.sum())
    perm = rng.permutation(args.patients)  # patients in random order, each one's images together
    patient = np.repeat(perm, images[perm])
    if order == "build":
        first_image = np.cumsum(images[perm]) - images[perm]
        part = np.repeat(first_image // args.part_size, images[perm])  # parts of whole patients
        patient = patient[np.lexsort((rng.random(len(patient)), part))]  # the hashed order within a part
    return patient, region[patient]


def entropy_bits(values: np.ndarray) -> float:
    p = np.unique(values, return_counts=True)[1] / len(values)
    return float(-(p * np.log2(p)).sum())


def mix(patient: np.ndarray, label: np.ndarray, block: int, args) -> list[str]:
    shards = [args.per_shard] * (len(patient) // args.per_shard) + [len(patient) % args.per_shard]
    shards = [s for s in shards if s]
    shard_of = np.repeat(np.arange(len(shards)), shards)
    steps = epoch_schedule(
        {"224x224": shards}, args.batch_size, seed=0, epoch=0, world_size=1, rank=0, shuffle_block=block
    )
    per_batch = np.array(
        [
            (len(set(shard_of[i])), len(set(patient[i])), entropy_bits(label[i]))
            for i in (np.asarray(s.indices) for s in steps)
        ]
    )
    touched = [set(shard_of[list(s.indices)].tolist()) for s in steps]
    window = max(
        len(set().union(*touched[i : i + args.window])) for i in range(len(touched) - args.window + 1)
    )
    shards_mean, patients_mean, entropy_mean = per_batch.mean(0)
    return [
        str(block),
        f"{window} of {len(shards)}",
        f"{shards_mean:.1f}",
        f"{patients_mean:.1f}",
        f"{entropy_mean:.2f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-shard", type=int, default=256, help="samples per shard")
    parser.add_argument("--part-size", type=int, default=10000, help="images per build part")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks", default="0,1,2,4,8,16")
    parser.add_argument("--window", type=int, default=8, help="steps of the window whose shards are counted")
    args = parser.parse_args(argv)
    for order in ("build", "patient"):
        patient, label = synthetic_table(args, order)
        print(
            f"\n{order} order: {len(patient)} samples of {args.patients} patients in shards of {args.per_shard}, "
            f"batch {args.batch_size}; label entropy of the whole table {entropy_bits(label):.2f} bits\n"
        )
        print(
            f"| shuffle_block | most shards in {args.window} steps | shards/batch | patients/batch | label entropy/batch |"
        )
        print("|---|---|---:|---:|---:|")
        for block in (int(b) for b in args.blocks.split(",")):
            print("| " + " | ".join(mix(patient, label, block, args)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
