"""Remote-read benchmark: one epoch from a loopback S3 server (moto), cold and warm cache, against local disk.

Builds (once, into ``--work``) a synthetic shard dataset, starts moto's S3 server and a static HTTP server as
separate processes on 127.0.0.1, publishes the dataset to it and reads one epoch of the train split three ways, timing each from
opening the dataset to the last image:

- local: the local build folder;
- s3 cold: ``s3://`` with an empty node cache, prefetching ahead of the schedule;
- s3 warm: ``s3://`` again, every shard now in the cache;
- http cold / warm: the same over HTTP from Python's static file server (much lighter than moto, so it shows
  what the client side costs when the server is not the bottleneck).

How an epoch is read: through the loader (``shards.loader.build_loader`` on the URL) once the loader takes
remote roots (``LoaderConfig.remote``); until then, the loader's own schedule is followed here: every
sample of every step read by offset from its (cached) tar and decoded, in schedule order, one thread.

    python benchmarks/remote.py --n 1200
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shards.build.publish import publish  # noqa: E402
from shards.codecs import decode  # noqa: E402
from shards.loader import build_loader  # noqa: E402
from shards.loader_base import Lookahead, shard_schedule  # noqa: E402
from shards.loader_config import LoaderConfig, RemoteConfig  # noqa: E402
from shards.remote import resolve_dataset  # noqa: E402
from shards.transport import filesystem  # noqa: E402

S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def build_dataset(work: Path, n: int) -> Path:
    """A finalized shard dataset of ``n`` synthetic radiographs (built once per work folder and n)."""
    from core.config import load_config
    from ingest.synth import synthesize
    from shards.build.config import BuildConfig
    from shards.build.finalize import finalize
    from shards.build.parts import run_build

    out = work / f"shards-{n}"
    if (out / "manifest.json").is_file():
        return out
    synthesize(work / f"synth-{n}", n=n, seed=0, max_side=768, workers=os.cpu_count() or 1)
    overrides = [
        f"source={work / f'synth-{n}' / 'images'}",
        f"out={out}",
        "ingest.labels=folder",
        "binning.strategy=smart",
        "binning.num_bins=3",
        "shards.max_samples_per_shard=32",
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


def loader_takes_urls() -> bool:
    """Whether ``build_loader`` accepts ``s3://`` roots (the loader integration has landed)."""
    return "remote" in LoaderConfig.__dataclass_fields__


def epoch_through_loader(root: str, remote: RemoteConfig, args) -> tuple[int, float]:
    """(images, seconds to open) of one epoch through the loader."""
    start = time.perf_counter()
    cfg = LoaderConfig(
        backend=args.backend, batch_size=args.batch_size, num_workers=args.workers, remote=remote
    )
    loader = build_loader(cfg, root, "train", train=False)
    opened = time.perf_counter() - start
    try:
        return sum(len(batch["key"]) for batch in loader), opened
    finally:
        loader.close()


def epoch_in_schedule_order(root: str, remote: RemoteConfig, args) -> tuple[int, float]:
    """Read and decode every sample of one epoch in the loader's schedule order (one thread); returns
    (images, seconds to open)."""
    start = time.perf_counter()
    local_root, store = resolve_dataset(root, remote)
    cfg = LoaderConfig(backend="torch", batch_size=args.batch_size, num_workers=0)
    planner = build_loader(cfg, local_root, "train", train=False)
    data, plans = planner.data, planner.epoch_plans(0)
    ahead = Lookahead(store, shard_schedule(data, plans), remote.prefetch_shards) if store.remote else None
    fds, images, opened = {}, 0, time.perf_counter() - start
    try:
        for i, plan in enumerate(plans):
            if ahead is not None:
                ahead.advance(i + 1)
            b = data.bins[plan.bin]
            for row in plan.rows:
                shard = int(b.shard[row])
                if shard not in fds:
                    fds[shard] = store.open(data.shards[shard])
                decode(os.pread(fds[shard], int(b.size[row]), int(b.offset[row])), data.codec)
                images += 1
    finally:
        for fd in fds.values():
            os.close(fd)
        store.close()
    return images, opened


def timed(read, root: str, remote: RemoteConfig, args) -> tuple[int, float, float]:
    """(images, seconds to open the dataset, seconds in all) of one epoch."""
    start = time.perf_counter()
    images, opened = read(root, remote, args)
    return images, opened, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1200, help="synthetic images in the dataset")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "radstream-bench-remote")
    parser.add_argument("--prefetch", type=int, default=4, help="download threads")
    parser.add_argument("--prefetch-shards", type=int, default=8, help="shards requested ahead of the reader")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backend", default="torch", help="loader backend (when reading through the loader)")
    parser.add_argument(
        "--workers", type=int, default=0, help="loader workers (when reading through the loader)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per case")
    args = parser.parse_args(argv)
    local = build_dataset(args.work, args.n)
    read = epoch_through_loader if loader_takes_urls() else epoch_in_schedule_order
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
        cases = [
            ("local", str(local)),
            ("s3 cold", "s3://bench/ds"),
            ("s3 warm", "s3://bench/ds"),
            ("http cold", http_url),
            ("http warm", http_url),
        ]
        rows = run_cases(read, cases, remote, args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    how = "through the loader" if read is epoch_through_loader else "schedule order, read + decode, 1 thread"
    print(f"\none epoch of the train split ({how}); {args.n} images in the dataset, best of {args.repeats}\n")
    print("open: manifest + samples table (+ schedule); read: the rest. Ratios: images/s over local's.\n")
    print("| case      | images | open s | read s | total s | images/s | vs local | read vs local |")
    print("|-----------|-------:|-------:|-------:|--------:|---------:|---------:|--------------:|")
    _, local_images, local_open, local_total = rows[0]
    local_read = local_total - local_open
    for case, images, opened, total in rows:
        print(
            f"| {case:<9} | {images:>6} | {opened:>6.3f} | {total - opened:>6.3f} | {total:>7.3f} | "
            f"{images / total:>8.0f} | {local_total / total:>8.2f} | {local_read / (total - opened):>13.2f} |"
        )
    return 0


def run_cases(read, cases: list[tuple[str, str]], remote: RemoteConfig, args) -> list[tuple]:
    """(case, images, open seconds, total seconds) per case, the fastest of ``args.repeats`` rounds; the
    cache is emptied before each round, so "cold" is cold."""
    best: dict[str, tuple[int, float, float]] = {}
    for _ in range(args.repeats):
        shutil.rmtree(remote.cache_dir, ignore_errors=True)
        for case, root in cases:
            result = timed(read, root, remote, args)
            if case not in best or result[2] < best[case][2]:
                best[case] = result
    return [(case, *best[case]) for case, _ in cases]


if __name__ == "__main__":
    sys.exit(main())
