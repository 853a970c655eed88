"""The report of ``radstream gpu-check``: pytest results, MFU, the targets, and the Markdown around them.

Pure functions of the parts' JSON results (no torch, no GPU), so they are unit-tested on the CPU with canned
inputs. ``radstream.gpu.check`` runs the parts; ``radstream.gpu.bench`` measures.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, by device name."""

MAE_IMAGES_PER_S_TARGET = 5000.0
MFU_TARGET = 0.35
DATA_WAIT_TARGET = 0.05

_SUMMARY_WORDS = ("passed", "failed", "skipped", "errors", "error", "deselected", "xfailed", "xpassed")


def save(path: Path, result: dict) -> None:
    """Write a part's JSON result (the parts rewrite it after every row)."""
    path.write_text(json.dumps(result, indent=1) + "\n")


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak for MFU: ``override`` if given, else the longest table key in the name; None if
    the device is unknown (MFU is then not reported)."""
    if override is not None:
        return override
    keys = [k for k in PEAK_BF16_TFLOPS if k in device_name]
    return PEAK_BF16_TFLOPS[max(keys, key=len)] if keys else None


def mfu(flops_per_image: float, images_per_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    if not peak:
        return None
    return flops_per_image * images_per_s / (peak * 1e12)


def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's closing line (``3 passed, 1 skipped in 2.1s``); {} when there is none (killed)."""
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (" + "|".join(_SUMMARY_WORDS) + r")\b", line)
        if found and re.search(r"\bin [\d.]+s", line):
            counts: dict[str, int] = {}
            for number, word in found:
                word = "errors" if word == "error" else word
                counts[word] = counts.get(word, 0) + int(number)
            return counts
    return {}


def parse_junit(path: str | Path) -> dict:
    """Counts and failures from pytest's ``--junitxml`` file.

    Returns:
        ``{"passed", "failed", "errors", "skipped", "failures": [{"test", "message"}], "skips": [...]}``.
    """
    root = ET.parse(path).getroot()
    out = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            out["passed"] += 1
            continue
        message = (outcome.get("message") or (outcome.text or "")).strip().splitlines()
        entry = {"test": name, "message": message[0][:300] if message else ""}
        if outcome.tag == "skipped":
            out["skipped"] += 1
            out["skips"].append(entry)
        else:
            out["failed" if outcome.tag == "failure" else "errors"] += 1
            out["failures"].append(entry)
    return out


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; numbers right-aligned, floats with 3 significant digits or thousands separators."""
    numeric = [bool(rows) and all(isinstance(r[i], int | float) for r in rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


@dataclass(frozen=True)
class Target:
    """One target of the issue against what was measured."""

    name: str
    value: float | None
    """The measurement; None: not measured (part skipped, failed or timed out)."""
    goal: float
    higher_is_better: bool

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value < self.goal


def mae_row(parts: dict, mode: str) -> dict | None:
    """The MAE benchmark's row of ``mode`` (e.g. ``fixed 224, compiled``), if measured."""
    rows = _result(parts, "mae").get("rows", [])
    return next((r for r in rows if r.get("mode") == mode), None)


def _result(parts: dict, name: str) -> dict:
    return (parts.get(name) or {}).get("result") or {}


def targets(parts: dict) -> list[Target]:
    """The issue's three targets for one H100/H200, from the parts' results."""
    compiled = mae_row(parts, "fixed 224, compiled") or {}
    e2e = _result(parts, "e2e")
    return [
        Target("MAE ViT-B/16 compiled bf16, images/s", compiled.get("images_per_s"), MAE_IMAGES_PER_S_TARGET, True),
        Target("MAE ViT-B/16 compiled bf16, MFU", compiled.get("mfu"), MFU_TARGET, True),
        Target("end to end, data wait / step time", e2e.get("data_wait_frac"), DATA_WAIT_TARGET, False),
    ]  # fmt: skip


def targets_table(rows: Sequence[Target]) -> str:
    """The targets as a Markdown table (met / missed / not measured)."""
    verdict = {True: "met", False: "missed", None: "not measured"}
    return markdown_table(
        ["target", "measured", "goal", "verdict"],
        [
            (t.name, t.value, ("≥ " if t.higher_is_better else "< ") + _cell(t.goal), verdict[t.met])
            for t in rows
        ],
    )


def render_report(report: dict) -> str:
    """The whole Markdown report of ``gpu_check.json``'s content (``env`` and ``parts``)."""
    env, parts = report["env"], report["parts"]
    goals = targets(parts)
    out = [
        f"# GPU check: {env.get('device', '?')}, {env.get('date', '?')}",
        "",
        f"`{env.get('command', 'radstream gpu-check')}` ({'quick' if env.get('quick') else 'full'} mode); "
        f"torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, DALI {env.get('dali') or 'not installed'}, "
        f"bf16 peak {_cell(env.get('peak_tflops'))} TFLOP/s for MFU.",
        "",
        "## Targets",
        "",
        targets_table(goals),
        "",
        "## Parts",
        "",
        markdown_table(
            ["part", "status", "seconds", "note"],
            [(name, p.get("status"), p.get("seconds"), p.get("note", "")) for name, p in parts.items()],
        ),
    ]
    for title, section in _SECTIONS:
        body = section(_result(parts, title))
        if body:
            out += ["", f"## {_TITLES[title]}", "", body]
    if any(t.met is False for t in goals[:2]) and _result(parts, "mae").get("profile"):
        out += ["", "## What bounds the MAE step: one compiled step, top kernels by GPU time", "",
                _profile_table(_result(parts, "mae")["profile"])]  # fmt: skip
    for name, p in parts.items():
        if p.get("status") not in ("ok", "skipped") and p.get("log_tail"):
            out += ["", f"## Log of `{name}` ({p['status']})", "", "```", p["log_tail"].rstrip(), "```"]
    return "\n".join(out) + "\n"


def _tests_section(r: dict) -> str:
    if not r:
        return ""
    counts = ", ".join(f"{r.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
    lines = [f"`pytest -m gpu`: {counts}."]
    if r.get("failures"):
        lines += ["", markdown_table(["test", "message"], [(f["test"], f["message"]) for f in r["failures"]])]
    if r.get("skips"):
        lines += ["", "Skipped: " + "; ".join(f"{s['test']} ({s['message']})" for s in r["skips"])]
    return "\n".join(lines)


def _decode_section(r: dict) -> str:
    rows = r.get("rows") or []
    if not rows:
        return ""
    return markdown_table(
        ["codec", "shape", "HW JPEG decoder", "batch", "images/s"],
        [(x["codec"], x["shape"], x["hw_decoder"], x["batch"], x["images_per_s"]) for x in rows],
    )


def _mae_section(r: dict) -> str:
    rows = r.get("rows") or []
    if not rows:
        return ""
    return markdown_table(
        ["mode", "images/step", "images/s", "tokens/s", "foreground tokens/s", "GFLOP/image", "MFU",
         "attention kernel", "peak GiB"],
        [(x["mode"], x["batch"], x["images_per_s"], x["tokens_per_s"], x.get("foreground_tokens_per_s"),
          x["gflops_per_image"], _pct(x.get("mfu")), x.get("attention"), x["peak_mem_gib"]) for x in rows],
    )  # fmt: skip


def _resnet_section(r: dict) -> str:
    if not r:
        return ""
    return markdown_table(
        ["model", "batch", "images/s", "peak GiB"],
        [(r.get("model", "resnet50"), r["batch"], r["images_per_s"], r["peak_mem_gib"])],
    )


def _e2e_section(r: dict) -> str:
    if not r:
        return ""
    return markdown_table(
        ["steps", "batch", "images", "images/s", "data wait / step time", "loader"],
        [(r["steps"], r["batch"], r["images"], r["images_per_s"], _pct(r["data_wait_frac"]), r["loader"])],
    )


def _profile_table(rows: list[dict]) -> str:
    return markdown_table(
        ["kernel", "GPU ms", "calls", "share"],
        [(x["name"][:90], x["gpu_ms"], x["calls"], _pct(x["share"])) for x in rows],
    )


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.1f}%"


_SECTIONS = (
    ("tests", _tests_section),
    ("decode", _decode_section),
    ("mae", _mae_section),
    ("resnet", _resnet_section),
    ("e2e", _e2e_section),
)
_TITLES = {
    "tests": "GPU tests",
    "decode": "DALI decode throughput (mixed backend)",
    "mae": "MAE ViT-B/16, 224, mask 0.75, decoder 8x512, bf16, fused AdamW",
    "resnet": "ResNet50 supervised: the trainer's step (configs/supervised/resnet50.yaml)",
    "e2e": "End to end: MAE pretraining fed by the DALI loader from local shards",
}
