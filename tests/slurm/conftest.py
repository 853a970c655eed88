"""Fixtures for the SLURM tests: a real cluster on this machine, or a skip that says why.

Start one with `bash slurm/local_cluster.sh start` (as root), or set RADSTREAM_START_SLURM=1 and the
`slurm_cluster` fixture starts it. The fixture never stops a cluster: `local_cluster.sh stop` does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
# Job states after which a job record no longer changes (squeue's long names).
FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


class SlurmCluster:
    """The running cluster, seen through `scontrol` (accounting is off, so there is no `sacct`)."""

    repo = REPO

    def job_states(self, job_id: str | int) -> dict[str, str]:
        """The state of every record of a job, by SLURM's name for it ("12" or, for array tasks, "12_0").

        A pending array prints one record for its not yet started tasks ("12_1-2"). Empty when SLURM no
        longer knows the job (purged after MinJobAge).
        """
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30
        )
        states = {}
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            fields = dict(re.findall(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState)=(\S+)", line))
            if "ArrayTaskId" in fields:
                name = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            else:
                name = fields["JobId"]
            states[name] = fields["JobState"]
        return states

    def wait(self, job_ids: list[str], timeout_s: float = 300, poll_s: float = 1.0) -> dict[str, str]:
        """Poll until every record of every job is in a final state; returns {record: state}.

        Fails the test (with `squeue` output) after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            states = {}
            for job_id in job_ids:
                states.update(self.job_states(job_id) or {str(job_id): "PURGED"})
            if all(s in FINAL_STATES or s == "PURGED" for s in states.values()):
                return states
            if time.monotonic() > deadline:
                queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
                pytest.fail(f"SLURM jobs {job_ids} not finished after {timeout_s:.0f} s: {states}\n{queue}")
            time.sleep(poll_s)


def _sinfo_answers() -> bool:
    try:
        subprocess.run(["sinfo", "-h"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """A SLURM cluster that answers; skips when there is none (RADSTREAM_START_SLURM=1: start one)."""
    if os.environ.get("RADSTREAM_START_SLURM") == "1":
        proc = subprocess.run(["bash", str(LOCAL_CLUSTER), "start"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(
                f"RADSTREAM_START_SLURM=1 but `{LOCAL_CLUSTER} start` failed:\n{proc.stdout}\n{proc.stderr}"
            )
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (no sbatch); run `bash slurm/local_cluster.sh start` as root")
    if not _sinfo_answers():
        pytest.skip(
            "SLURM is installed but `sinfo` gets no answer (no slurmctld); run `bash slurm/local_cluster.sh start`"
        )
    return SlurmCluster()
