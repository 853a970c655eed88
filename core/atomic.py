"""Write-then-rename: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _tmp_name(path: Path) -> Path:
    # Hidden, beside the target (same filesystem, so the rename is atomic), unique per process so that two
    # processes writing the same file never share a temporary.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_with(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], Any], *, durable: bool = False
) -> Path:
    """Write ``path`` atomically through ``write(file)``; with ``durable``, fsync the file before the rename.

    On any error the temporary is removed and the old ``path`` (if any) is left as it was.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_with(path, lambda f: f.write(data), durable=durable)


def write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(
    path: str | os.PathLike[str], value: Any, *, indent: int | None = 1, durable: bool = False
) -> Path:
    """Write ``value`` as JSON to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent), durable=durable)
