"""finalize and verify without a Python object per sample; the samples table in row groups per split and bin
(format 2.0) and the reading of a 1.x table."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from radstream.core.config import load_config
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.finalize import finalize
from radstream.shards.builder.plan import load_plan
from radstream.shards.builder.verify import verify_shards
from radstream.shards.layout import FORMAT_VERSION, load_manifest, load_samples
from radstream.shards.loader_data import load_split

ORDER = ["split", "bin", "shard", "position"]


def _copy(root: Path, to: Path, monkeypatch) -> tuple[Path, BuildConfig]:
    """A copy of a built dataset, finalized again from its own plan (its config names another ``out``)."""
    shutil.copytree(root, to)
    fingerprint = json.loads((to / "_work" / "plan.json").read_text())["fingerprint"]
    monkeypatch.setattr(
        "radstream.shards.builder.finalize.get_plan",
        lambda cfg, **kw: load_plan(to / "_work", fingerprint, **kw),
    )
    return to, load_config(BuildConfig, to / "_work" / "config.yaml", [f"out={to}"])


def _scale_benchmark():
    """benchmarks/scale.py: its synthetic build output (part records, tiny tars) without pixels."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("scale_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _traced_peak(step) -> int:
    """Peak bytes of Python objects and numpy arrays (what ``tracemalloc`` sees) while ``step`` runs."""
    tracemalloc.start()
    try:
        step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("step", ["finalize", "verify"])
def test_finalize_and_verify_hold_no_object_per_row(step: str, tmp_path: Path, monkeypatch) -> None:
    # a row as a dict costs over 500 bytes (measured: 2.2 kB per row in finalize, 740 B in verify before they
    # streamed); Arrow's columns are not Python allocations, numpy's indexes are 8-16 bytes per row, and each
    # shard's entries in the records and the manifest (~2 kB; here a shard holds ~12 samples) add ~200 B
    scale, sizes, peaks = _scale_benchmark(), (300, 300, 1200), []
    for i, n in enumerate(sizes):
        out = tmp_path / f"{i}-{n}"
        scale.write_dataset(out, n, part_size=150)
        monkeypatch.setattr(
            "radstream.shards.builder.finalize.get_plan", lambda cfg, n=n, **kw: scale.stand_in_plan(n, 150)
        )
        if step == "verify":
            finalize(scale.config(out))
        run = (lambda out=out: finalize(scale.config(out))) if step == "finalize" else (
            lambda out=out: verify_shards(out, quick=True, quick_share=0.0))  # fmt: skip
        peaks.append(_traced_peak(run))  # the first run warms caches up and is not compared
    per_row = (peaks[2] - peaks[1]) / (sizes[2] - sizes[1])
    assert per_row < 400, f"{per_row:.0f} bytes of Python objects per row ({peaks})"


def test_the_samples_table_is_in_row_groups_per_split_and_bin(tiny_shards: Path) -> None:
    meta = pq.ParquetFile(tiny_shards / "samples.parquet").metadata
    names = meta.schema.names
    groups = []
    for g in range(meta.num_row_groups):
        stats = {c: meta.row_group(g).column(names.index(c)).statistics for c in ("split", "bin")}
        assert all(s.min == s.max for s in stats.values())  # one (split, bin) per row group
        groups.append((stats["split"].min, stats["bin"].min))
    assert groups == sorted(groups) and len(set(groups)) == len(groups) and len(groups) > 3
    table = pq.read_table(tiny_shards / "samples.parquet")
    assert table.equals(table.sort_by([(c, "ascending") for c in ORDER]))  # the stored order, as before
    assert load_manifest(tiny_shards)["format_version"] == FORMAT_VERSION == "2.1"


def test_finalize_again_writes_the_same_bytes(tiny_shards: Path, tmp_path: Path, monkeypatch) -> None:
    out, cfg = _copy(tiny_shards, tmp_path / "again", monkeypatch)
    before = (out / "samples.parquet").read_bytes()
    manifest = finalize(cfg)
    assert (out / "samples.parquet").read_bytes() == before  # same input, same bytes
    assert manifest["samples_sha256"] == hashlib.sha256(before).hexdigest()
    differ = ("created", "command", "config")  # when and where it ran
    assert {k: v for k, v in manifest.items() if k not in differ} == {
        k: v for k, v in load_manifest(tiny_shards).items() if k not in differ
    }
    assert verify_shards(out).ok
    assert not (out / "_work" / "finalize").exists()  # the scratch files are gone


def test_verify_names_the_one_bad_row(tiny_shards: Path, tmp_path: Path, monkeypatch) -> None:
    out, _ = _copy(tiny_shards, tmp_path / "bad", monkeypatch)
    table = pq.read_table(out / "samples.parquet")
    offsets = table["offset"].to_numpy().copy()
    offsets[3] += 1
    pq.write_table(table.set_column(table.column_names.index("offset"), "offset", pa.array(offsets)),
                   out / "samples.parquet")  # fmt: skip
    report = verify_shards(out)
    rows = [p for p in report.problems if p.startswith("samples.parquet row")]
    assert len(rows) == 1 and rows[0].startswith("samples.parquet row 3 ") and "image at" in rows[0]
    assert any("samples have no row" in p for p in report.problems)  # that sample's place is now uncovered


def test_parts_recorded_with_their_rows_in_json_still_finalize(
    tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    out, cfg = _copy(tiny_shards, tmp_path / "old-parts", monkeypatch)
    for rows_file in sorted((out / "_work" / "parts").glob("part-*.parquet")):
        record_file = rows_file.with_suffix(".json")
        record = json.loads(record_file.read_text())
        record["rows"] = pq.read_table(rows_file).to_pylist()  # a record written before rows moved out
        del record["written"]
        record_file.write_text(json.dumps(record))
        rows_file.unlink()
    finalize(cfg)
    assert pq.read_table(out / "samples.parquet").equals(pq.read_table(tiny_shards / "samples.parquet"))


def test_a_table_in_one_row_group_reads_the_same(tiny_shards: Path, tmp_path: Path, monkeypatch) -> None:
    out, _ = _copy(tiny_shards, tmp_path / "one-group", monkeypatch)
    table = pq.read_table(out / "samples.parquet")
    pq.write_table(table, out / "samples.parquet")  # as finalize wrote it before 2.0: one row group
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["samples_sha256"] = hashlib.sha256((out / "samples.parquet").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert load_samples(out, "val").equals(load_samples(tiny_shards, "val"))
    old, new = (
        load_split(out, "train", cache_dir=str(tmp_path)),
        load_split(tiny_shards, "train", cache_dir=str(tmp_path)),
    )
    for name, b in new.bins.items():
        assert np.array_equal(old.bins[name].keys.raw, b.keys.raw) and np.array_equal(
            old.bins[name].offset, b.offset
        )


def _rewrite(out: Path, table: pa.Table, **kw) -> None:
    """``table`` as the dataset's samples table, with the manifest's checksum of it (every check of the
    table itself passes: what is left is the row-by-row reading)."""
    pq.write_table(table, out / "samples.parquet", **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["samples_sha256"] = hashlib.sha256((out / "samples.parquet").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))


_ARROW_PEAKS = """
import os, sys
import pyarrow as pa
from radstream.shards.builder import verify
if hasattr(verify, "TableRows"):
    from radstream.shards.builder import verify_rows
    verify_rows.BATCH_ROWS = 128
for root in sys.argv[1:]:
    assert verify.verify_shards(root, quick=True, quick_share=0.0).ok
    print(pa.default_memory_pool().max_memory(), flush=True)
os._exit(0)  # the peaks are printed; no teardown to wait for
"""


def test_verify_streams_the_samples_table(tmp_path: Path, monkeypatch) -> None:
    """Arrow's own peak (its memory pool, which tracemalloc does not see) while verify reads a table in
    row groups of 200 rows: a whole-table read holds ~700 bytes a row (2.3 MB at 3,200 rows, 0.28 at 400);
    streamed, what grows is the reader's per-row-group bookkeeping (~120 bytes a row at these tiny sizes)."""
    scale, sizes, roots = _scale_benchmark(), (400, 3200), []
    for n in sizes:
        out = tmp_path / f"n{n}"
        scale.write_dataset(out, n, part_size=200)
        monkeypatch.setattr(
            "radstream.shards.builder.finalize.get_plan", lambda cfg, n=n, **kw: scale.stand_in_plan(n, 200)
        )
        finalize(scale.config(out))
        _rewrite(out, pq.read_table(out / "samples.parquet"), row_group_size=200)
        roots.append(str(out))
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", _ARROW_PEAKS, *roots], capture_output=True, text=True,
                         cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    small, large = map(int, run.stdout.split())
    per_row = (large - small) / (sizes[1] - sizes[0])
    assert per_row < 300, f"verify's Arrow peak grows {per_row:.0f} bytes a row ({small}, {large})"


def test_verify_reads_a_table_whose_rows_are_scattered(
    tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    """Rows out of the stored order (a shard's rows in several batches, not a slice of one) are gathered per
    shard all the same; a duplicated row among them is still found."""
    out, _ = _copy(tiny_shards, tmp_path / "scattered", monkeypatch)
    monkeypatch.setattr("radstream.shards.builder.verify_rows.BATCH_ROWS", 5)
    table = pq.read_table(out / "samples.parquet")
    shuffled = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    _rewrite(out, shuffled)
    report = verify_shards(out)
    assert report.ok, report.problems
    assert report.samples == table.num_rows
    _rewrite(out, pa.concat_tables([shuffled.slice(0, 7), shuffled.slice(3, 1), shuffled.slice(7)]))
    report = verify_shards(out)
    assert len(report.problems) == 1 and report.problems[0].startswith("samples.parquet row 7 "), (
        report.problems
    )
    assert "duplicate of row 3" in report.problems[0]


def _set_pixel_hashes(out: Path, make) -> None:
    """Every part's ``pixel_hash`` column rewritten as ``make(part, row)``."""
    for rows_file in sorted((out / "_work" / "parts").glob("part-*.parquet")):
        table, part = pq.read_table(rows_file), int(rows_file.stem.split("-")[1])
        hashes = pa.array([make(part, i) for i in range(table.num_rows)], pa.string())
        pq.write_table(
            table.set_column(table.column_names.index("pixel_hash"), "pixel_hash", hashes), rows_file
        )


def _finalized(out: Path, n: int, part_size: int, monkeypatch) -> dict:
    scale = _scale_benchmark()
    monkeypatch.setattr(
        "radstream.shards.builder.finalize.get_plan", lambda cfg, **kw: scale.stand_in_plan(n, part_size)
    )
    return finalize(scale.config(out))


def test_identical_images_in_two_parts_are_listed_once(tmp_path: Path, monkeypatch) -> None:
    # part 0's row 0 and part 2's row 5 are the same image; every other pair of rows shares the first 64 bits
    # of its hash (candidates the check must read again and clear); passes of one candidate's rows at a time
    out = tmp_path / "dups"
    _scale_benchmark().write_dataset(out, 300, part_size=100)
    same = "ab" * 10
    _set_pixel_hashes(
        out, lambda p, i: same if (p, i) in ((0, 0), (2, 5)) else f"{p * 50 + i // 2:016x}{i:04x}"
    )
    monkeypatch.setattr("radstream.shards.builder.finalize.CANDIDATE_ROWS", 1)
    manifest = _finalized(out, 300, 100, monkeypatch)
    table = pq.read_table(out / "samples.parquet", columns=["pixel_hash", "source_hash"])
    expected = sorted(table.filter(pc.equal(table["pixel_hash"], same))["source_hash"].to_pylist())
    lines = [json.loads(line) for line in (out / "duplicates.jsonl").read_text().splitlines()]
    assert lines == [{"pixel_hash": same, "source_hashes": expected}] and len(expected) == 2
    assert manifest["cross_part_duplicates"] == {"groups": 1, "samples": 2, "list": "duplicates.jsonl"}
    assert table.num_rows == 300  # reported, not dropped


def test_the_duplicate_check_holds_no_object_per_candidate(tmp_path: Path, monkeypatch) -> None:
    # every row a candidate (pairs share the first 64 bits of the hash), none a duplicate: the rows are
    # compared in Arrow (before: ~300 bytes of Python objects a candidate row)
    from radstream.shards.builder import finalize as fin

    real, peaks, sizes = fin._cross_part_duplicates, [], (400, 400, 1600)  # the first warms caches up

    def traced(*args):
        found = []
        peaks.append(_traced_peak(lambda: found.append(real(*args))))
        return found[0]

    monkeypatch.setattr(fin, "_cross_part_duplicates", traced)
    for k, n in enumerate(sizes):
        out = tmp_path / f"{k}-{n}"
        _scale_benchmark().write_dataset(out, n, part_size=200)
        _set_pixel_hashes(out, lambda p, i: f"{p * 1000 + i // 2:016x}{i:04x}")
        assert _finalized(out, n, 200, monkeypatch)["cross_part_duplicates"]["groups"] == 0
    per_row = (peaks[2] - peaks[1]) / (sizes[2] - sizes[1])
    assert per_row < 100, f"{per_row:.0f} bytes of Python objects per candidate row ({peaks})"
