"""A reference reader for the tests: one member's bytes of a tar at the offset its index names, with plain
``open``/``seek`` (independent of ``radstream.shards.index.ShardReader``'s ``pread``, which the tests check against it)."""

from __future__ import annotations

import os


def read_member(tar_path: str | os.PathLike[str], offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of ``tar_path``; fails the test when the file ends before."""
    with open(tar_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    assert len(data) == size, f"{tar_path}: wanted {size} bytes at offset {offset}, file has {len(data)}"
    return data
