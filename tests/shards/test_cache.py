"""The node cache's fetch protocol in one call, without a server: lock → reserve → download → verify →
commit → open, and the re-check of a cached file against the sha256 taken when it was downloaded."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from radstream.shards.cache import CHECKSUM_ATTEMPTS, ShardCache
from radstream.shards.cache_files import ChecksumError, Fetch

DATA = bytes(range(256)) * 40
SHA = hashlib.sha256(DATA).hexdigest()


class Source:
    """A remote file made of local bytes; counts its downloads."""

    def __init__(self, data: bytes = DATA) -> None:
        self.data, self.downloads = data, 0

    def download(self, partial: Path) -> str:
        self.downloads += 1
        with open(partial, "r+b") as f:
            f.write(self.data)
            f.truncate(len(self.data))
        return hashlib.sha256(self.data).hexdigest()

    def fetch(self, expected: str = SHA) -> Fetch:
        return Fetch(
            size=lambda: len(self.data),
            download=self.download,
            problems=lambda sha, _: [] if sha == expected else [f"sha256 {sha}, expected {expected}"],
            sha256=expected,
            source="mem://a.tar",
        )


def test_a_file_is_fetched_once_committed_and_opened(tmp_path: Path) -> None:
    cache, source = ShardCache(tmp_path), Source()
    path = cache.fetch("train/a.tar", source.fetch())
    assert path.read_bytes() == DATA and not cache.partial_path("train/a.tar").exists()
    fd = cache.open("train/a.tar", source.fetch())
    try:
        assert os.pread(fd, 16, 0) == DATA[:16]
        assert not cache.evict("train/a.tar")  # held open: not evictable
    finally:
        os.close(fd)
    assert ShardCache(tmp_path).fetch("train/a.tar", source.fetch()) == path  # another process's view
    assert source.downloads == 1


def test_threads_share_one_download(tmp_path: Path) -> None:
    cache, source, gate = ShardCache(tmp_path), Source(), threading.Barrier(4)

    def fetch() -> None:
        gate.wait()
        cache.fetch("a.tar", source.fetch())

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert source.downloads == 1


def test_a_changed_cached_file_is_fetched_again(tmp_path: Path) -> None:
    cache, source = ShardCache(tmp_path), Source()
    path = cache.fetch("a.tar", source.fetch())
    path.write_bytes(DATA[:100] + bytes(32) + DATA[132:])  # flipped in place: a new mtime
    assert ShardCache(tmp_path).fetch("a.tar", source.fetch()).read_bytes() == DATA
    assert source.downloads == 2


def test_a_touched_but_intact_file_is_hashed_not_fetched(tmp_path: Path) -> None:
    cache, source = ShardCache(tmp_path), Source()
    path = cache.fetch("a.tar", source.fetch())
    os.utime(path, ns=(1, 1))  # the stamp no longer matches; the bytes do
    assert ShardCache(tmp_path).fetch("a.tar", source.fetch()) == path
    assert source.downloads == 1
    cache.evict("a.tar")
    assert not cache.stamps.path("a.tar").exists()


def test_a_new_expected_sha256_replaces_the_cached_file(tmp_path: Path) -> None:
    cache, old = ShardCache(tmp_path), Source()
    cache.fetch("a.tar", old.fetch())
    new = Source(DATA[::-1])
    assert cache.fetch("a.tar", new.fetch(hashlib.sha256(new.data).hexdigest())).read_bytes() == new.data


def test_a_file_that_stays_wrong_fails_after_the_last_attempt(tmp_path: Path) -> None:
    cache, source = ShardCache(tmp_path), Source()
    with pytest.raises(ChecksumError, match="mem://a.tar: corrupt after"):
        cache.fetch("a.tar", source.fetch("0" * 64))
    assert source.downloads == CHECKSUM_ATTEMPTS
    assert not cache.path("a.tar").exists() and not cache.partial_path("a.tar").exists()


def test_eviction_goes_by_last_use_and_keeps_the_commit_mtime(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path, max_bytes=3 * len(DATA))
    for name in ("a.tar", "b.tar", "c.tar"):
        cache.fetch(name, Source().fetch())
    mtime = cache.path("a.tar").stat().st_mtime_ns
    os.close(cache.open("a.tar", Source().fetch()))  # a used again: b is now the least recent
    assert cache.path("a.tar").stat().st_mtime_ns == mtime
    cache.fetch("d.tar", Source().fetch())
    assert [cache.path(n).exists() for n in ("a.tar", "b.tar", "c.tar", "d.tar")] == [True, False, True, True]


def test_stamps_follow_the_cache_modes(tmp_path: Path) -> None:
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    cache = ShardCache(tmp_path / "shared", group=group)
    cache.fetch("train/a.tar", Source().fetch())
    stamp = cache.stamps.path("train/a.tar")
    assert stamp.stat().st_mode & 0o777 == 0o660 and stamp.parent.stat().st_mode & 0o7777 == 0o2770
