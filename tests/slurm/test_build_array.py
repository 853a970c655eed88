"""The shard build as a SLURM array (slurm/submit_build.sh) on a real one-node cluster.

The first two tests check the job plumbing with a stand-in `radstream` on PATH; the last builds a synthetic
corpus with 3 array tasks + finalize and compares it with a single-process build of the same input.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "slurm" / "submit_build.sh"

# Records every call's arguments (one per line) in $FAKE_CALLS/<command>-<array task>.args; the finalize
# call also records which build calls it saw; the build task numbered $FAKE_FAIL_TASK fails.
FAKE_RADSTREAM = """#!/usr/bin/env bash
set -eu
printf '%s\\n' "$@" > "$FAKE_CALLS/$1-${SLURM_ARRAY_TASK_ID:-none}.args"
if [[ $1 == finalize-shards ]]; then
    ls "$FAKE_CALLS" > "$FAKE_CALLS/seen-by-finalize.txt"
fi
if [[ ${SLURM_ARRAY_TASK_ID:-none} == "${FAKE_FAIL_TASK:-}" ]]; then
    exit 3
fi
"""


def _submit(
    tmp_path: Path, source: Path, out: Path, num_tasks: int, extra: list[str], env: dict
) -> list[str]:
    """Run submit_build.sh; returns [array job id, finalize job id]."""
    env = {**env, "RADSTREAM_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        ["bash", str(SUBMIT), str(source), str(out), str(num_tasks), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    match = re.fullmatch(r"array job: (\d+)\nfinalize job: (\d+)\n", proc.stdout)
    assert match, f"unexpected submit_build.sh output: {proc.stdout!r}"
    return [match[1], match[2]]


def _job_logs(tmp_path: Path) -> str:
    return "\n".join(f"---- {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "logs").glob("*.out")))


def _fake_env(tmp_path: Path, fail_task: str = "") -> dict:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    fake = bin_dir / "radstream"
    fake.write_text(FAKE_RADSTREAM)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RADSTREAM_VENV", "RADSTREAM_CPUS_PER_TASK")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_CALLS": str(calls), "FAKE_FAIL_TASK": fail_task}


def test_submit_build_runs_every_task_then_finalize(slurm_cluster, tmp_path):
    env = _fake_env(tmp_path)
    extra = ["shards.part_size=8", "--labels", "folder", "name=with space"]
    ids = _submit(tmp_path, Path("src"), Path("out"), 3, extra, env)

    states = slurm_cluster.wait(ids, timeout_s=180)

    assert states == {
        f"{ids[0]}_0": "COMPLETED",
        f"{ids[0]}_1": "COMPLETED",
        f"{ids[0]}_2": "COMPLETED",
        ids[1]: "COMPLETED",
    }, _job_logs(tmp_path)
    calls = tmp_path / "calls"
    # Relative SOURCE/OUT reach the jobs as absolute paths; extra args keep their word boundaries.
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    for task in range(3):
        args = (calls / f"build-shards-{task}.args").read_text().splitlines()
        assert args == [
            "build-shards",
            src,
            out,
            *extra,
            "--task-index",
            str(task),
            "--num-tasks",
            "3",
            "--workers",
            "1",
        ]
    assert (calls / "finalize-shards-none.args").read_text().splitlines() == ["finalize-shards", out]
    seen = (calls / "seen-by-finalize.txt").read_text().split()
    assert {"build-shards-0.args", "build-shards-1.args", "build-shards-2.args"} <= set(seen)


def test_failed_task_cancels_finalize(slurm_cluster, tmp_path):
    env = _fake_env(tmp_path, fail_task="1")
    ids = _submit(tmp_path, tmp_path / "src", tmp_path / "out", 3, [], env)

    states = slurm_cluster.wait(ids, timeout_s=180)

    assert states[f"{ids[0]}_1"] == "FAILED"
    assert states[ids[1]] == "CANCELLED", states
    assert not (tmp_path / "calls" / "finalize-shards-none.args").exists()


def _radstream(*args: object, timeout: int = 600) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "radstream.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"radstream {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"


def _tar_samples(root: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in a dataset's shards: key → {member extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(root.glob("*/*/*.tar")):
        if tar_path.relative_to(root).parts[0].startswith("_"):
            continue
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                assert ext not in samples.get(key, {}), f"{member.name} twice in {root}"
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _sample_rows(root: Path) -> dict[str, dict]:
    cols = ["key", "source_hash", "split", "bin", "label", "fractions"]
    return {row.pop("key"): row for row in pq.read_table(root / "samples.parquet", columns=cols).to_pylist()}


def _manifest_counts(root: Path) -> dict:
    m = json.loads((root / "manifest.json").read_text())
    return {
        "counts": m["counts"],
        "split_sizes": m["split_sizes"],
        "label_fraction_sizes": m["label_fraction_sizes"],
        "class_names": m["class_names"],
        "bins": {b["name"]: b["counts"] for b in m["bins"]},
    }


def _rejects(root: Path) -> list[str]:
    return sorted((root / "rejects.jsonl").read_text().splitlines())


def test_array_build_equals_local_build(slurm_cluster, tmp_path):
    src = tmp_path / "synth"
    _radstream("synth", src, "--n", 60, "--seed", 7, "--max-side", 256)
    # Small parts, so that each of the 3 tasks gets some (60 images make one part by default).
    extra = ["shards.part_size=8", "--labels", "folder"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if sys.prefix != sys.base_prefix:
        env["RADSTREAM_VENV"] = sys.prefix
    ids = _submit(tmp_path, src / "images", tmp_path / "array", 3, extra, env)

    states = slurm_cluster.wait(ids, timeout_s=300)

    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{_job_logs(tmp_path)}"
    array, local = tmp_path / "array", tmp_path / "local"
    _radstream("build-shards", src / "images", local, *extra)

    array_samples, local_samples = _tar_samples(array), _tar_samples(local)
    assert len(local_samples) > 40
    assert array_samples.keys() == local_samples.keys()
    for key, members in local_samples.items():
        assert array_samples[key] == members, f"sample {key} differs"
    rows = _sample_rows(array)
    assert rows == _sample_rows(local)
    assert rows.keys() == local_samples.keys()
    assert _manifest_counts(array) == _manifest_counts(local)
    assert _rejects(array) == _rejects(local)
    shards = pq.read_table(array / "samples.parquet", columns=["shard"]).column("shard").to_pylist()
    parts = {Path(shard).name.split("-")[-2] for shard in shards}  # <split>-<bin>-<part>-<n>.tar
    assert len(parts) >= 3, f"only parts {parts}: the tasks did not share the work"
