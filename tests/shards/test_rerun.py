"""A rerun over a changed source never mixes old and new inputs: it refuses, or with --force-replan rebuilds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from radstream.core.config import load_config
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.finalize import finalize
from radstream.shards.builder.parts import run_build
from radstream.shards.builder.plan import PlanChanged, SourceChanged
from radstream.shards.builder.private import source_names
from radstream.shards.builder.verify import verify_shards

REPO = Path(__file__).resolve().parents[2]


def _sources(manifest_dir: Path) -> set[str]:
    """The source paths of the written samples, through the dataset's private map."""
    names = source_names(manifest_dir)
    hashes = pq.read_table(manifest_dir / "samples.parquet", columns=["source_hash"])["source_hash"]
    return {names[h] for h in hashes.to_pylist()}


def test_a_changed_source_is_refused_then_rebuilt_with_force_replan(
    synth_corpus: Path, tmp_path: Path
) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    files = sorted((synth_corpus / "images").rglob("*.png"))
    for f in files[:12]:
        (source / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, source / f.parent.name / f.name)
    overrides = [f"source={source}", f"out={out}", "ingest.labels=folder", "shards.part_size=100"]
    cfg = load_config(BuildConfig, None, overrides)
    run_build(cfg)
    before = finalize(cfg)
    added = [files[12], files[13]]
    for f in added:
        shutil.copy(f, source / f.parent.name / f"new_{f.name}")
    removed = sorted(source.rglob("*.png"))[0]
    removed.unlink()
    now = {str(p.relative_to(source)) for p in source.rglob("*.png")}

    with pytest.raises(SourceChanged, match="--force-replan"):
        run_build(cfg)
    with pytest.raises(SourceChanged):
        finalize(cfg)  # nor can the old parts be published as the new source's dataset
    assert json.loads((out / "manifest.json").read_text()) == before  # what was built stays as it was

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "radstream.cli", "build-shards", str(source), str(out), "--labels", "folder"]
    cmd.append("shards.part_size=100")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "the source changed since" in errors[0] and "--force-replan" in errors[0]

    run = subprocess.run([*cmd, "--force-replan"], capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["seen"] == len(now) == counts["written"] + counts["rejected"] + counts["duplicates"]
    assert str(removed.relative_to(source)) not in _sources(out)
    assert {f"{f.parent.name}/new_{f.name}" for f in added} <= _sources(out)
    assert verify_shards(out).ok


def _small_source(synth_corpus: Path, source: Path, n: int = 8) -> list[Path]:
    files = sorted((synth_corpus / "images").rglob("*.png"))[:n]
    for f in files:
        (source / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, source / f.parent.name / f.name)
    return sorted(source.rglob("*.png"))


def _cfg(source: Path, out: Path, *extra: str) -> BuildConfig:
    return load_config(BuildConfig, None, [f"source={source}", f"out={out}", "shards.part_size=100", *extra])


def test_a_finished_dataset_is_not_replaced_by_a_rerun_with_other_options(
    synth_corpus: Path, tmp_path: Path
) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    _small_source(synth_corpus, source)
    run_build(_cfg(source, out, "ingest.labels=folder"))
    before = finalize(_cfg(source, out, "ingest.labels=folder"))
    with pytest.raises(PlanChanged, match=r"ingest\.labels: 'folder' then, 'none' now.*--force-replan"):
        run_build(_cfg(source, out))  # labels back to their default
    assert json.loads((out / "manifest.json").read_text()) == before
    assert verify_shards(out).ok
    run_build(_cfg(source, out), force_replan=True)
    assert finalize(_cfg(source, out))["class_names"] == []


def test_a_finished_dataset_without_its_plan_is_not_replaced(synth_corpus: Path, tmp_path: Path) -> None:
    """_work/ gone or plan.json unreadable: nothing says what the dataset was built from; a rerun (identical
    or with other options) refuses, naming --force-replan, and leaves the dataset as it was."""
    source, out = tmp_path / "src", tmp_path / "out"
    _small_source(synth_corpus, source, n=3)
    run_build(_cfg(source, out, "ingest.labels=folder"))
    before = finalize(_cfg(source, out, "ingest.labels=folder"))
    (out / "_work" / "plan.json").write_text("{not json")
    with pytest.raises(PlanChanged, match=r"plan\.json is missing or unreadable.*--force-replan"):
        run_build(_cfg(source, out))
    shutil.rmtree(out / "_work")
    for extra in ((), ("ingest.labels=folder",)):
        with pytest.raises(PlanChanged, match="--force-replan"):
            run_build(_cfg(source, out, *extra))
    assert json.loads((out / "manifest.json").read_text()) == before
    assert run_build(_cfg(source, out), force_replan=True) == [0]
    assert finalize(_cfg(source, out))["class_names"] == []


def test_an_unfinished_build_of_other_options_is_replaced(synth_corpus: Path, tmp_path: Path) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    _small_source(synth_corpus, source, n=4)
    run_build(_cfg(source, out, "ingest.labels=folder"))  # never finalized: nothing of value yet
    run_build(_cfg(source, out))
    assert finalize(_cfg(source, out))["counts"]["written"] == 4


def test_verify_source_sees_bytes_rewritten_with_the_same_size_and_mtime(
    synth_corpus: Path, tmp_path: Path
) -> None:
    source, out = tmp_path / "src", tmp_path / "out"
    files = _small_source(synth_corpus, source, n=4)
    cfg = _cfg(source, out)
    run_build(cfg, verify_source=True)
    finalize(cfg)
    victim, donor = files[0], files[1]
    st = victim.stat()
    data = donor.read_bytes()[: st.st_size].ljust(st.st_size, b"\0")
    victim.write_bytes(data)  # what a PACS tool that restores timestamps does
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_build(cfg) == []  # the default check cannot see it (README says so)
    with pytest.raises(SourceChanged, match="rewritten in place"):
        run_build(cfg, verify_source=True)
    assert run_build(cfg, verify_source=True, force_replan=True) == [0]


def test_out_inside_source_is_refused_at_once(synth_corpus: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    _small_source(synth_corpus, source, n=2)
    for out in (source / "shards", source):
        with pytest.raises(ValueError, match="OUT lies inside SOURCE"):
            run_build(_cfg(source, out))
    assert not (source / "shards").exists()


def test_source_inside_out_is_refused_before_anything_is_written(synth_corpus: Path, tmp_path: Path) -> None:
    """OUT=/data, SOURCE=/data/train: a replan clears OUT, and so files of SOURCE; refuse before writing."""
    out = tmp_path / "data"
    source = out / "train"
    _small_source(synth_corpus, source, n=2)
    before = sorted(out.rglob("*"))
    for force in (False, True):
        with pytest.raises(ValueError, match="SOURCE .* lies inside OUT"):
            run_build(_cfg(source, out), force_replan=force)
    assert sorted(out.rglob("*")) == before


def test_a_manifest_whose_rows_all_miss_writes_its_rejects(
    synth_corpus: Path, tmp_path: Path, capsys
) -> None:
    """Relative manifest paths are read from the CSV's folder (as --help says): rows written relative to
    SOURCE by a CSV kept elsewhere all miss, and the rejects list says so."""
    from radstream.cli import main as cli

    source, out = tmp_path / "src", tmp_path / "out"
    files = _small_source(synth_corpus, source, n=3)
    csv = tmp_path / "lists" / "manifest.csv"
    csv.parent.mkdir()
    csv.write_text("path\n" + "".join(f"{f.relative_to(source)}\n" for f in files))
    assert cli(["build-shards", str(source), str(out), "--manifest-csv", str(csv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable images found (3 rejected)" in err, err
    assert f"{out / 'rejects.jsonl'}" in err and "file not found (manifest line 2)" in err
    public = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(public) == 3 and all(set(r) == {"source_hash", "reason"} for r in public)  # no path published
    private = [json.loads(line) for line in (out / "_private" / "rejects.jsonl").read_text().splitlines()]
    assert [r["path"] for r in private] == sorted(str(csv.parent / f.relative_to(source)) for f in files)
    assert [r["source_hash"] for r in private] == [r["source_hash"] for r in public]
    from radstream.cli import make_parser

    text = " ".join(make_parser()._subparsers._group_actions[0].choices["build-shards"].format_help().split())
    assert "read from the CSV's own folder" in text


def test_a_manifest_with_only_its_header_says_so_in_one_line(tmp_path: Path, capsys) -> None:
    from radstream.cli import main as cli

    source, csv = tmp_path / "src", tmp_path / "manifest.csv"
    source.mkdir()
    csv.write_text("path\n")
    assert cli(["build-shards", str(source), str(tmp_path / "out"), "--manifest-csv", str(csv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no usable images" in err and "the first:" not in err, err
