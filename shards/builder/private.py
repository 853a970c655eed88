"""The private side of a shard dataset: ``OUT/_private/``, for the data steward only, never published.

What a dataset publishes names patients by pseudonym and files by a keyed path hash (``ingest.privacy``).
This folder holds the way back — ``patients.jsonl`` (pseudonym → patient id), ``sources.jsonl`` (path hash →
path relative to the source), ``source.json`` (the source folder and the command line) and ``rejects.jsonl``
(every input not written, with its path) — so that `verify-shards`, the build summary and the steward can still
say which file is meant. The folder is 0700 and its files 0600; `publish` never uploads it and refuses a
dataset in which it finds any of its values.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

from radstream.core.atomic import write_bytes
from radstream.core.perms import make_private, private_folder

log = logging.getLogger(__name__)

PRIVATE = "_private"
PATIENTS = "patients.jsonl"
SOURCES = "sources.jsonl"
REJECTS = "rejects.jsonl"
MIN_SEARCHED = 6
"""Private values shorter than this are not searched for by `publish` (they would match by chance)."""


def _write(out: Path, name: str, lines: list[dict]) -> Path:
    folder = private_folder(out / PRIVATE)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    path = write_bytes(folder / name, text.encode("utf-8", "surrogateescape"))
    return make_private(path)


def write_identities(out: Path, identities: dict[str, dict[str, str]], source: str) -> None:
    """The map pseudonym ↔ patient id and path hash ↔ path of a plan, and where the source was."""
    patients = sorted(identities.get("patients", {}).items())
    sources = sorted(identities.get("sources", {}).items())
    _write(out, PATIENTS, [{"pseudonym": p, "patient_id": raw} for p, raw in patients])
    _write(out, SOURCES, [{"source_hash": h, "path": rel} for h, rel in sources])
    _write(out, "source.json", [{"source": str(Path(source).resolve()), "command": " ".join(sys.argv)}])


def write_rejects(out: Path, rejects: list[dict]) -> None:
    """Every input not written, with its path (``{"source_hash", "path", "reason"}`` per line)."""
    _write(out, REJECTS, rejects)


def write_reject_lists(out: Path, rejects: list[dict], keep_paths: bool) -> Path:
    """Both rejects lists of ``rejects`` (``{"source_hash", "path", "reason"}`` each): this private one, and
    ``OUT/rejects.jsonl`` (path hash and reason; the path too with ``keep_paths``, privacy off). Returns the
    public list's path."""
    write_rejects(out, rejects)
    public = rejects if keep_paths else [{k: r[k] for k in ("source_hash", "reason")} for r in rejects]
    lines = [json.dumps(r) for r in public]
    return write_bytes(out / "rejects.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())


def _lines(path: Path) -> list[dict]:
    try:
        text = path.read_text("utf-8", "surrogateescape")
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def source_names(out: str | Path) -> dict[str, str]:
    """Path hash → source path, where this machine has the dataset's private map (else empty)."""
    return {r["source_hash"]: r["path"] for r in _lines(Path(out) / PRIVATE / SOURCES)}


def private_values(out: str | Path) -> set[str]:
    """What must never appear in a published file: every patient id (with and without its ``dicom:``-style
    prefix), every source path and every file name stem, of at least :data:`MIN_SEARCHED` characters."""
    values = set()
    for r in _lines(Path(out) / PRIVATE / PATIENTS):
        raw = str(r["patient_id"])
        values |= {raw, raw.split(":", 1)[-1]}
    for r in _lines(Path(out) / PRIVATE / SOURCES):
        values |= {r["path"], Path(r["path"]).stem}
    return {v for v in values if len(v) >= MIN_SEARCHED}


def rejects_summary(out: str | Path, limit: int = 5) -> list[str]:
    """Lines for the build summary: the commonest reasons, then the first rejected files by path (through the
    private map; by hash where this machine lacks it)."""
    rejects = _lines(Path(out) / PRIVATE / REJECTS)
    if not rejects:
        return []
    reasons = Counter(r["reason"] for r in rejects)
    lines = [f"  {n} x {reason}" for reason, n in reasons.most_common(limit)]
    lines += [f"  {r.get('path') or r['source_hash']}: {r['reason']}" for r in rejects[:limit]]
    lines.append(f"  (all {len(rejects)} with their paths in {Path(out) / PRIVATE / REJECTS})")
    return lines


def _text_of_table(path: Path) -> bytes:
    """Every string cell of a parquet table, decoded (compression would hide them from a byte search)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    cells = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            cells += [c for c in column.to_pylist() if c]
    cells += table.column_names
    return "\n".join(cells).encode("utf-8", "surrogateescape")


def _text_of_tar(path: Path) -> bytes:
    """A tar's member names and its non-image members (``.json``, ``.cls``): where text can hide."""
    import tarfile

    chunks = []
    with tarfile.open(path) as tar:
        for member in tar:
            chunks.append(member.name.encode("utf-8", "surrogateescape"))
            if member.isfile() and member.name.rsplit(".", 1)[-1] in ("json", "cls", "txt"):
                chunks.append(tar.extractfile(member).read())  # type: ignore[union-attr]
    return b"\n".join(chunks)


def find_private_values(out: str | Path, files: list[str]) -> list[str]:
    """Which of the dataset's ``files`` (relative names) hold a value of its private map: each as
    ``"<file>: <how many> private values"``. Empty where there is no private map on this machine."""
    import re

    out = Path(out)
    values = private_values(out)
    if not values:
        return []
    pattern = re.compile(b"|".join(re.escape(v.encode("utf-8", "surrogateescape")) for v in sorted(values)))
    found = []
    for rel in files:
        path = out / rel
        if rel.endswith(".parquet"):
            text = _text_of_table(path)
        elif rel.endswith(".tar"):
            text = _text_of_tar(path)
        else:
            text = path.read_bytes()
        hits = {m.group() for m in pattern.finditer(text)}
        if hits:
            found.append(f"{rel}: {len(hits)} private values")
    return found
