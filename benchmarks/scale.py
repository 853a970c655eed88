"""What the metadata of N samples costs, step by step, on synthetic datasets without pixels (issue #21).

For each ``--sizes`` N it writes a build output as the build leaves it before finalize (part records, real
tars with a 1-byte image and its ``.cls`` per sample and their ``.idx``), then runs each step in a fresh subprocess and prints
its wall time, its CPU time (the process's threads; what the growth ratios use, since other jobs on a shared
machine stretch the wall time) and peak memory (``VmHWM`` minus the process's RSS after its imports):

- ``finalize``: ``radstream.shards.builder.finalize.finalize`` (the plan is a stand-in: there is no source to ingest);
- ``verify``: ``verify-shards --quick`` with no image decoded (shards, indexes and the samples table);
- ``load_split cold`` / ``warm``: ``load_split('train')`` in a first rank of the node, then in a second one;
  ``steady`` is what the process still holds once the split is loaded, ``pickled`` what a DataLoader worker
  receives (``StepDataset(data, store)`` pickled);
- ``epoch W=...``: the epoch boundary of the last rank at world size W (``ShardLoader.epoch_plans``: schedule
  and padding masks; each step draws its augmentation when it is read), batch 32.

The synthetic rows are shaped like a real build's: keys of 24 characters, pixel hashes of 20 uniformly spread
hex digits (a keyed hash; finalize's cross-part duplicate check reads back only rows whose first 64 bits
collide, none by chance at 10M).

The last column is the growth ratio from each N to the next (CPU time, peak): near the ratio of the Ns for
what must be linear, near 1 for what must stay constant. A write that was killed goes on where it stopped
(``--step write --out DIR --n N``, then ``--step finalize|verify|load|epoch`` one by one).

    python benchmarks/scale.py                          # N = 100k and 1M (minutes on 2 cores)
    python benchmarks/scale.py --sizes 1000000 10000000 # 10M: ~10 GB of tiny tars under --work
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

BINS = ("224x224", "224x288", "256x256", "288x224")
CLASSES = tuple(f"region{i}" for i in range(8))
PART_SIZE = 10_000
WORLD_SIZES = (8, 512, 4096)


_CPU_START = 0.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """The process's peak RSS since the last :func:`_reset_peak` (VmHWM)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM")) / 1024


def _reset_peak() -> float:
    """Start a new peak at the current RSS (Linux: ``5`` in ``clear_refs``) and a new count of the process's
    CPU time (its threads' too: on a shared machine the wall time also counts other jobs'); returns that RSS."""
    global _CPU_START
    _CPU_START = time.process_time()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _rss_mb()


def _row(i: int, rng) -> dict:
    """One sample's row as ``build_part`` makes it (the fields of ``_sample_json`` plus the key)."""
    split = "train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test")
    label = int(rng.integers(len(CLASSES)))
    h, w = int(rng.integers(800, 3000)), int(rng.integers(800, 3000))
    fractions = [f for f in (0.01, 0.1) if split == "train" and rng.random() < f]
    return {
        "key": f"img{i:09d}_{i * 2654435761 % 16**10:010x}",
        "source_hash": f"{i * 2246822519 % 16**20:020x}",
        "format": "dicom",
        "height": h,
        "width": w,
        "bits": 12,
        "photometric": "MONOCHROME2",
        "frames": 1,
        "foreground": [0, 0, h, w],
        "foreground_bin": [1, 2, 220, 221],
        "patient_id": f"psn-{i // 3 * 2654435761 % 16**20:020x}",
        "split": split,
        "label": CLASSES[label],
        "label_index": label,
        "fractions": fractions,
        "bin": BINS[int(rng.integers(len(BINS)))],
        "fit": "pad",
        "cropped_to_foreground": False,
        "pixel_hash": rng.bytes(10).hex(),  # a keyed hash of the pixels: 20 hex digits, uniformly spread
    }


def write_dataset(out: Path, n: int, part_size: int = PART_SIZE) -> None:
    """The build output before finalize: one part record per ``part_size`` samples, tars and indexes. A part
    whose record exists is kept (a killed write goes on where it stopped: each part draws from its own seed)."""
    import numpy as np

    from radstream.shards.builder import parts as build_parts
    from radstream.shards.builder.writer import ShardWriter

    for part in range((n + part_size - 1) // part_size):
        if (out / "_work" / "parts" / f"part-{part:04d}.json").is_file():
            continue
        rng = np.random.default_rng(part)
        rows = [_row(i, rng) for i in range(part * part_size, min(n, (part + 1) * part_size))]
        writers = {}
        for row in rows:
            sb = (row["split"], row["bin"])
            if sb not in writers:
                (out / sb[0] / sb[1]).mkdir(parents=True, exist_ok=True)
                writers[sb] = ShardWriter(
                    out / sb[0] / sb[1], f"{sb[0]}-{sb[1]}-{part:04d}", max_samples=2000
                )
            writers[sb].write(row["key"], {"png": b"x", "cls": str(row["label_index"]).encode()})
        record = {
            "part": part,
            "fingerprint": "bench",
            "seen": len(rows),
            "rows": rows,
            "rejects": [],
            "duplicates": [],
            "shards": build_parts._close_writers(writers),
        }
        if hasattr(build_parts, "save_part"):  # rows as Parquet beside the record
            rows = record.pop("rows")
            build_parts.save_part(out, {**record, "written": len(rows)}, rows)
        else:
            _save_json(out, record)


def _save_json(out: Path, record: dict) -> None:
    folder = out / "_work" / "parts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"part-{record['part']:04d}.json").write_text(json.dumps(record))


def config(out: Path):
    from radstream.shards.builder.config import BuildConfig, ShardConfig

    return BuildConfig(source=str(out), out=str(out), shards=ShardConfig(codec="png"))


def stand_in_plan(n: int, part_size: int = PART_SIZE):
    """The plan a real build of :func:`write_dataset` would have loaded (there is no source to ingest)."""
    from radstream.bucketing.geometry import Bin
    from radstream.shards.builder.plan import BuildPlan

    parts = -(-n // part_size)
    return BuildPlan(tuple(CLASSES), tuple(Bin.parse(b) for b in BINS), (), (), (), n, parts, "bench")


def step_finalize(out: Path, n: int) -> dict:
    from radstream.shards.builder import finalize as fin

    fin.get_plan = lambda cfg, **kw: stand_in_plan(n)
    base, start = _reset_peak(), time.perf_counter()
    fin.finalize(config(out))
    return {"secs": time.perf_counter() - start, "base": base}


def step_verify(out: Path, n: int) -> dict:
    from radstream.shards.builder.verify import verify_shards

    base, start = _reset_peak(), time.perf_counter()
    rep = verify_shards(out, quick=True, quick_share=0.0)
    if not rep.ok:
        raise SystemExit(f"verify found problems: {rep.problems[:3]}")
    return {"secs": time.perf_counter() - start, "base": base}


def step_load(out: Path, n: int) -> dict:
    import gc
    import pickle

    from radstream.shards.loader_data import load_split
    from radstream.shards.store import ShardStore
    from radstream.shards.torch_backend import StepDataset

    base, start = _reset_peak(), time.perf_counter()
    data = load_split(out, "train")
    secs = time.perf_counter() - start
    gc.collect()
    steady = _rss_mb() - base
    pickled = len(pickle.dumps(StepDataset(data, ShardStore(out))))
    return {"secs": secs, "base": base, "steady": steady, "pickled": pickled}


def step_epoch(out: Path, n: int, world: int) -> dict:
    from radstream.shards.loader_base import ShardLoader
    from radstream.shards.loader_config import LoaderConfig
    from radstream.shards.loader_data import load_split

    data = load_split(out, "train")
    loader = ShardLoader(data, LoaderConfig(batch_size=32, seed=0), process_index=world - 1,
                         num_processes=world, device="cpu", train=True)  # fmt: skip
    loader.epoch_plans(0)
    base, start = _reset_peak(), time.perf_counter()
    plans = loader.epoch_plans(1)
    return {"secs": time.perf_counter() - start, "base": base, "steps": len(plans)}


def run_step(name: str, out: Path, n: int, world: int = 0) -> dict:
    """One step in a fresh interpreter, so its peak memory is its own."""
    cmd = [sys.executable, __file__, "--step", name, "--out", str(out), "--n", str(n), "--world", str(world)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode:
        raise SystemExit(f"step {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(args) -> None:
    out, n = Path(args.out), args.n
    if args.step == "epoch":
        res = step_epoch(out, n, args.world)
    else:
        res = {"write": lambda o, n: write_dataset(o, n) or {"secs": 0, "base": 0},
               "finalize": step_finalize, "verify": step_verify, "load": step_load}[args.step](out, n)  # fmt: skip
    res["peak"] = _peak_mb() - res["base"]
    res["cpu"] = time.process_time() - _CPU_START
    print(json.dumps(res))


def measure(n: int, work: Path) -> dict[str, dict]:
    out = work / f"n{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    run_step("write", out, n)
    print(f"N={n:,}: synthetic build written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    cache = tempfile.mkdtemp(prefix="scale-cache-", dir=work)
    os.environ["RADSTREAM_CACHE"] = cache  # the node cache (and the loader's column cache) of this N
    res = {"finalize": run_step("finalize", out, n), "verify": run_step("verify", out, n)}
    res["load_split cold"] = run_step("load", out, n)
    res["load_split warm"] = run_step("load", out, n)
    for world in WORLD_SIZES:
        res[f"epoch W={world}"] = run_step("epoch", out, n, world)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return res


def report(results: dict[int, dict[str, dict]]) -> str:
    sizes = sorted(results)
    head = (
        "| step | "
        + " | ".join(f"N={n:,}: wall s / CPU s / peak MB" for n in sizes)
        + " | growth (CPU time, peak) |"
    )
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    for step in results[sizes[0]]:
        cells = []
        for n in sizes:
            r = results[n][step]
            extra = (
                f", steady {r['steady']:.0f} MB, pickled {r['pickled'] / 1e6:.2f} MB"
                if "pickled" in r
                else ""
            )
            cells.append(f"{r['secs']:.2f} / {r.get('cpu', 0):.2f} / {r['peak']:.0f}{extra}")
        growth = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            ra, rb = results[a][step], results[b][step]
            cpu = rb.get("cpu", rb["secs"]) / max(ra.get("cpu", ra["secs"]), 1e-3)
            growth.append(f"N x{b / a:g}: {cpu:.1f}, {rb['peak'] / max(ra['peak'], 1):.1f}")
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {'; '.join(growth) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--work", default=tempfile.gettempdir(), help="folder for the synthetic datasets")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        _child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="radstream-scale-", dir=args.work))
    try:
        results = {n: measure(n, work) for n in args.sizes}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results))


if __name__ == "__main__":
    main()
