"""Tasks of an array build plan once between them and load only their own parts' records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from radstream.shards.builder.plan import load_plan

# One array task; counts its ingests in a file and holds the first one long enough for the other task to
# arrive while it plans.
_TASK = """
import sys, time
from radstream.core.config import load_config
from radstream.shards.builder import plan
from radstream.shards.builder.config import BuildConfig

real = plan.run_ingest
def counted(*args, **kwargs):
    with open(sys.argv[1], "a") as fh:
        fh.write("ingest\\n")
    time.sleep(1.0)
    return real(*args, **kwargs)

plan.run_ingest = counted
task, tasks = int(sys.argv[2]), int(sys.argv[3])
mine = plan.get_plan(load_config(BuildConfig, None, sys.argv[4:]), keep=lambda parts: parts % tasks == task)
print(sorted(set(mine.parts)))  # run_build's call: the records of this task's parts
"""


def test_array_tasks_plan_once_and_load_their_parts(synth_corpus: Path, tmp_path: Path) -> None:
    out, counter = tmp_path / "out", tmp_path / "ingests"
    args = [f"source={synth_corpus / 'images'}", f"out={out}", "shards.part_size=20"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    tasks = [
        subprocess.Popen(
            [sys.executable, "-c", _TASK, str(counter), str(i), "2", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = [t.communicate(timeout=300) for t in tasks]
    assert all(t.returncode == 0 for t in tasks), [err[-2000:] for _, err in results]
    assert counter.read_text().splitlines() == ["ingest"]  # the other task waited and loaded the plan
    loaded = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in results]
    parts = json.loads((out / "_work" / "plan.json").read_text())["num_parts"]
    assert parts > 2 and loaded == [list(range(parts))[0::2], list(range(parts))[1::2]]


def test_a_task_loads_only_the_records_of_its_parts(tiny_shards: Path) -> None:
    work = tiny_shards / "_work"
    fingerprint = json.loads((work / "plan.json").read_text())["fingerprint"]
    whole = load_plan(work, fingerprint)
    assert whole is not None and whole.num_parts > 1
    mine = load_plan(work, fingerprint, keep=lambda parts: parts == 1)
    assert set(mine.parts) == {1} and mine.records == tuple(whole.part_records(1))
    assert mine.part_records(1) == whole.part_records(1) and mine.num_parts == whole.num_parts
    none = load_plan(work, fingerprint, keep=lambda parts: parts < 0)
    assert none.records == () and (none.seen, none.rejects) == (whole.seen, whole.rejects)


def test_one_array_job_lists_the_source_once(synth_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """Tasks of one SLURM array job list and stat the source once between them (the first to take the plan
    lock); a later job (a rerun) lists it again, and a build outside an array job every time."""
    from radstream.core.config import load_config
    from radstream.shards.builder import plan
    from radstream.shards.builder.config import BuildConfig

    listed = []
    real = plan.source_digest
    monkeypatch.setattr(plan, "source_digest", lambda cfg: listed.append(1) or real(cfg))
    cfg = load_config(BuildConfig, None, [f"source={synth_corpus / 'images'}", f"out={tmp_path / 'out'}",
                                          "shards.part_size=20"])  # fmt: skip
    for job, tasks in (("77", 3), ("78", 2)):
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", job)
        for task in range(tasks):
            plan.get_plan(cfg, keep=lambda parts, t=task, n=tasks: parts % n == t)
    assert len(listed) == 2  # once per job
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    plan.get_plan(cfg)
    plan.get_plan(cfg)
    assert len(listed) == 4
