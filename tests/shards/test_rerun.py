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

from core.config import load_config
from shards.build.config import BuildConfig
from shards.build.finalize import finalize
from shards.build.parts import run_build
from shards.build.plan import SourceChanged
from shards.build.private import source_names
from shards.build.verify import verify_shards

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
