"""The result files ``radstream report`` reads and the tables it writes: finding and reading result files,
refusing mixed sets of runs, number and CSV formatting. Shared by ``radstream.report.report`` and ``radstream.report.report_mae``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path


def result_files(run_dirs: Iterable[str | Path], names: Sequence[str]) -> list[Path]:
    """The files called ``names`` under ``run_dirs``, searched recursively; a file given is taken as it is.

    Raises:
        FileNotFoundError: a run folder that does not exist.
    """
    files: list[Path] = []
    for root in map(Path, run_dirs):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run folder")
        files += [root] if root.is_file() else [p for name in names for p in sorted(root.rglob(name))]
    return files


def read_result(path: Path) -> dict:
    """A result file's JSON; ValueError naming the file when it does not parse."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: unreadable result file ({err})") from None


def refuse_twice(records: Sequence, key, what: str) -> None:
    """Raise ValueError when two records share ``key(record)`` (``what`` formats the key for the message):
    two sets of runs mixed, whose selection would mean nothing."""
    seen: dict[tuple, str] = {}
    for r in records:
        k = key(r)
        if k in seen:
            raise ValueError(
                f"{what.format(*k)} appears in both {seen[k]} and {r.source}; report one set of runs at a time"
            )
        seen[k] = r.source


def fmt_lr(lr: float) -> str:
    """A learning rate as the tables show it (3 significant digits)."""
    return f"{lr:.3g}"


def to_csv(fields: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV text: a header line, then one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows(rows)
    return buffer.getvalue()
