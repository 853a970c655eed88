"""``radstream gpu-check``: prove the GPU path and measure it, in one command, into one report.

Each part runs in its own process under its own time limit (a hang or a CUDA crash costs that part, never the
report), within one overall budget (8 minutes by default): the GPU tests (``pytest -m gpu``), DALI decode
throughput, the MAE ViT-B/16 step (eager and compiled), ResNet50, and 200 steps of pretraining end to end
from local shards. After every part ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` are rewritten, so a run
stopped from outside still leaves a report. Without a CUDA device it says so in one line and exits 0.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from radstream.core.atomic import write_text
from radstream.gpu.report import parse_junit, parse_pytest_summary, render_report

REPO = Path(__file__).resolve().parents[2]
"""The checkout (tests/ and configs/ live there; an installed wheel has neither)."""
LOG_TAIL_LINES = 40
_MIN_PART_S = 10.0


@dataclass(frozen=True)
class Part:
    """One measured part of the check."""

    name: str
    full_s: float
    """Time limit in full mode, seconds."""
    quick_s: float
    """Time limit with ``--quick``, seconds."""


PARTS = (
    Part("tests", 110, 90),
    Part("mae", 150, 70),
    Part("decode", 45, 30),
    Part("resnet", 40, 25),
    Part("e2e", 130, 60),
)
"""In order of running; the full limits add up to 475 s, inside the default budget of 480 s."""


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (no torch, or no CUDA device), or None."""
    try:
        import torch
    except ImportError:
        return "torch does not import here; nothing measured"

    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False); nothing measured"
    return None


def environment(command: str, quick: bool, peak_override: float | None) -> dict:
    """What the report is about: device, versions, date, the command and the peak used for MFU."""
    import torch

    from radstream.gpu.report import peak_tflops

    try:
        import nvidia.dali

        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    device = torch.cuda.get_device_name(0)
    return {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dali": dali,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "quick": quick,
        "peak_tflops": peak_tflops(device, peak_override),
    }


def gpu_test_files(tests: Path) -> list[str]:
    """The test modules with GPU-marked tests: collecting only these keeps a module that imports a
    dependency the GPU machine lacks (the S3 test server, say) from failing the GPU tests."""
    return sorted(
        str(p) for p in tests.rglob("test_*.py") if "pytest.mark.gpu" in p.read_text(errors="replace")
    )


def part_command(part: str, work: Path, quick: bool, peak: float | None, limit_s: float) -> list[str]:
    """The subprocess that runs ``part``, writing its result to ``work/<part>.json`` (junit XML for tests)."""
    if part == "tests":
        return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o",
                "addopts=-ra", f"--junitxml={work / 'tests.xml'}", *gpu_test_files(REPO / "tests")]  # fmt: skip
    cmd = [sys.executable, "-m", "radstream.gpu.bench", part, "--out", str(work / f"{part}.json"),
           f"--limit-s={limit_s:.0f}"]  # fmt: skip
    cmd += ["--quick"] if quick else []
    return cmd + ([f"--peak-tflops={peak}"] if peak is not None else [])


def run_part(cmd: list[str], log: Path, timeout_s: float) -> tuple[str, float]:
    """Run ``cmd`` in its own process group with output to ``log``; (ok | failed | timeout, seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: DALI threads, compile workers
            proc.wait()
            return "timeout", time.perf_counter() - start
    return ("ok" if code == 0 else "failed"), time.perf_counter() - start


def collect(part: str, work: Path, status: str, log: Path) -> dict:
    """A part's entry for the report: its result (from its JSON or junit file) and, if it broke, its log."""
    entry: dict = {"status": status}
    output = log.read_text(errors="replace") if log.exists() else ""
    if part == "tests":
        xml = work / "tests.xml"
        entry["result"] = parse_junit(xml) if xml.exists() else parse_pytest_summary(output)
        if status == "failed" and entry["result"].get("failed", 0) + entry["result"].get("errors", 0):
            entry["note"] = "some GPU tests failed"
    else:
        path = work / f"{part}.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        if result.get("skipped"):
            entry["status"], entry["note"] = "skipped", result["skipped"]
        entry["result"] = result  # partial results of a timed-out part still count
    if entry["status"] not in ("ok", "skipped"):
        entry["log_tail"] = "\n".join(output.splitlines()[-LOG_TAIL_LINES:])
    return entry


def write_report(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md in ``out`` (atomically, so a kill leaves the last complete pair)."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "gpu_check.json", json.dumps(report, indent=1) + "\n")
    write_text(out / "gpu_check.md", render_report(report))


def run_check(out: Path, *, quick: bool, budget_s: float, peak: float | None, command: str) -> dict:
    """Run every part within ``budget_s`` seconds; the report is rewritten after each part."""
    deadline = time.monotonic() + budget_s
    report = {"env": environment(command, quick, peak), "parts": {}}
    logs = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        for part in PARTS:
            limit = min(part.quick_s if quick else part.full_s, deadline - time.monotonic())
            if limit < _MIN_PART_S:
                report["parts"][part.name] = {"status": "skipped", "note": "the overall budget is spent"}
                continue
            log = work / f"{part.name}.log"
            print(f"gpu-check: {part.name} (limit {limit:.0f} s)", flush=True)
            status, seconds = run_part(part_command(part.name, work, quick, peak, limit), log, limit)
            entry = collect(part.name, work, status, log)
            entry["seconds"] = round(seconds, 1)
            report["parts"][part.name] = entry
            logs.append(
                f"===== {part.name}: {entry['status']} in {seconds:.0f} s\n" + log.read_text(errors="replace")
            )
            write_report(out, report)
        write_text(out / "gpu_check.log", "\n".join(logs))
    write_report(out, report)
    return report


def main(out: str, *, quick: bool = False, budget_s: float = 480.0, peak_tflops: float | None = None) -> int:
    """Entry of ``radstream gpu-check``; 0 also without a GPU (the one line says why nothing ran)."""
    reason = no_gpu_reason()
    if reason:
        print(f"gpu-check: {reason}")
        return 0
    command = (
        "radstream gpu-check " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["gpu-check"]
        else "radstream gpu-check"
    )
    report = run_check(Path(out), quick=quick, budget_s=budget_s, peak=peak_tflops, command=command)
    for name, part in report["parts"].items():
        print(f"gpu-check: {name}: {part['status']}" + (f" ({part['note']})" if part.get("note") else ""))
    print(f"gpu-check: report in {Path(out) / 'gpu_check.md'}")
    return 0 if all(p["status"] in ("ok", "skipped") for p in report["parts"].values()) else 1
