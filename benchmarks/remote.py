"""Remote-read benchmark: one epoch from loopback S3 (moto) and HTTP, cold and warm cache, against local disk,
for today's uniform shuffle and for shard-local shuffle blocks, with what each costs in randomness.

Builds (once, into ``--work``) a synthetic shard dataset of at least 40 shards per split, starts moto's S3
server and a static HTTP server as separate processes on 127.0.0.1, publishes the dataset and reads one epoch
of the train split through the loader (``radstream.shards.loader.build_loader`` on the URL), timing each from opening
the dataset to the last batch:

- local: the local build folder;
- s3 cold / warm: ``s3://`` with an empty node cache (prefetching the schedule's shards ahead), then again;
- http cold / warm: the same from Python's static file server;
- s3 / http download only: the train split's shards fetched into an empty cache on the prefetch threads,
  nothing decoded: what the server alone delivers, so the ceiling of a cold epoch on that server.

Each ``--blocks`` value (``loader.shuffle_block``; 0 = uniform) is timed in its own rounds, local disk in the
same round as its baseline; the best of ``--repeats`` rounds counts and the spread is printed. The randomness
columns come from the same epoch's plans: distinct shards, distinct patients and label entropy per batch.

    python benchmarks/remote.py --n 2000 --blocks 0,1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from radstream.shards.builder.publish import publish  # noqa: E402
from radstream.shards.loader import build_loader  # noqa: E402
from radstream.shards.loader_config import LoaderConfig, RemoteConfig  # noqa: E402
from radstream.shards.manifest import read_manifest, read_samples  # noqa: E402
from radstream.shards.remote import open_dataset  # noqa: E402
from radstream.shards.transport import filesystem  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def build_dataset(work: Path, n: int, per_shard: int) -> Path:
    """A finalized shard dataset of ``n`` synthetic radiographs, ``per_shard`` samples per shard at most
    (built once per work folder, n and shard size)."""
    from radstream.core.config import load_config
    from radstream.ingest.synth import synthesize
    from radstream.shards.builder.config import BuildConfig
    from radstream.shards.builder.finalize import finalize
    from radstream.shards.builder.parts import run_build

    out = work / f"shards-{n}-{per_shard}"
    if (out / "manifest.json").is_file():
        return out
    synthesize(work / f"synth-{n}", n=n, seed=0, max_side=768, workers=os.cpu_count() or 1)
    overrides = [
        f"source={work / f'synth-{n}' / 'images'}",
        f"out={out}",
        "ingest.labels=folder",
        "binning.strategy=smart",
        "binning.num_bins=3",
        f"shards.max_samples_per_shard={per_shard}",
        "ingest.splits.fractions=[0.8,0.1,0.1]",
    ]
    cfg = load_config(BuildConfig, None, overrides)
    run_build(cfg)
    finalize(cfg)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int) -> subprocess.Popen:
    """Start a server process listening on 127.0.0.1:``port``; waits (at most 30 s) until it accepts."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not start within 30 s")


def start_servers(local: Path) -> tuple[list[subprocess.Popen], str, str]:
    """moto's S3 and Python's static HTTP server, each in its own process (so neither shares our GIL).

    Returns:
        (the processes, the S3 endpoint URL, the HTTP base URL of ``local``).
    """
    s3_port, http_port = free_port(), free_port()
    s3 = start_server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)], s3_port)
    http = start_server(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", str(local), str(http_port)], http_port
    )
    return [s3, http], f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{http_port}"


def epoch_through_loader(root: str, remote: RemoteConfig, block: int, args) -> tuple[int, float]:
    """(images, seconds to open) of one epoch of the train split through the loader."""
    start = time.perf_counter()
    loader = build_loader(loader_config(remote, block, args), root, "train", train=False)
    opened = time.perf_counter() - start
    try:
        return sum(len(batch["key"]) for batch in loader), opened
    finally:
        loader.close()


def loader_config(remote: RemoteConfig, block: int, args) -> LoaderConfig:
    return LoaderConfig(
        backend=args.backend,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_block=block,
        remote=remote,
    )


def entropy_bits(values: np.ndarray) -> float:
    """Shannon entropy (bits) of the distribution of ``values``."""
    p = np.unique(values, return_counts=True)[1] / len(values)
    return float(-(p * np.log2(p)).sum())


def batch_mix(local: Path, block: int, args) -> dict[str, float]:
    """How mixed one epoch's batches are (world size 1, train split): mean distinct shards, distinct patients
    and label entropy (bits) per batch; shards touched by the first 10% of steps; the split's label entropy."""
    loader = build_loader(loader_config(RemoteConfig(), block, args), local, "train", train=False)
    table = read_samples(local, "train", ["key", "patient_id"])
    patient = dict(zip(table["key"].to_pylist(), table["patient_id"].to_pylist(), strict=True))
    shards, patients, entropy, early = [], [], [], set()
    plans = loader.epoch_plans(0)
    for i, plan in enumerate(plans):
        b = loader.data.bins[plan.bin]
        shards.append(len(set(b.shard[plan.rows].tolist())))
        patients.append(len({patient[k] for k in b.keys[plan.rows]}))
        entropy.append(entropy_bits(b.label[plan.rows]))
        if i < max(len(plans) // 10, 1):
            early.update((plan.bin, s) for s in b.shard[plan.rows].tolist())
    labels = np.concatenate([b.label for b in loader.data.bins.values()])
    return {
        "shards": float(np.mean(shards)),
        "patients": float(np.mean(patients)),
        "entropy": float(np.mean(entropy)),
        "early": len(early),
        "all_shards": len(loader.data.shards),
        "split_entropy": entropy_bits(labels),
    }


def download_only(root: str, remote: RemoteConfig, shards: list[str]) -> None:
    """Every shard of the train split into an empty node cache on the ``prefetch`` threads, nothing decoded:
    what the server alone can deliver, the ceiling of a cold epoch from it."""
    shutil.rmtree(remote.cache_dir, ignore_errors=True)
    store = open_dataset(root, remote)
    try:
        store.prefetch(shards)
        store.wait()
    finally:
        store.close()
        shutil.rmtree(remote.cache_dir, ignore_errors=True)


def run_rounds(
    cases: list[tuple[str, str]], remote: RemoteConfig, block: int, args, train: tuple[list[str], int]
) -> dict[str, list[float]]:
    """Images/s of each case in each of ``args.repeats`` rounds; the cache is emptied before each round, so
    "cold" is cold, and local disk is measured in the same round as its baseline. A "download only" case
    fetches the train split's shards (``train``: their paths and images) without decoding them."""
    rates: dict[str, list[float]] = {case: [] for case, _ in cases}
    for _ in range(args.repeats):
        shutil.rmtree(remote.cache_dir, ignore_errors=True)
        for case, root in cases:
            start = time.perf_counter()
            if case.endswith("download only"):
                download_only(root, remote, train[0])
                images = train[1]
            else:
                images, _ = epoch_through_loader(root, remote, block, args)
            rates[case].append(images / (time.perf_counter() - start))
    return rates


TARGETS = {"cold": 0.7, "warm": 0.95}


def rate_rows(block: int, rates: dict[str, list[float]], mix: dict[str, float]) -> list[list[str]]:
    """Table rows of one shuffle block: best images/s; the ratio to local disk of the same round (median and
    range over rounds: other load on the machine slows whole rounds, a per-round ratio cancels most of it)."""
    rows = []
    for case, values in rates.items():
        ratios = np.array(values) / np.array(rates["local"])
        kind = case.split()[-1]
        target = TARGETS.get(kind)
        median = float(np.median(ratios))
        verdict = "–" if target is None else f"≥ {target}: {'met' if median >= target else 'not met'}"
        rows.append(
            [str(block), case, f"{max(values):,.0f}", f"{median:.2f}", f"{ratios.min():.2f}–{ratios.max():.2f}",
             verdict, f"{mix['shards']:.1f}", f"{mix['patients']:.1f}", f"{mix['entropy']:.2f}"]
        )  # fmt: skip
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="synthetic images in the dataset")
    parser.add_argument("--per-shard", type=int, default=16, help="samples per shard at most")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "radstream-bench-remote")
    parser.add_argument("--blocks", default="0,4", help="loader.shuffle_block values to compare (0: uniform)")
    parser.add_argument("--prefetch", type=int, default=4, help="download threads")
    parser.add_argument("--prefetch-shards", type=int, default=8, help="shards requested ahead of the reader")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="torch", help="loader backend")
    parser.add_argument("--workers", type=int, default=0, help="loader workers")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per shuffle block; the best counts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    local = build_dataset(args.work, args.n, args.per_shard)
    manifest = read_manifest(local)
    per_split = Counter(s["split"] for b in manifest["bins"] for s in b["shards"])
    blocks = [int(b) for b in args.blocks.split(",")]
    os.environ.update(S3_ENV)
    procs, endpoint, http_url = start_servers(local)
    try:
        remote = RemoteConfig(
            s3_endpoint=endpoint,
            prefetch=args.prefetch,
            prefetch_shards=args.prefetch_shards,
            cache_dir=str(args.work / "cache"),
        )
        fs, _ = filesystem("s3://bench", remote)
        fs.mkdir("bench")
        publish(local, "s3://bench/ds", remote)
        cases = [("local", str(local)), ("s3 download only", "s3://bench/ds"), ("http download only", http_url),
                 ("s3 cold", "s3://bench/ds"), ("s3 warm", "s3://bench/ds"), ("http cold", http_url),
                 ("http warm", http_url)]  # fmt: skip
        train = ([s["path"] for b in manifest["bins"] for s in b["shards"] if s["split"] == "train"],
                 sum(s["samples"] for b in manifest["bins"] for s in b["shards"] if s["split"] == "train"))  # fmt: skip
        rows, mixes = [], {}
        for block in blocks:
            mixes[block] = batch_mix(local, block, args)
            rows += rate_rows(block, run_rounds(cases, remote, block, args, train), mixes[block])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    print(
        f"\none epoch of the train split through the loader ({args.backend}, {args.workers} workers, batch "
        f"{args.batch_size}); {args.n} images, shards per split {dict(per_split)}, prefetch {args.prefetch} "
        f"threads / {args.prefetch_shards} shards ahead; {args.repeats} rounds; ratio = images/s over local disk's in the same round\n"
    )
    header = ["shuffle_block", "case", "best images/s", "vs local (median)", "range", "target", "shards/batch",
              "patients/batch", "label entropy/batch (bits)"]  # fmt: skip
    print(table(header, rows))
    any_mix = next(iter(mixes.values()))
    print(
        f"\nbatch of {args.batch_size}; label entropy of the whole split {any_mix['split_entropy']:.2f} bits\n"
    )
    print(table(
        ["shuffle_block", "shards in the first 10% of steps", "shards/batch", "patients/batch", "label entropy/batch"],
        [[str(b), f"{m['early']} of {m['all_shards']}", f"{m['shards']:.1f}", f"{m['patients']:.1f}",
          f"{m['entropy']:.2f}"] for b, m in mixes.items()],
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
