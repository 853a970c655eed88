"""Loader benchmark: images/s of the DALI CPU and torch backends against ImageFolder and the bare decoders.

On one synthetic shard dataset (built in a temp dir from ``radstream.ingest.synth`` unless ``--shards`` is given) it
measures, with the same number of workers everywhere:

- ``decode`` mode (evaluation loaders: decode → batches of the stored integers, which the training step makes
  float on the device): the DALI CPU backend, the torch fallback, and a torchvision ``ImageFolder`` +
  ``DataLoader`` reading the same images exported as loose files (floats, as its loader makes them); and the
  two backends again converting each batch to float [0, 1] on the host, as the loader did before issue 24;
- ``train`` mode (decode, random resized crop, flip): the same three (ImageFolder crops to 224x224);
- the decode floor: the bare decoder (Pillow, and DALI's CPU decoder) on the same bytes in a tight loop on one
  core, times the cores the loaders use (``--workers``; the machine's cores when fewer);

then the ratios best/decode-floor and best/ImageFolder (targets: ≥ 0.85 and ≥ 1.2), and the schedule's cost
per epoch: padding, images skipped by strict binning, and the spread of tokens per step with and without a
token budget. Prints Markdown tables.

    python benchmarks/loader.py                      # 2,400 synthetic images, max side 1024, smart bins
    python benchmarks/loader.py --shards OUT --workers 8
    python benchmarks/loader.py --profile 15         # also: where one epoch of the best backend spends time
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from radstream.bucketing.schedule import schedule_stats, token_budget_batch_sizes  # noqa: E402
from radstream.shards.codecs import bit_depth, extension  # noqa: E402
from radstream.shards.images import unit_float  # noqa: E402
from radstream.shards.loader import build_loader, dali_available  # noqa: E402
from radstream.shards.loader_config import LoaderConfig  # noqa: E402
from radstream.shards.loader_data import load_split  # noqa: E402
from radstream.shards.manifest import read_manifest, read_samples  # noqa: E402


def build_shards(tmp: Path, images: int, max_side: int, max_tokens: int, codec: str, workers: int) -> Path:
    """A synthetic corpus → a finalized shard dataset with smart bins."""
    from radstream.core.config import load_config
    from radstream.ingest.synth import synthesize
    from radstream.shards.builder.config import BuildConfig
    from radstream.shards.builder.finalize import finalize
    from radstream.shards.builder.parts import run_build

    synthesize(tmp / "synth", n=images, seed=0, max_side=max_side, workers=workers)
    overrides = [
        f"source={tmp / 'synth' / 'images'}",
        f"out={tmp / 'shards'}",
        "ingest.labels=folder",
        "binning.strategy=smart",
        "binning.num_bins=4",
        f"binning.max_tokens={max_tokens}",
        f"shards.codec={codec}",
        f"workers={workers}",
        "ingest.splits.fractions=[0.9,0.05,0.05]",
    ]
    cfg = load_config(BuildConfig, None, overrides)
    run_build(cfg)
    finalize(cfg)
    return tmp / "shards"


def encoded_images(root: Path, split: str) -> list[tuple[str, str, bytes]]:
    """(key, label, encoded bytes) of every sample of the split."""
    out = []
    for row in read_samples(root, split).to_pylist():
        with open(root / row["shard"], "rb") as f:
            f.seek(row["offset"])
            out.append((row["key"], row["label"] or "unlabeled", f.read(row["size"])))
    return out


def export_folder(images: list[tuple[str, str, bytes]], folder: Path, ext: str) -> None:
    """The same encoded images as loose files ``folder/<label>/<key>.<ext>`` (ImageFolder's layout)."""
    for key, label, data in images:
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"{key}.{ext}").write_bytes(data)


def rate(run_epoch: Callable[[], int], min_seconds: float) -> float:
    """Images/s over whole epochs (at least ``min_seconds``)."""
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        images += run_epoch()
    return images / (time.perf_counter() - start)


def best_rates(runs: dict[str, Callable[[], int]], seconds: float, repeats: int) -> dict[str, float]:
    """The best of ``repeats`` interleaved measurements of each run, after one warm-up epoch each (worker
    start-up, page cache). Best, not mean: on a shared machine other load only ever slows a run down."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = max(best[name], rate(run, seconds))
    return best


def consume(batches: Iterable, to_float: bool = False) -> int:
    """Images in ``batches``; ``to_float``: also make each batch's stored integers float [0, 1] on the host, as
    the loader did before issue 24 (now the training step does it, on the device)."""
    n = 0
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        if to_float:
            images = unit_float(images)
        n += len(images)
    return n


def shard_loader_epoch(
    root: Path, backend: str, train: bool, args, to_float: bool = False
) -> Callable[[], int]:
    cfg = LoaderConfig(
        backend=backend, batch_size=args.batch_size, num_workers=args.workers, prefetch=args.prefetch
    )
    loader = build_loader(cfg, root, "train", train=train)
    return lambda: consume(loader, to_float)


def image_folder_epoch(folder: Path, train: bool, bits: int, args) -> Callable[[], int]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    scale = 1.0 / (2**bits - 1)

    def load(path: str) -> torch.Tensor:  # grayscale as stored: "L" or 16-bit
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img).astype(np.float32) * np.float32(scale))[None]

    if train:
        transform = v2.Compose(
            [v2.RandomResizedCrop(224, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )
        collate = None
    else:
        transform, collate = None, (lambda items: ([img for img, _ in items], [lab for _, lab in items]))
    dataset = ImageFolder(str(folder), loader=load, transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        prefetch_factor=args.prefetch if args.workers else None,
        collate_fn=collate,
    )
    return lambda: consume(loader)


def pil_floor_epoch(images: list[bytes]) -> Callable[[], int]:
    """Bare Pillow decode to an array, one thread."""

    def epoch() -> int:
        for data in images:
            with Image.open(io.BytesIO(data)) as img:
                np.asarray(img)
        return len(images)

    return epoch


def dali_decode_epoch(images: list[bytes], bits: int, batch_size: int, threads: int) -> Callable[[], int]:
    """Bare DALI CPU decode of the same bytes, two batches in flight. ``threads=1``: pinned to one core."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import Pipeline

    arrays = [np.frombuffer(d, np.uint8) for d in images]
    batches = [arrays[i : i + batch_size] for i in range(0, len(arrays), batch_size)]
    mask = os.sched_getaffinity(0)
    if threads == 1:
        os.sched_setaffinity(0, {min(mask)})  # DALI's thread, created now, inherits it
    try:
        pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=None, exec_dynamic=True)
        with pipe:
            raw = fn.external_source(name="raw", dtype=types.UINT8, ndim=1, no_copy=True)
            dtype = types.UINT8 if bits == 8 else types.UINT16
            pipe.set_outputs(fn.decoders.image(raw, device="cpu", output_type=types.GRAY, dtype=dtype))
        pipe.build()
    finally:
        os.sched_setaffinity(0, mask)
    for batch in batches[:2]:  # the default queue depth of 2: the first run takes two batches
        pipe.feed_input("raw", batch)
    pipe.schedule_run()

    def epoch() -> int:
        for batch in batches[2:] + batches[:2]:  # keep two batches in flight across epochs
            pipe.outputs()
            pipe.feed_input("raw", batch)
            pipe.schedule_run()
        return len(arrays)

    return epoch


def schedule_rows(root: Path, batch_size: int, patch_size: int, budget: int) -> list[list[str]]:
    counts = load_split(root, "train").counts
    sizes = token_budget_batch_sizes(list(counts), budget, patch_size, max_batch=4 * batch_size)
    rows = []
    for world in (1, 8):
        for label, batch, strict in [
            ("fixed batch, pad", batch_size, False),
            ("fixed batch, strict", batch_size, True),
            (f"token budget {budget}, pad", sizes, False),
        ]:
            s = schedule_stats(counts, batch, world, strict, patch_size)
            rows.append(
                [
                    str(world),
                    label,
                    str(s["steps_per_epoch"]),
                    f"{s['padding_fraction']:.1%}",
                    str(s["skipped_samples"]),
                    f"{s['tokens_per_step_mean']:.0f}",
                    f"{s['tokens_per_step_cv']:.2f}",
                ]
            )
    return rows


HOST_FLOAT = " + host float"
SCHEDULE_HEADER = ["world size", "schedule", "steps/epoch", "padding", "skipped (strict)", "tokens/step",
                   "tokens/step cv"]  # fmt: skip


def report(measured: dict[tuple[str, str], float], cores: int, load_before: float, load_after: float) -> str:
    """The throughput table and the target ratios (Markdown)."""
    floors = {name: ips * cores for (kind, name), ips in measured.items() if kind == "floor"}
    rows = [
        [name, mode, f"{ips:,.0f}"] for (mode, name), ips in measured.items() if mode in ("decode", "train")
    ]
    rows += [
        [f"decode floor: {name}, 1 core × {cores}", "decode", f"{ips:,.0f}"] for name, ips in floors.items()
    ]
    parallel = measured.get(("parallel", "DALI CPU"))
    if parallel:
        rows.append([f"bare DALI CPU decode, {cores} threads", "decode", f"{parallel:,.0f}"])
    floor = max(floors.values())
    ratios = []
    for mode in ("decode", "train"):
        ours = {name: ips for (m, name), ips in measured.items() if m == mode and "backend" in name}
        best = max(ours, key=ours.get)
        vs_parallel = f"{ours[best] / parallel:.2f}" if parallel and mode == "decode" else "–"
        folder = measured[(mode, "ImageFolder + DataLoader")]
        ratios.append([mode, best, f"{ours[best] / floor:.2f}", vs_parallel, f"{ours[best] / folder:.2f}"])
    header = ["mode", "best backend", "best / decode floor (≥ 0.85)", "best / bare parallel decode",
              "best / ImageFolder (≥ 1.2)"]  # fmt: skip
    hosted = [
        [name, f"{measured[('decode', name)]:,.0f}", f"{measured[('decode', name)] / floor:.2f}",
         f"{ips:,.0f}", f"{ips / floor:.2f}"]
        for (mode, host), ips in measured.items() if mode == "decode-host-float"
        for name in [host.replace(HOST_FLOAT, "")]
    ]  # fmt: skip
    effect = table(["decode mode", "stored integers (now), images/s", "/ decode floor",
                    "+ float on the host (before), images/s", "/ decode floor"], hosted)  # fmt: skip
    return (
        table(["loader", "mode", "images/s"], rows)
        + f"\n\nload average (1 min) {load_before:.1f} before, {load_after:.1f} after the measurements\n\n"
        + table(header, ratios)
        + "\n\n"
        + effect
        + "\n"
    )


def profile_epoch(root: Path, args) -> str:
    """cProfile of one decode-mode epoch of the best backend (after a warm-up epoch), as a Markdown table of
    the top functions by own time. The decoding threads are invisible to it: their time shows up as waiting
    for the next batch (``outputs`` / the DataLoader's queue); everything else is per-batch overhead."""
    import cProfile
    import pstats

    backend = "dali" if dali_available() else "torch"
    run = shard_loader_epoch(root, backend, False, args)
    run()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    images = run()
    profiler.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[
        : args.profile
    ]  # (file, line, name): (cc, nc, tt, ct, callers)
    body = [
        [
            f"`{name}` ({Path(file).name}:{line})",
            str(nc),
            f"{tt * 1e3:.1f}",
            f"{tt / seconds:.1%}",
            f"{ct * 1e3:.1f}",
        ]
        for (file, line, name), (_, nc, tt, ct, _) in rows
    ]
    head = f"\none {backend} decode epoch, profiled: {images} images in {seconds:.3f} s ({images / seconds:,.0f}/s)\n\n"
    return head + table(["function", "calls", "own ms", "own share", "cumulative ms"], body)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, help="an existing shard dataset (default: build a synthetic one)")
    p.add_argument("--images", type=int, default=2400, help="synthetic images to build (≥ 2,000 train)")
    p.add_argument("--max-side", type=int, default=1024, help="longest side of the synthetic images")
    p.add_argument("--max-tokens", type=int, default=196, help="bin size cap in tokens (196 = 224x224)")
    p.add_argument("--codec", default="jpg", help="codec of the synthetic shards")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="workers / DALI threads")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0, help="minimum timed seconds per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements per run; the best counts")
    p.add_argument(
        "--token-budget", type=int, default=32 * 196, help="tokens per batch for the schedule stats"
    )
    p.add_argument("--profile", type=int, default=0, help="print the top N functions of one profiled epoch")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        root = args.shards or build_shards(
            tmp, args.images, args.max_side, args.max_tokens, args.codec, args.workers
        )
        codec = read_manifest(root)["codec"]["name"]
        bits = bit_depth(codec)
        images = encoded_images(root, "train")
        export_folder(images, tmp / "folder", extension(codec))
        cores = min(args.workers, len(os.sched_getaffinity(0))) or 1
        counts = load_split(root, "train").counts
        print(
            f"{len(images)} train images, codec {codec}, bins {counts}, {args.workers} workers, "
            f"{cores} cores, batch {args.batch_size}, torch {torch.__version__}\n"
        )
        raw = [d for _, _, d in images]
        runs = {"floor|Pillow": pil_floor_epoch(raw)}
        if dali_available():
            runs["floor|DALI CPU"] = dali_decode_epoch(raw, bits, args.batch_size, threads=1)
            runs["parallel|DALI CPU"] = dali_decode_epoch(raw, bits, args.batch_size, threads=cores)
        for mode, train in (("decode", False), ("train", True)):
            if dali_available():
                runs[f"{mode}|DALI CPU backend"] = shard_loader_epoch(root, "dali", train, args)
            runs[f"{mode}|torch backend"] = shard_loader_epoch(root, "torch", train, args)
            if not train:  # the same loaders converting on the host, as before issue 24
                for name, backend in (("DALI CPU backend", "dali"), ("torch backend", "torch")):
                    if backend == "torch" or dali_available():
                        key = f"decode-host-float|{name}{HOST_FLOAT}"
                        runs[key] = shard_loader_epoch(root, backend, False, args, to_float=True)
            runs[f"{mode}|ImageFolder + DataLoader"] = image_folder_epoch(tmp / "folder", train, bits, args)
        load_before = os.getloadavg()[0]
        measured = {tuple(k.split("|")): v for k, v in best_rates(runs, args.seconds, args.repeats).items()}
        print(report(measured, cores, load_before, os.getloadavg()[0]))
        print(table(SCHEDULE_HEADER, schedule_rows(root, args.batch_size, 16, args.token_budget)))
        if args.profile:
            print(profile_epoch(root, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
