"""Deterministic WebDataset tar writer that writes DALI's ``.idx`` (v1.2) as it goes.

Each shard ``<prefix>-<n:06d>.tar`` is written to ``<name>.tar.partial`` and its index to
``<name>.idx.partial``; on completion both are flushed and fsynced, then the tar is renamed into place and
the index after it. So a finished-looking shard is always whole, and a tar without its ``.idx`` means the
build stopped between the two renames (rebuild that shard).

Tar layout: plain POSIX ustar headers built here (not by ``tarfile``, whose header details vary between
Python versions), name ``<key>.<ext>``, mode 0o644, uid/gid 0, empty uname/gname, mtime 0, regular files
only, data padded to 512 bytes, two zero blocks at the end and the file padded to a 10240-byte record (as
``tarfile`` and GNU tar do). The same samples in the same order give byte-identical shards.

The index is the text DALI's ``wds2idx`` writes for the same tar, byte for byte: ``v1.2 <samples>`` and one
line per sample ``<ext> <data offset> <size> <member name>`` for each member in tar order. Offsets are known
while writing, so no second pass over the tar is needed; the lines are kept in memory (about 100 bytes per
sample) because the header carries the sample count.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

log = logging.getLogger(__name__)

BLOCK_SIZE = 512
RECORD_SIZE = 20 * BLOCK_SIZE  # tar's default blocking factor, as tarfile and GNU tar pad
INDEX_VERSION = "v1.2"
MAX_NAME_LENGTH = 100  # ustar name field, without using the prefix field
MAX_MEMBER_BYTES = 8**11 - 1  # 11 octal digits in the ustar size field

# Letters, digits, '_' and '-': no '.' (webdataset splits the key from the extension at the first dot),
# no '/' (no folders in our shards), no whitespace (the .idx is whitespace separated), nothing that GNU tar
# would quote when wds2idx lists the archive.
_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")
_EXT_RE = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard."""

    path: str
    """File name of the tar, relative to the writer's ``out_dir``; the index is the same name with ``.idx``."""
    samples: int
    """Samples in the shard."""
    bytes: int
    """Size of the tar file in bytes."""
    sha256: str
    """Hex SHA-256 of the tar file, computed while writing."""


class Placement(NamedTuple):
    """Where ``ShardWriter.write`` put a sample."""

    shard: str
    """File name of the shard's tar (relative to ``out_dir``), final name, valid once the writer is closed."""
    index: int
    """Position of the sample inside that shard (0-based), the position ``ShardReader`` reads it by."""


def _octal(value: int, width: int) -> bytes:
    """A ustar numeric field: zero-padded octal digits and a NUL."""
    return f"{value:0{width - 1}o}".encode("ascii") + b"\0"


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file ``name`` of ``size`` bytes, fixed metadata."""
    raw = name.encode("ascii")
    fields = [
        raw.ljust(100, b"\0"),  # name
        _octal(0o644, 8),  # mode
        _octal(0, 8),  # uid
        _octal(0, 8),  # gid
        _octal(size, 12),  # size
        _octal(0, 12),  # mtime
        b" " * 8,  # checksum, counted as spaces while summing
        b"0",  # typeflag: regular file
        b"\0" * 100,  # linkname
        b"ustar\0" + b"00",  # magic, version
        b"\0" * 32,  # uname
        b"\0" * 32,  # gname
        b"\0" * 16,  # devmajor, devminor: empty for a regular file
        b"\0" * 155,  # prefix
    ]
    header = b"".join(fields).ljust(BLOCK_SIZE, b"\0")
    checksum = f"{sum(header):06o}".encode("ascii") + b"\0 "
    return header[:148] + checksum + header[156:]


def _padding(size: int, multiple: int) -> int:
    return -size % multiple


def member_span(size: int) -> int:
    """Bytes one member takes in the tar: header plus data padded to a block."""
    return BLOCK_SIZE + size + _padding(size, BLOCK_SIZE)


def finished_size(offset: int) -> int:
    """Size of a tar whose members end at ``offset`` once the end blocks and record padding are added."""
    end = offset + 2 * BLOCK_SIZE
    return end + _padding(end, RECORD_SIZE)


def check_key(key: str) -> None:
    """Raise ValueError unless ``key`` is a key this writer accepts (letters, digits, '_', '-')."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only (no dots)")


class _OpenShard:
    """One shard being written: the partial tar, the sha256 and the index lines."""

    def __init__(self, out_dir: Path, name: str, fsync: bool) -> None:
        self.name = name
        self.tar_path = out_dir / name
        self.idx_path = self.tar_path.with_suffix(".idx")
        self.tar_partial = self.tar_path.with_name(self.tar_path.name + ".partial")
        self.idx_partial = self.idx_path.with_name(self.idx_path.name + ".partial")
        self.fsync = fsync
        self.file: BinaryIO = open(self.tar_partial, "wb", buffering=1 << 20)  # noqa: SIM115
        self.sha = hashlib.sha256()
        self.offset = 0
        self.lines: list[str] = []

    @property
    def samples(self) -> int:
        return len(self.lines)

    def _write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.offset += len(data)

    def add(self, key: str, members: dict[str, memoryview]) -> None:
        parts = []
        for ext, data in members.items():
            name = f"{key}.{ext}"
            self._write(ustar_header(name, len(data)))
            parts.append(f"{ext} {self.offset} {len(data)} {name}")
            self._write(data)
            self._write(b"\0" * _padding(len(data), BLOCK_SIZE))
        self.lines.append(" ".join(parts))

    def finish(self) -> ShardInfo:
        """Write the end of the archive and the index, then rename both into place (tar first)."""
        self._write(b"\0" * (finished_size(self.offset) - self.offset))
        self._close_synced(self.file)
        with open(self.idx_partial, "w", encoding="ascii", newline="\n") as idx:
            idx.write(f"{INDEX_VERSION} {len(self.lines)}\n")
            idx.writelines(line + "\n" for line in self.lines)
            self._close_synced(idx)
        os.replace(self.tar_partial, self.tar_path)
        os.replace(self.idx_partial, self.idx_path)
        if self.fsync:
            _fsync_dir(self.tar_path.parent)
        return ShardInfo(self.name, self.samples, self.offset, self.sha.hexdigest())

    def _close_synced(self, f) -> None:
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())
        f.close()

    def abort(self) -> None:
        """Close and delete the partial files."""
        self.file.close()
        for path in (self.tar_partial, self.idx_partial):
            path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the data files themselves are synced
    finally:
        os.close(fd)


class ShardWriter:
    """Writes samples into a numbered series of tar shards, each with its DALI index.

    Use as a context manager: on a clean exit the last shard is finished; when the block raises, the shard
    in progress is deleted (finished shards stay) and the exception propagates.

    Example:
        >>> with ShardWriter(out / "train" / "224x288", "train-224x288-0003") as w:  # doctest: +SKIP
        ...     w.write("s000001", {"jpg": jpg_bytes, "cls": b"3", "json": meta_bytes})
        >>> w.infos  # doctest: +SKIP

    Args:
        out_dir: folder for the shards (created if missing).
        prefix: shard name prefix; shards are ``<prefix>-<n:06d>.tar``, n from 0.
        max_samples: most samples in one shard.
        max_bytes: most bytes in one finished tar file. A single sample larger than this still gets a shard
            of its own (logged as a warning), since it cannot be split.
        fsync: fsync each finished tar and index (and the folder) before/after renaming, so a crash of the
            machine, not only of the process, cannot leave a finished name over incomplete data.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        prefix: str,
        max_samples: int = 10_000,
        max_bytes: int = 1 << 30,
        fsync: bool = True,
    ) -> None:
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"invalid shard prefix {prefix!r}: a non-empty file name prefix without '/'")
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shard: _OpenShard | None = None
        self._infos: list[ShardInfo] = []
        self._keys: set[str] = set()
        self._closed = False

    @property
    def infos(self) -> list[ShardInfo]:
        """The shards finished so far, in order."""
        return list(self._infos)

    def shard_name(self, n: int) -> str:
        """File name of shard number ``n``."""
        return f"{self.prefix}-{n:06d}.tar"

    def write(self, key: str, members: dict[str, bytes]) -> Placement:
        """Append one sample; members go into the tar in the dict's order (image, then cls, then json).

        Args:
            key: the sample key (letters, digits, '_', '-'), unique within this writer.
            members: extension (letters, digits, '_') -> member bytes.

        Returns:
            The shard and the position in it where the sample went.

        Raises:
            ValueError: bad or repeated key, bad extension, empty members, a name over 100 characters or a
                member too large for ustar. Nothing is written then.
            RuntimeError: the writer is closed.
        """
        if self._closed:
            raise RuntimeError("write() on a closed ShardWriter")
        views = self._check_sample(key, members)
        span = sum(member_span(len(v)) for v in views.values())
        shard = self._shard
        if shard is not None and (
            shard.samples >= self.max_samples or finished_size(shard.offset + span) > self.max_bytes
        ):
            self._infos.append(shard.finish())
            shard = self._shard = None
        if shard is None:
            shard = self._shard = _OpenShard(self.out_dir, self.shard_name(len(self._infos)), self.fsync)
            if finished_size(span) > self.max_bytes:
                log.warning("sample %s (%d bytes) exceeds max_bytes=%d alone", key, span, self.max_bytes)
        shard.add(key, views)
        self._keys.add(key)
        return Placement(shard.name, shard.samples - 1)

    def _check_sample(self, key: str, members: dict[str, bytes]) -> dict[str, memoryview]:
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        views = {}
        for ext, data in members.items():
            if not isinstance(ext, str) or not _EXT_RE.fullmatch(ext):
                raise ValueError(f"invalid extension {ext!r} for sample {key!r}: letters, digits, '_' only")
            if len(key) + 1 + len(ext) > MAX_NAME_LENGTH:
                raise ValueError(f"member name {key}.{ext} is longer than {MAX_NAME_LENGTH} characters")
            view = memoryview(data).cast("B")
            if view.nbytes > MAX_MEMBER_BYTES:
                raise ValueError(f"member {key}.{ext} is {view.nbytes} bytes, over the ustar limit")
            views[ext] = view
        return views

    def close(self) -> list[ShardInfo]:
        """Finish the shard in progress and return all shards written (none if no sample was written)."""
        if not self._closed:
            self._closed = True
            if self._shard is not None:
                self._infos.append(self._shard.finish())
                self._shard = None
        return self.infos

    def abort(self) -> None:
        """Stop writing: delete the shard in progress; finished shards stay."""
        self._closed = True
        if self._shard is not None:
            self._shard.abort()
            self._shard = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
