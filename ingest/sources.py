"""Sources: find the input files (a folder tree or a CSV manifest) and their labels and patients.

Nothing is filtered by file type here: every file is handed on, and one that is not an image is rejected by
the reader with its reason, so that it is counted. What can be judged without reading the pixels (an unknown
IRMA code, a dropped class, a manifest row naming a missing file, a link that leads nowhere, a folder that
cannot be listed, a name that is not UTF-8) is returned as an early reject, so that it is counted too.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from radstream.ingest.errors import RejectError
from radstream.ingest.labels import irma_region, load_irma_codes

logger = logging.getLogger(__name__)

LABEL_SOURCES = ("none", "folder", "csv", "irma")
"""Where labels come from: nowhere (pretraining), the first folder level, the manifest, or IRMA codes."""

MANIFEST_COLUMNS = ("path", "label", "irma_code", "patient_id")
"""Manifest columns; only ``path`` is required, other columns are ignored."""

RARE_LABEL_COUNT = 5
"""With manifest labels, a label on fewer images than this is warned about: a typo makes a new class."""


@dataclass(frozen=True)
class SourceItem:
    """One input file.

    Attributes:
        path: absolute path of the file.
        label: class name, or None for an unlabeled image.
        patient_id: from the manifest, or None (the builder falls back to DICOM PatientID or the path).
        irma_code: the image's IRMA code when one is known.
    """

    path: str
    label: str | None = None
    patient_id: str | None = None
    irma_code: str | None = None


def discover(
    source: str,
    *,
    manifest_csv: str | None = None,
    label_from: str = "none",
    irma_csv: str | None = None,
    drop_labels: tuple[str, ...] = ("whole_body",),
) -> tuple[list[SourceItem], list[dict]]:
    """List the input files with their labels.

    Args:
        source: a folder tree (every regular, non-hidden file below it, sorted by relative path; hidden ones
            are early rejects) or a CSV
            manifest file. With ``manifest_csv`` it is the root that folder labels are taken relative to.
        manifest_csv: a comma-separated manifest with a header; ``path`` (relative to the CSV's folder, or
            absolute) is required, ``label``, ``irma_code`` and ``patient_id`` are optional. Rows keep their order.
        label_from: "none", "folder" (first folder level below the root), "csv" (the manifest's ``label``)
            or "irma" (the manifest's ``irma_code``, else ``irma_csv`` keyed by the file stem).
        irma_csv: an IRMA code list (``image_id;irma_code;...``) whose image ids are file stems.
        drop_labels: classes whose images are rejected.

    Returns:
        The items, and the early rejects as ``{"path", "reason"}`` (absolute paths; a name that is not UTF-8
        with its bytes escaped as ``\\xff``). An image without a label in a labelled mode is an unlabeled item
        (label None), not a reject.

    Raises:
        ValueError: an unknown ``label_from``, a missing source, an unreadable CSV, a manifest without a
            ``path`` column, or a label source the inputs cannot provide.
    """
    if label_from not in LABEL_SOURCES:
        raise ValueError(f"label_from={label_from!r}: expected one of {LABEL_SOURCES}")
    root = os.path.abspath(source)
    if not os.path.exists(root):
        raise ValueError(f"{source}: source not found")
    if manifest_csv is None and os.path.isfile(root):
        manifest_csv = root
    if manifest_csv is not None:
        rows, columns = _read_manifest(manifest_csv)
        if not os.path.isdir(root):
            root = os.path.dirname(os.path.abspath(manifest_csv))
    else:
        paths, unusable = _walk(root)
        rows, columns = [{"path": path} for path in paths], {"path"}
        rows += [{"path": r["path"], "reject": r["reason"]} for r in unusable]
    codes = load_irma_codes(irma_csv) if irma_csv else {}
    _check_label_source(label_from, columns, bool(irma_csv), manifest_csv)

    items: list[SourceItem] = []
    rejects: list[dict] = []
    dropped = set(drop_labels)
    for row in rows:
        path = row["path"]
        reason = row.get("reject")
        irma_code = row.get("irma_code") or (codes.get(_stem(path)) if codes else None)
        label = None
        if reason is None:
            try:
                label = _label(label_from, row, root, irma_code)
            except RejectError as err:
                reason = str(err)
        if reason is None and label in dropped:
            reason = f"{label} (dropped by config)"
        if reason is not None:
            rejects.append({"path": path, "reason": reason})
            continue
        items.append(SourceItem(path, label, row.get("patient_id"), irma_code))
    if label_from == "csv":
        _warn_rare_labels(items)
    logger.info("%s: %d inputs, %d rejected early", manifest_csv or source, len(items), len(rejects))
    return items, rejects


def _warn_rare_labels(items: list[SourceItem]) -> None:
    """One warning naming every label seen on fewer than ``RARE_LABEL_COUNT`` images, rarest first."""
    counts = Counter(item.label for item in items if item.label is not None)
    rare = sorted((n, label) for label, n in counts.items() if n < RARE_LABEL_COUNT)
    if rare:
        named = ", ".join(f"{label!r} ({n})" for n, label in rare[:20])
        more = f" and {len(rare) - 20} more" if len(rare) > 20 else ""
        logger.warning(
            "labels seen fewer than %d times (a typo in the manifest makes a new class): %s%s",
            RARE_LABEL_COUNT,
            named,
            more,
        )


HIDDEN_FILE = "hidden file (its name or a folder above it starts with '.'), not read"
"""The reject reason of a file the walk does not read because it is hidden (``.DS_Store``, ``.reviewed/x.png``)."""


def _walk(root: str) -> tuple[list[str], list[dict]]:
    """The regular, non-hidden files below ``root`` (absolute, sorted by relative path) and the early rejects.

    Every other entry is counted as a reject rather than skipped silently or allowed to stop the walk, so that
    ``seen`` counts every regular file under ``root``: a hidden file (named ``.x`` or inside a ``.folder``,
    which is walked too), a folder that cannot be listed (with its contents), a link whose target is missing or
    loops, a link to a folder (not followed: a link cycle would never end), a device or pipe (never opened:
    reading a pipe blocks), and a name that is not valid UTF-8 (no table or tar could name it).
    """
    found: list[str] = []
    rejects: list[dict] = []
    stack = [("", False)]
    while stack:
        rel_dir, hidden_dir = stack.pop()
        folder = os.path.join(root, rel_dir)
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    hidden = hidden_dir or entry.name.startswith(".")
                    try:
                        if _is_folder(entry):
                            stack.append((rel, hidden))
                        elif hidden:
                            rejects.append({"path": _printable(entry.path), "reason": HIDDEN_FILE})
                        else:
                            found.append(rel)
                    except RejectError as err:
                        rejects.append({"path": _printable(entry.path), "reason": str(err)})
        except OSError as err:
            reason = f"unreadable folder, skipped ({err.strerror or err})"
            rejects.append({"path": _printable(folder.rstrip(os.sep)), "reason": reason})
    found.sort()
    rejects.sort(key=lambda r: r["path"])
    return [os.path.join(root, rel) for rel in found], rejects


def _is_folder(entry: os.DirEntry) -> bool:
    """True for a folder to walk, False for a regular file (or a link to one) to read.

    Raises:
        RejectError: anything else, with the reason.
    """
    try:
        is_folder = entry.is_dir(follow_symlinks=False)
        if not _is_utf8(entry.name):
            kind = "folder name is not valid UTF-8, skipped" if is_folder else "file name is not valid UTF-8"
            raise RejectError(f"{kind} (rename it)")
        if is_folder:
            return True
        mode = entry.stat().st_mode  # follows a link
    except FileNotFoundError:
        missing = (
            "dangling link (its target does not exist)" if entry.is_symlink() else "vanished while listed"
        )
        raise RejectError(missing) from None
    except OSError as err:
        problem = "symlink loop" if err.errno == errno.ELOOP else "unreadable entry"
        raise RejectError(f"{problem} ({err.strerror or err})") from None
    if stat.S_ISDIR(mode):
        raise RejectError("link to a folder, not followed")
    if not stat.S_ISREG(mode):
        raise RejectError("not a regular file (device, socket or pipe)")
    return False


def _is_utf8(name: str) -> bool:
    """Whether a name read from the file system is valid UTF-8 (Python keeps bad bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    """A path as valid UTF-8 text for a reject line: bytes that are not UTF-8 are written ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_manifest(manifest_csv: str) -> tuple[list[dict], set[str]]:
    """Rows of a manifest with absolute paths and empty cells as None; a bad row carries a ``reject`` reason."""
    csv_path = os.path.abspath(manifest_csv)
    base = os.path.dirname(csv_path)
    rows = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = {name.strip() for name in reader.fieldnames or ()}
            if "path" not in columns:
                raise ValueError(
                    f"{manifest_csv}: manifest has no 'path' column (columns: {sorted(columns)})"
                )
            for line, raw in enumerate(reader, start=2):
                row = {key.strip(): _cell(value) for key, value in raw.items() if key is not None}
                row = {key: row.get(key) for key in MANIFEST_COLUMNS}
                if row["path"] is None:
                    row["path"] = f"{manifest_csv}:{line}"
                    row["reject"] = "manifest row has an empty path"
                else:
                    row["path"] = os.path.normpath(os.path.join(base, row["path"]))
                    if not os.path.isfile(row["path"]):
                        row["reject"] = f"file not found (manifest line {line})"
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{manifest_csv}: cannot read manifest: {err}") from None
    return rows, columns


def _cell(value: str | list | None) -> str | None:
    """A stripped manifest cell, None when empty (or when a short row leaves it out)."""
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _check_label_source(label_from: str, columns: Iterable[str], has_irma_csv: bool, manifest: str | None):
    """Fail early when the requested labels cannot exist at all."""
    where = manifest or "a folder source"
    if label_from == "csv" and "label" not in columns:
        raise ValueError(f"label_from='csv' needs a manifest with a 'label' column; {where} has none")
    if label_from == "irma" and not has_irma_csv and "irma_code" not in columns:
        raise ValueError(
            f"label_from='irma' needs irma_csv or a manifest 'irma_code' column; {where} has neither"
        )


def _label(label_from: str, row: dict, root: str, irma_code: str | None) -> str | None:
    """The label of one row; raises RejectError for an unknown IRMA code."""
    if label_from == "csv":
        return row.get("label")
    if label_from == "irma":
        return irma_region(irma_code) if irma_code is not None else None
    if label_from == "folder":
        prefix = os.path.join(root, "")
        path = row["path"]
        if not path.startswith(prefix):
            return None
        folder, sep, _ = path[len(prefix) :].partition(os.sep)
        return folder if sep else None
    return None


def _stem(path: str) -> str:
    """The file name without its last extension: the image id of the IRMA lists."""
    return os.path.splitext(os.path.basename(path))[0]
