"""Shard datasets on object storage (``s3://``) or a web server (``http(s)://``), read through a node cache.

``open_dataset(url)`` gives a :class:`~radstream.shards.store.ShardStore`: the manifest, the samples table and, per
shard, ``local_path(rel)`` / ``open(rel)``. :class:`RemoteStore` knows the remote side: what each file is
(its size, how to download it, how to tell it is right: a :class:`~radstream.shards.cache_files.Fetch`), prefetching on a
thread pool, and refreshing the cached manifest and samples table when the server's changed. Fetching into
the node cache (locks, space, download, verify, commit, re-checking a cached file) is one call of the cache
(``radstream.shards.cache.ShardCache.fetch`` / ``open``). A local folder goes through the same interface without a copy.

Verification: a tar must match the manifest's sha256 (one more download on a mismatch, then
:class:`ChecksumError`); the manifest has no hash for the ``.idx``, so an index is checked against its
(verified) tar member by member (``radstream.shards.index.verify_index``), which also re-derives every offset.
``samples.parquet`` must hold the manifest's count of written samples. Transfers and retries:
``radstream.shards.transport``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from radstream.core.atomic import write_bytes
from radstream.shards.cache import Cancelled, ShardCache
from radstream.shards.cache_files import ChecksumError, Fetch
from radstream.shards.index import verify_index
from radstream.shards.integrity import cache_base, sha256_of
from radstream.shards.layout import MANIFEST, SAMPLES, DatasetError, check_manifest_paths, shard_entries
from radstream.shards.loader_config import RemoteConfig
from radstream.shards.store import ShardStore
from radstream.shards.transport import filesystem, is_remote, s3_endpoint, with_retries

log = logging.getLogger(__name__)

__all__ = ["ChecksumError", "RemoteStore", "cache_folder", "open_dataset", "resolve_dataset"]


def cache_folder(url: str, cfg: RemoteConfig) -> Path:
    """The node cache folder of the dataset at ``url`` (its endpoint is part of the identity)."""
    identity = url.rstrip("/") + ("|" + (s3_endpoint(cfg) or "") if url.startswith("s3://") else "")
    return cache_base(cfg.cache_dir) / hashlib.sha256(identity.encode()).hexdigest()[:16]


class RemoteStore(ShardStore):
    """A shard dataset at an ``s3://`` or ``http(s)://`` URL, fetched into a node cache on demand."""

    remote = True

    def __init__(self, url: str, cfg: RemoteConfig) -> None:
        self.url, self.cfg = url.rstrip("/"), cfg
        self.cache = ShardCache(cache_folder(url, cfg), cfg.max_cache_bytes, cfg.cache_group)
        self.root = self.cache.root
        self._reset()
        self.manifest = self._sync_metadata()
        self._shards = shard_entries(self.manifest)

    def _reset(self) -> None:
        """Per-process state: made anew after pickling or a fork."""
        self._pid = os.getpid()
        self._fs = None
        self._executor: ThreadPoolExecutor | None = None
        self._stop = threading.Event()  # set by close: running prefetches stop waiting for locks
        self._pending: dict[str, Future] = {}
        self._pins: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        keep = ("url", "cfg", "cache", "root", "manifest", "_shards")
        return {k: v for k, v in self.__dict__.items() if k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _check_pid(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's threads and pins are not ours
            for fd in self._pins.values():
                os.close(fd)  # the parent's descriptor keeps its lock; closing our copy releases nothing
            self._reset()

    @property
    def fs(self):
        """The fsspec filesystem (made lazily, per process)."""
        self._check_pid()
        if self._fs is None:
            self._fs, self._base = filesystem(self.url, self.cfg)
        return self._fs

    def _get(
        self, rel: str, start: int | None = None, end: int | None = None, size: int | None = None
    ) -> bytes:
        """Bytes ``start:end`` of ``rel`` (whole file by default), retried; a short body counts as a failure."""
        fs = self.fs
        path, want = f"{self._base}/{rel}", (end - start if start is not None else size)

        def call() -> bytes:
            data = fs.cat_file(path, start=start, end=end)
            if start is not None and size is not None and len(data) == size != want:
                data = data[start:end]  # the server ignored the Range header and sent the whole file
            if want is not None and len(data) != want:
                raise ConnectionError(f"short read: {len(data)} of {want} bytes")
            return data

        try:
            return with_retries(call, f"GET {self.url}/{rel}", self.cfg.retries, self.cfg.backoff_s)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.url}/{rel}: not found") from None

    def _sync_metadata(self) -> dict:
        """Read the manifest from the URL; refresh the cached manifest and samples table when it changed."""
        raw = self._get("manifest.json")
        try:
            manifest = json.loads(raw)
        except ValueError as err:
            raise DatasetError(f"{self.url}/manifest.json: unreadable manifest ({err})") from None
        check_manifest_paths(manifest, f"{self.url}/manifest.json")  # before anything is cached
        cached, samples = self.root / MANIFEST, self.root / SAMPLES
        with self.cache.cache_lock():  # one process per node refreshes; the others then find it done
            old = cached.read_bytes() if cached.is_file() else None
            if old == raw and self._cached_samples_ok(samples, manifest):
                return manifest
            if old is not None and old != raw:
                self._invalidate(json.loads(old), manifest)
            data = self._get("samples.parquet")
            expected = manifest.get("samples_sha256")
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                raise DatasetError(f"{self.url}/samples.parquet: sha256 differs from the manifest")
            rows = pq.read_metadata(pa.BufferReader(data)).num_rows
            written = manifest.get("counts", {}).get("written", rows)
            if rows != written:
                raise DatasetError(f"{self.url}/samples.parquet has {rows} rows, the manifest says {written}")
            for path, content in ((samples, data), (cached, raw)):  # manifest last: it marks "complete"
                write_bytes(path, content).chmod(self.cache.file_mode)
        return manifest

    def _cached_samples_ok(self, samples: Path, manifest: dict) -> bool:
        """Whether the cached samples table is present and hashes to the manifest's ``samples_sha256`` (once
        per process and file state: the loader's own check then reuses the hash). A damaged copy is fetched
        again, as a damaged cached shard is, rather than failing every later run."""
        if not samples.is_file():
            return False
        expected = manifest.get("samples_sha256")
        if expected is None or sha256_of(samples) == expected:
            return True
        log.warning(
            "%s/%s: the cached copy differs from the manifest's sha256; fetching it again", self.url, SAMPLES
        )
        return False

    def _invalidate(self, old: dict, new: dict) -> None:
        """Drop cached shards whose bytes the new manifest does not list any more."""
        fresh = shard_entries(new)
        for rel, entry in shard_entries(old).items():
            now = fresh.get(rel)
            if now is not None and now["sha256"] == entry["sha256"]:
                continue
            if self.cache.path(rel).exists() and not self.cache.evict(rel):
                raise RuntimeError(
                    f"the dataset at {self.url} changed, but its old shard {rel} is open in another "
                    "process of this node; stop those readers first"
                )
        log.info("dataset at %s changed since it was cached; stale shards dropped", self.url)

    def _ensure(self, rel: str, cancel: threading.Event | None = None) -> Path:
        """The cached, verified file of ``rel`` (see ``ShardCache.fetch``). With ``cancel`` (a prefetch),
        setting it ends a wait for the download lock or a chunked download early, raising
        :class:`~radstream.shards.cache.Cancelled`."""
        return self.cache.fetch(rel, self._spec(rel, cancel), cancel)

    def _spec(self, rel: str, cancel: threading.Event | None = None) -> Fetch:
        """How to fetch ``rel`` and how to tell it is right: a tar against the manifest's sha256 (in ranged
        chunks), an index against its tar, anything else (small) as it comes."""
        source = f"{self.url}/{rel}"
        entry = self._shards.get(rel)
        if entry is not None:
            expected, size = entry["sha256"], entry["bytes"]
            return Fetch(
                size=lambda: size,
                download=lambda partial: self._download(rel, partial, size, cancel),
                problems=lambda digest, _: (
                    [] if digest == expected else [f"sha256 {digest}, the manifest says {expected}"]
                ),
                sha256=expected,
                source=source,
            )
        body: list[bytes] = []  # a small file's size is known once it is fetched: one GET serves both

        def size() -> int:
            body[:] = [self._get(rel)]
            return len(body[0])

        tar = rel[: -len(".idx")] + ".tar" if rel.endswith(".idx") else None
        checks = {"problems": lambda _, path: self._index_problems(tar, path)} if tar in self._shards else {}
        return Fetch(
            size=size,
            download=lambda partial: self._write(partial, body.pop() if body else self._get(rel)),
            source=source,
            **checks,
        )

    def _index_problems(self, tar: str, idx: Path) -> list[str]:
        """A shard's .idx against its (verified) tar, which stays held meanwhile."""
        fd = self.open(tar)
        try:
            return verify_index(self.cache.path(tar), idx)
        finally:
            os.close(fd)

    @staticmethod
    def _write(partial: Path, data: bytes) -> str:
        with open(partial, "r+b") as f:
            f.write(data)
            f.truncate(len(data))  # a second download may differ in size from the space reserved
            f.flush()
            os.fsync(f.fileno())
        return hashlib.sha256(data).hexdigest()

    def _download(self, rel: str, partial: Path, size: int, cancel: threading.Event | None = None) -> str:
        """Fetch ``rel`` into ``partial`` in ranged chunks (each retried alone); returns the sha256.
        ``cancel`` set between two chunks raises :class:`~radstream.shards.cache.Cancelled`."""
        sha, chunk = hashlib.sha256(), self.cfg.chunk_bytes
        with open(partial, "r+b") as f:
            if size <= chunk:  # one plain GET: no Range support needed from the server
                data = self._get(rel, size=size)
                f.write(data)
                sha.update(data)
            for start in range(0, size if size > chunk else 0, chunk):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"download of {self.url}/{rel} cancelled")
                data = self._get(rel, start, min(start + chunk, size), size)
                f.write(data)
                sha.update(data)
            f.flush()
            os.fsync(f.fileno())  # a machine crash must not leave a torn file under the final name
        return sha.hexdigest()

    def open(self, rel: str | os.PathLike[str]) -> int:
        """A read-only descriptor of ``rel``'s cached file holding a shared lock: the file cannot be evicted
        until the caller closes it. Fetches the file first if needed (blocking)."""
        rel = self.rel(rel)
        self._check_pid()
        return self.cache.open(rel, self._spec(rel))

    def local_path(self, rel: str | os.PathLike[str]) -> Path:
        """The cached file of ``rel``, fetched and verified if needed. A shard (or, for an .idx, its tar) stays
        held, so not evictable, until ``release(rel)``, ``close()`` or ``max_pinned`` newer holds."""
        rel = self.rel(rel)
        tar = rel[: -len(".idx")] + ".tar" if rel.endswith(".idx") else rel
        if tar in self._shards:
            with self._lock:
                held = tar in self._pins
            if not held:
                self._pin(tar, self.open(tar))
        return self._ensure(rel)

    def _pin(self, rel: str, fd: int) -> None:
        with self._lock:
            old = self._pins.pop(rel, None)
            self._pins[rel] = fd
            drop = [self._pins.popitem(last=False)[1] for _ in range(len(self._pins) - self.cfg.max_pinned)]
        for other in [old, *drop]:
            if other is not None:
                os.close(other)

    def release(self, rel: str | os.PathLike[str]) -> None:
        """Let the hold ``local_path`` took on ``rel`` (or its tar) go."""
        rel = self.rel(rel)
        with self._lock:
            fd = self._pins.pop(rel[: -len(".idx")] + ".tar" if rel.endswith(".idx") else rel, None)
        if fd is not None:
            os.close(fd)

    def prefetch(self, rels: Sequence[str | os.PathLike[str]]) -> None:
        """Queue ``rels`` for download on ``cfg.prefetch`` threads, in order; cached or queued ones are skipped.
        Errors are logged here and raised again by the reader's own ``open`` / ``local_path``."""
        self._check_pid()
        with self._lock:
            if self._executor is None:
                self._stop = threading.Event()
                self._executor = ThreadPoolExecutor(
                    self.cfg.prefetch, thread_name_prefix="radstream-prefetch"
                )
            for rel in map(self.rel, rels):
                if rel in self._pending or self.cache.path(rel).exists():
                    continue
                future = self._executor.submit(self._prefetch_one, rel, self._stop)
                self._pending[rel] = future
                future.add_done_callback(lambda _, rel=rel: self._pending.pop(rel, None))

    def _prefetch_one(self, rel: str, stop: threading.Event) -> None:
        try:
            self._ensure(rel, stop)
        except Cancelled:
            pass  # closing: whoever holds the lock (maybe another process of the node) finishes the file
        except Exception as err:  # noqa: BLE001 - a background thread: the reader's own fetch raises it again
            log.warning("prefetch of %s/%s failed: %s: %s", self.url, rel, type(err).__name__, err)

    def wait(self) -> None:
        """Block until every queued prefetch has finished."""
        with self._lock:
            futures = list(self._pending.values())
        for future in futures:
            future.result()

    def close(self) -> None:
        """Cancel queued prefetches, stop running ones (a wait for a lock that another process of the node
        holds, a chunked download), let every hold go. Returns within about one chunk's transfer."""
        self._check_pid()
        if self._executor is not None:
            self._stop.set()  # a blocked prefetch would otherwise hold close (and the process's exit) forever
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        with self._lock:
            fds, self._pins = list(self._pins.values()), OrderedDict()
        for fd in fds:
            os.close(fd)


def open_dataset(url: str | os.PathLike[str], cfg: RemoteConfig | None = None, **overrides) -> ShardStore:
    """Open a shard dataset from a local folder, ``s3://bucket/prefix`` or an ``http(s)://`` base URL.

    Args:
        url: where the dataset's ``manifest.json`` lies.
        cfg: cache and transfer settings (default ``RemoteConfig()``).
        **overrides: fields of ``RemoteConfig`` to change, e.g. ``cache_dir=..., max_cache_bytes=...``.

    Raises:
        FileNotFoundError: no manifest at ``url``.
        RemoteError: the server kept failing.
    """
    cfg = dataclasses.replace(cfg or RemoteConfig(), **overrides)
    if is_remote(url):
        return RemoteStore(str(url), cfg)
    return ShardStore(str(url).removeprefix("file://"))


def resolve_dataset(root: str | os.PathLike[str], cfg: RemoteConfig | None = None) -> tuple[Path, ShardStore]:
    """For the loader: (a local folder laid out like the dataset, the store that fills it).

    A local dataset is its own folder; a remote one is its cache folder, holding the manifest and samples
    table, whose shards appear once ``store.open`` / ``store.local_path`` / ``store.prefetch`` fetched them.
    """
    store = open_dataset(root, cfg)
    return store.root, store
