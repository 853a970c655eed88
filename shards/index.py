"""DALI ``.idx`` (v1.2) files: parse them, check them against their tar, read samples by position.

An index holds one line per sample, ``<ext> <data offset> <size> <member name>`` for each member in tar
order, after a header ``v1.2 <samples>`` (the format of DALI's ``wds2idx`` and of ``radstream.shards.builder.writer``).
With it a sample's bytes are one ``pread`` away, no tar scan needed.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from radstream.shards.layout import UnsafePathError, safe_rel

INDEX_VERSION = "v1.2"
_MAX_PROBLEMS = 50  # verify_index reports at most this many mismatches, then a count of the rest


@dataclass(frozen=True)
class IndexEntry:
    """One sample of an index."""

    key: str
    """Sample key: the member name up to its first dot."""
    components: dict[str, tuple[int, int]]
    """Extension -> (data offset in the tar, size in bytes), in tar order."""

    @property
    def span(self) -> tuple[int, int]:
        """(start, end) byte range covering all the sample's member data (headers between included)."""
        starts = [off for off, _ in self.components.values()]
        ends = [off + size for off, size in self.components.values()]
        return min(starts), max(ends)


def split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, extension), split at the first dot of the last path part, as wds2idx does."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _parse_line(line: str, lineno: int) -> IndexEntry:
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ValueError(f"line {lineno}: expected groups of 'ext offset size name', got {line!r}")
    key = None
    components: dict[str, tuple[int, int]] = {}
    for i in range(0, len(fields), 4):
        ext, offset, size, name = fields[i : i + 4]
        try:
            off, length = int(offset), int(size)
        except ValueError:
            raise ValueError(f"line {lineno}: non-integer offset/size in {line!r}") from None
        if off < 0 or length < 0:
            raise ValueError(f"line {lineno}: negative offset/size in {line!r}")
        try:
            safe_rel(name, "member name")
        except UnsafePathError as err:
            raise ValueError(f"line {lineno}: {err}") from None
        name_key, name_ext = split_name(name)
        if name_ext != ext:
            raise ValueError(f"line {lineno}: extension {ext!r} does not match member name {name!r}")
        if key is None:
            key = name_key
        elif name_key != key:
            raise ValueError(f"line {lineno}: members of different samples ({key!r}, {name_key!r})")
        if ext in components:
            raise ValueError(f"line {lineno}: extension {ext!r} twice for sample {key!r}")
        components[ext] = (off, length)
    return IndexEntry(key, components)


def parse_index(lines: Iterable[str]) -> list[IndexEntry]:
    """Parse the text lines of a v1.2 index (see ``read_index``)."""
    it = iter(lines)
    header = next(it, "").split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ValueError(f"line 1: expected header '{INDEX_VERSION} <samples>', got {' '.join(header)!r}")
    entries = [_parse_line(line, lineno) for lineno, line in enumerate(it, start=2) if line.strip()]
    if len(entries) != int(header[1]):
        raise ValueError(f"header says {header[1]} samples, found {len(entries)} lines")
    return entries


def read_index(idx_path: str | os.PathLike[str]) -> list[IndexEntry]:
    """Read a DALI v1.2 index file.

    Returns:
        One entry per sample, in tar order.

    Raises:
        ValueError: the file is not a well-formed v1.2 index (the message names the line).
    """
    with open(idx_path, encoding="utf-8") as f:
        try:
            return parse_index(f)
        except ValueError as err:
            raise ValueError(f"{idx_path}: {err}") from None


class ShardReader:
    """Random access to the samples of one shard, by position in its index.

    The tar is opened once (a single file descriptor, opened on first read) and read with ``os.pread``, so
    no file position is shared: one reader can serve many threads at once. After a fork the reader notices
    the new process and opens its own descriptor, and pickling drops the descriptor, so a reader made in a
    parent can be handed to DataLoader workers (fork or spawn). ``close()`` (or ``with``) releases the
    descriptor; a later read opens it again. Cost per open reader: one descriptor and the parsed index.

    Args:
        tar_path: the shard.
        idx_path: its index; default: the tar's path with ``.idx``.
        entries: its index already read (``read_index``), not read again.
    """

    def __init__(
        self,
        tar_path: str | os.PathLike[str],
        idx_path: str | os.PathLike[str] | None = None,
        entries: list[IndexEntry] | None = None,
    ):
        self.tar_path = Path(tar_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.tar_path.with_suffix(".idx")
        self.entries: list[IndexEntry] = read_index(self.idx_path) if entries is None else entries
        self._positions: dict[str, int] | None = None
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def keys(self) -> list[str]:
        """Sample keys in shard order."""
        return [e.key for e in self.entries]

    def position(self, key: str) -> int:
        """Position of the sample with ``key`` (KeyError if absent)."""
        if self._positions is None:
            self._positions = {e.key: i for i, e in enumerate(self.entries)}
        return self._positions[key]

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.tar_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._pid = os.getpid()
        return self._fd

    def _pread(self, start: int, end: int) -> bytes:
        data = os.pread(self._descriptor(), end - start, start)
        if len(data) != end - start:
            raise ValueError(f"{self.tar_path}: truncated, wanted bytes {start}..{end}, got {len(data)}")
        return data

    def read(self, position: int, exts: Sequence[str] | None = None) -> dict[str, bytes]:
        """The members of the sample at ``position`` (negative counts from the end).

        Args:
            position: sample position in the shard.
            exts: extensions to return (KeyError when one is missing); default all, in tar order.

        Returns:
            Extension -> exact member bytes. The sample's members are fetched with a single read.
        """
        entry = self.entries[position]
        wanted = list(entry.components) if exts is None else list(exts)
        parts = {ext: entry.components[ext] for ext in wanted}
        start = min(off for off, _ in parts.values())
        end = max(off + size for off, size in parts.values())
        block = self._pread(start, end)
        return {ext: block[off - start : off - start + size] for ext, (off, size) in parts.items()}

    __getitem__ = read
    sample = read  # the name radstream.shards.builder.verify uses

    def __iter__(self) -> Iterator[dict[str, bytes]]:
        return (self.read(i) for i in range(len(self)))

    def close(self) -> None:
        """Release the file descriptor (only if this process opened it)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # interpreter shutdown or a half-built reader
            self.close()


def scan_tar(tar_path: str | os.PathLike[str]) -> list[IndexEntry]:
    """Index a tar by reading its headers, grouping members as wds2idx does.

    Raises :class:`~radstream.shards.layout.UnsafePathError` for a member name with ``..`` or an absolute path.
    Regular files only; consecutive members with the same key form one sample; hidden files (name starting
    with a dot) and entries under folders whose key would be empty are skipped. Plain ustar headers (what
    the shard writer and most tools write) are read directly, ~5x faster than ``tarfile``; a tar with
    anything else (pax or GNU long-name headers, base-256 sizes, a bad checksum, a truncated header) is read by
    ``tarfile``, which decides what it means.
    """
    members = _ustar_members(tar_path)
    if members is None:
        with tarfile.open(tar_path, "r:") as tar:
            members = [(m.name, m.isreg(), m.offset_data, m.size) for m in tar]
    entries: list[IndexEntry] = []
    for name, regular, offset, size in members:
        safe_rel(name, f"{tar_path}: member name")  # before any name is used
        if not regular:
            continue
        key, ext = split_name(name)
        if not key or key.endswith("/"):
            continue
        if entries and entries[-1].key == key:
            entries[-1].components[ext] = (offset, size)
        else:
            entries.append(IndexEntry(key, {ext: (offset, size)}))
    return entries


_REGULAR = (b"0", b"\0", b"7")  # tarfile.REGULAR_TYPES less sparse files
_OTHER = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, fifos: no data follows
_ZERO_BLOCK = bytes(512)


def _ustar_members(tar_path: str | os.PathLike[str]) -> list[tuple[str, bool, int, int]] | None:
    """``(name, regular, data offset, size)`` of every member, read from plain ustar headers as ``tarfile``
    reads them; None as soon as a header is anything else (the caller asks ``tarfile``)."""
    members = []
    with open(tar_path, "rb") as fh:
        offset, end = 0, os.fstat(fh.fileno()).st_size
        while True:
            if offset > end:
                return None  # the last member's data runs past the end: tarfile's "unexpected end of data"
            fh.seek(offset)
            header = fh.read(512)
            if not header:
                return members if offset else None  # an empty file is tarfile's error to raise
            if len(header) < 512:
                return None
            if header == _ZERO_BLOCK:
                return members if offset else None
            kind = header[156:157]
            if kind not in _REGULAR and kind not in _OTHER:
                return None
            try:
                stored = int(header[148:156].replace(b"\0", b" ").strip() or b"x", 8)
                size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
            except ValueError:
                return None  # base-256 numbers, a damaged field
            if stored != sum(header[:148]) + 256 + sum(header[156:]):  # the checksum field counts as spaces
                return None
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            folder = kind == b"5" or (kind == b"\0" and name.endswith("/"))  # tarfile: a V7 folder
            name = name.rstrip("/") if folder else name
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:  # a long ustar name; elsewhere (GNU headers) those bytes mean something else
                if header[257:265] != b"ustar\x0000":
                    return None
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            regular = kind in _REGULAR and not folder
            members.append((name, regular, offset + 512, size))
            offset += 512 + (-(-size // 512) * 512 if regular else 0)


def _compare(expected: list[IndexEntry], found: list[IndexEntry]) -> Iterator[str]:
    if len(expected) != len(found):
        yield f"index has {len(found)} samples, tar has {len(expected)}"
    for pos, (want, got) in enumerate(zip(expected, found, strict=False)):  # counts compared above
        if want.key != got.key:
            yield f"sample {pos}: index key {got.key!r}, tar key {want.key!r}"
        elif want.components != got.components:
            yield f"sample {pos} ({want.key}): index members {got.components}, tar members {want.components}"


def verify_index(
    tar_path: str | os.PathLike[str], idx_path: str | os.PathLike[str], found: list[IndexEntry] | None = None
) -> list[str]:
    """Check an index against the actual members of its tar (``found``: the index already read).

    Returns:
        Problems found, one line each (empty when the index matches the tar exactly): an unreadable index
        or tar, a truncated tar, a different sample count, or a sample whose key, extensions, offsets or
        sizes differ.
    """
    try:
        found = read_index(idx_path) if found is None else found
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return [f"unreadable index: {err}"]
    try:
        expected = scan_tar(tar_path)
    except (OSError, tarfile.TarError) as err:
        return [f"unreadable tar {tar_path}: {err}"]
    except UnsafePathError as err:
        return [str(err)]
    problems = []
    tar_size = os.path.getsize(tar_path)
    if expected and max(e.span[1] for e in expected) > tar_size:
        problems.append(f"tar {tar_path} is truncated: member data runs past its {tar_size} bytes")
    for n, problem in enumerate(_compare(expected, found)):
        if n == _MAX_PROBLEMS:
            rest = sum(1 for _ in _compare(expected, found)) - n
            problems.append(f"... and {rest} more")
            break
        problems.append(problem)
    return problems
