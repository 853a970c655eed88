"""Labels: IRMA codes → body regions, the real IRMA code lists, and the order of class names.

An IRMA code has four axes, ``TTTT-DDD-AAA-BBB``: technical, directional, anatomical and biological. The first
character of the anatomical axis ``AAA`` is the body region (``REGIONS``), the label of the reference study.
Each axis is a hierarchy read left to right: a character refines the one before it, ``0`` leaves a level
unspecified, and letters number the tenth and later children of a level, so a top level is always a digit.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path

from radstream.ingest.errors import RejectError

REGIONS: dict[int, str] = {
    1: "whole_body",
    2: "cranium",
    3: "spine",
    4: "upper_extremity",
    5: "chest",
    6: "breast",
    7: "abdomen",
    8: "pelvis",
    9: "lower_extremity",
}
"""Region digit (first character of the anatomical axis) → class name."""

_REGION_ORDER = {name: digit for digit, name in REGIONS.items()}

# Each axis is hierarchical; its code characters are 0-9 (and a-z in the finer levels of some axes).
_IRMA_CODE = re.compile(r"[0-9a-z]{4}-[0-9a-z]{3}-[0-9a-z]{3}-[0-9a-z]{3}")
_AXES = ("technical", "directional", "anatomical", "biological")

MISSING = "\\N"
"""How the IRMA lists mark a missing value."""


def irma_region(code: str) -> str:
    """The body region named by an IRMA code.

    Args:
        code: an IRMA code ``TTTT-DDD-AAA-BBB``; surrounding whitespace is ignored.

    Returns:
        The region name, one of ``REGIONS.values()``.

    Raises:
        RejectError: a malformed code, a region digit that names no region (0 or a letter), or another axis
            that no code list holds (see :func:`_check_axis`): a typo must not become a label.
    """
    text = code.strip() if isinstance(code, str) else ""
    if not _IRMA_CODE.fullmatch(text):
        raise RejectError(f"unknown IRMA code {code!r}: expected the form TTTT-DDD-AAA-BBB")
    digit = text[9]
    if not digit.isdigit() or int(digit) not in REGIONS:
        raise RejectError(f"unknown IRMA code {code!r}: anatomical region {digit!r} is not one of 1-9")
    for name, axis in zip(_AXES, text.split("-"), strict=True):
        problem = _check_axis(axis)
        if problem:
            raise RejectError(f"unknown IRMA code {code!r}: {name} axis {axis!r} {problem}")
    return REGIONS[int(digit)]


def _check_axis(axis: str) -> str | None:
    """What is wrong with one axis of a well-formed code, or None.

    A letter at the top level, or a level below an unspecified (``0``) one that is not ``0`` itself, cannot
    occur in a code: both are typos (every code of the real lists passes).
    """
    if not axis[0].isdigit():
        return "starts with a letter"
    if "0" in axis and axis[axis.index("0") :].strip("0"):
        return "refines an unspecified level"
    return None


def load_irma_codes(csv_path: str | Path) -> dict[str, str]:
    """Read an IRMA code list (``image_id;irma_code;...``, semicolon-separated, ``\\N`` = missing).

    Rows whose image id or code is missing are skipped; codes are returned as written (validate them with
    ``irma_region``).

    Args:
        csv_path: the list, e.g. ``train_codes_02.csv``.

    Returns:
        image id → IRMA code.

    Raises:
        ValueError: the file cannot be read, lacks the ``image_id`` or ``irma_code`` column, or gives one
            image id two different codes.
    """
    path = Path(csv_path)
    codes: dict[str, str] = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=";")
            missing = {"image_id", "irma_code"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: IRMA code list lacks column(s) {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                image_id = (row["image_id"] or "").strip()
                code = (row["irma_code"] or "").strip()
                if not image_id or not code or MISSING in (image_id, code):
                    continue
                if codes.setdefault(image_id, code) != code:
                    raise ValueError(
                        f"{path}:{line}: image {image_id!r} has two codes, {codes[image_id]!r} and {code!r}"
                    )
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read IRMA code list: {err}") from None
    return codes


def class_names_for(label_from: str, labels: Iterable[str | None], drop: Iterable[str] = ()) -> list[str]:
    """The class names in index order.

    Args:
        label_from: the label source ("irma", "folder", "csv" or "none").
        labels: the label of every item; ``None`` (unlabeled) is ignored.
        drop: class names to leave out.

    Returns:
        For "irma", the regions present in the fixed order of their region digit; otherwise the sorted
        unique names. Dropped names are left out.

    Raises:
        ValueError: with "irma", a label that is not a region name.
    """
    dropped = set(drop)
    present = {label for label in labels if label is not None} - dropped
    if label_from != "irma":
        return sorted(present)
    unknown = sorted(present - _REGION_ORDER.keys())
    if unknown:
        raise ValueError(f"labels {unknown} are not IRMA regions {list(REGIONS.values())}")
    return sorted(present, key=_REGION_ORDER.__getitem__)
