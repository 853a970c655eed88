"""Shards from S3 (moto on 127.0.0.1) and HTTP (a faulty static server): publish, cache, faults, eviction."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs", reason="remote extras (s3fs) not installed")
pytest.importorskip("aiohttp", reason="remote extras (aiohttp) not installed")
pytest.importorskip("moto", reason="test extras (moto[server]) not installed")

from radstream.shards import cache as cache_module  # noqa: E402
from radstream.shards.builder.publish import publish  # noqa: E402
from radstream.shards.cache_files import CacheFullError
from radstream.shards.layout import UnsafePathError, shard_entries  # noqa: E402
from radstream.shards.loader import build_loader  # noqa: E402
from radstream.shards.loader_base import Lookahead  # noqa: E402
from radstream.shards.loader_config import LoaderConfig, RemoteConfig  # noqa: E402
from radstream.shards.manifest import read_manifest, read_samples  # noqa: E402
from radstream.shards.remote import ChecksumError, cache_folder, open_dataset, resolve_dataset  # noqa: E402
from radstream.shards.transport import RemoteError, filesystem, is_transient, s3_endpoint  # noqa: E402
from tests.shards.remote_servers import (  # noqa: E402
    S3_ENV,
    FaultyHTTPServer,
    S3Server,
    fetch_every_shard,
    read_epoch_as_rank,
)

FAST = {"backoff_s": 0.001}  # retries without real waiting


@pytest.fixture(scope="module")
def s3(tiny_shards: Path):
    """moto S3 on loopback with ``tiny_shards`` published to ``server.url``; env set for every test here.

    The prefix is new for each server: moto keeps its buckets per process, not per server."""
    server = S3Server()
    server.url = f"s3://data/tiny-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp_env:
        for key, value in {**S3_ENV, "RADSTREAM_S3_ENDPOINT": server.endpoint}.items():
            mp_env.setenv(key, value)
        mp_env.delenv("AWS_ENDPOINT_URL", raising=False)
        fs, _ = filesystem("s3://data", RemoteConfig())
        fs.makedirs("data", exist_ok=True)
        publish(tiny_shards, server.url)
        yield server
    server.stop()


@pytest.fixture
def http(tmp_path: Path, tiny_shards: Path):
    """A faulty HTTP server over a private copy of ``tiny_shards`` (tests may damage the copy)."""
    copy = tmp_path / "served"
    shutil.copytree(tiny_shards, copy, ignore=shutil.ignore_patterns("_work"))
    server = FaultyHTTPServer(copy)
    yield server
    server.stop()


def s3_path(s3, rel: str) -> str:
    """The request path of ``rel`` of the published dataset on the S3 server: /bucket/prefix/rel."""
    return f"/{s3.url.removeprefix('s3://')}/{rel}"


def tars(manifest: dict) -> list[str]:
    return sorted(shard_entries(manifest))


def idx(rel: str) -> str:
    return rel[: -len(".tar")] + ".idx"


def assert_same_files(store, local: Path) -> None:
    for rel in tars(store.manifest):
        assert store.local_path(rel).read_bytes() == (local / rel).read_bytes(), rel
        assert store.local_path(idx(rel)).read_bytes() == (local / idx(rel)).read_bytes(), rel


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_open_remote_gives_the_local_dataset(
    s3, http, tiny_shards: Path, tmp_path: Path, scheme: str
) -> None:
    url = s3.url if scheme == "s3" else http.url
    with open_dataset(url, cache_dir=str(tmp_path / "cache"), **FAST) as store:
        assert store.manifest == read_manifest(tiny_shards)
        assert store.samples("train").equals(read_samples(tiny_shards, "train"))
        assert_same_files(store, tiny_shards)
        assert store.root.parent == tmp_path / "cache"


def test_each_file_is_downloaded_once_and_reused(s3, tiny_shards: Path, tmp_path: Path) -> None:
    s3.reset_counts()
    for _ in range(2):  # the second store finds everything in the node cache
        with open_dataset(s3.url, cache_dir=str(tmp_path)) as store:
            assert_same_files(store, tiny_shards)
    for rel in tars(store.manifest):
        assert s3.gets[s3_path(s3, rel)] == 1, rel
        assert s3.gets[s3_path(s3, idx(rel))] == 1, rel
    assert s3.gets[s3_path(s3, "samples.parquet")] == 1
    assert s3.gets[s3_path(s3, "manifest.json")] == 2  # read from the URL each time: it may have changed


def test_local_dataset_is_read_in_place(tiny_shards: Path) -> None:
    root, store = resolve_dataset(tiny_shards)
    rel = tars(store.manifest)[0]
    assert root == tiny_shards and store.local_path(rel) == tiny_shards / rel
    fd = store.open(rel)
    try:
        assert os.pread(fd, 512, 0) == (tiny_shards / rel).read_bytes()[:512]
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError, match="not in the dataset"):
        store.local_path("train/nope.tar")


def test_publish_resumes_and_puts_the_manifest_last(s3, tiny_shards: Path, tmp_path: Path) -> None:
    fs, _ = filesystem("s3://data", RemoteConfig())
    first = tars(read_manifest(tiny_shards))[0]
    fs.rm_file(s3_path(s3, first).lstrip("/"))
    s3.reset_counts()
    result = publish(tiny_shards, s3.url)
    names = [p.removeprefix(s3_path(s3, "")) for p in s3.puts]
    # Only the missing shard (and its index, which goes with its tar) is sent again, then the metadata.
    assert sorted(names[:2]) == sorted([first, idx(first)])  # uploaded in parallel
    assert names[2:] == ["samples.parquet", "rejects.jsonl", "duplicates.jsonl", "manifest.json"]
    assert result["skipped"] == 2 * len(tars(read_manifest(tiny_shards))) - 2


def test_publish_into_a_local_folder_and_refuse_http(tiny_shards: Path, tmp_path: Path) -> None:
    publish(tiny_shards, str(tmp_path / "copy"))
    store = open_dataset(tmp_path / "copy")
    assert store.manifest == read_manifest(tiny_shards)
    assert_same_files(store, tiny_shards)
    assert not (tmp_path / "copy" / "_work").exists()
    with pytest.raises(ValueError, match="read-only"):
        publish(tiny_shards, "http://127.0.0.1:1/x")


def test_faults_are_retried_and_a_corrupt_shard_is_fetched_again(
    http, tiny_shards: Path, tmp_path: Path
) -> None:
    corrupt = tars(read_manifest(tiny_shards))[1]
    store = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    http.drop_every, http.fail_every, http.corrupt_once = 4, 3, {f"/{corrupt}"}
    assert_same_files(store, tiny_shards)
    assert sum(http.gets.values()) > sum(http.served.values())  # faults really happened
    assert http.served[f"/{corrupt}"] == 1 and http.gets[f"/{corrupt}"] >= 2


def test_a_shard_corrupt_at_the_source_fails_naming_it(http, tmp_path: Path) -> None:
    store = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    rel = tars(store.manifest)[0]
    path = http.root / rel
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=rel):
        store.local_path(rel)
    assert http.gets[f"/{rel}"] == 2  # downloaded again once before giving up
    assert not store.cache.path(rel).exists() and not store.cache.partial_path(rel).exists()


def test_retries_are_bounded(http, tmp_path: Path) -> None:
    store = open_dataset(http.url, cache_dir=str(tmp_path), retries=3, **FAST)
    rel = tars(store.manifest)[0]
    http.fail_every = 1  # every request: 503
    with pytest.raises(RemoteError, match="failed 3 times"):
        store.local_path(rel)
    assert http.gets[f"/{rel}"] == 3
    assert not is_transient(FileNotFoundError("x")) and is_transient(ConnectionResetError())


def test_a_changed_dataset_drops_stale_shards(http, tmp_path: Path) -> None:
    store = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    rel = tars(store.manifest)[0]
    store.local_path(rel)
    store.close()
    path = http.root / rel
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the tar's zero padding: still a valid shard, other bytes
    path.write_bytes(bytes(data))
    manifest = json.loads((http.root / "manifest.json").read_text())
    for b in manifest["bins"]:
        for s in b["shards"]:
            if s["path"] == rel:
                s["sha256"] = hashlib.sha256(data).hexdigest()
    (http.root / "manifest.json").write_text(json.dumps(manifest))
    with open_dataset(http.url, cache_dir=str(tmp_path), **FAST) as again:
        assert again.local_path(rel).read_bytes() == bytes(data)
    assert http.served[f"/{rel}"] == 2


def test_threads_share_one_download(http, tiny_shards: Path, tmp_path: Path) -> None:
    store = open_dataset(http.url, cache_dir=str(tmp_path), prefetch=4, **FAST)
    rels = tars(store.manifest)
    store.prefetch(rels)
    for rel in reversed(rels):  # the reader asks in the other order, racing the prefetch threads
        assert store.local_path(rel).read_bytes() == (tiny_shards / rel).read_bytes()
    store.wait()
    assert all(http.gets[f"/{rel}"] == 1 for rel in rels)


def test_a_pickled_store_reads_the_same_cache(http, tiny_shards: Path, tmp_path: Path) -> None:
    store = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    rel = tars(store.manifest)[0]
    store.local_path(rel)
    clone = pickle.loads(pickle.dumps(store))  # as a DataLoader worker started with spawn gets it
    assert clone.local_path(rel).read_bytes() == (tiny_shards / rel).read_bytes()
    assert clone.local_path(idx(rel)).read_bytes() == (tiny_shards / idx(rel)).read_bytes()
    assert http.gets[f"/{rel}"] == 1


def test_two_processes_download_each_shard_once(s3, tiny_shards: Path, tmp_path: Path) -> None:
    s3.reset_counts()
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=fetch_every_shard, args=(s3.url, str(tmp_path), start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    for rel in tars(read_manifest(tiny_shards)):
        assert s3.gets[s3_path(s3, rel)] == 1, rel
        assert s3.gets[s3_path(s3, idx(rel))] == 1, rel
    assert s3.gets[s3_path(s3, "samples.parquet")] == 1
    with open_dataset(s3.url, cache_dir=str(tmp_path)) as store:
        assert_same_files(store, tiny_shards)


def four_shards(store) -> list[str]:
    """Four tars, largest first."""
    entries = shard_entries(store.manifest)
    return sorted(entries, key=lambda rel: (-entries[rel]["bytes"], rel))[:4]


def read_once(store, rel: str) -> None:
    os.close(store.open(rel))


def test_lru_eviction_keeps_the_bound(http, tmp_path: Path) -> None:
    probe = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    meta = probe.cache.usage()[0]  # manifest + samples table, never evicted
    b, a, c, d = four_shards(probe)
    size = {rel: shard_entries(probe.manifest)[rel]["bytes"] for rel in (a, b, c, d)}
    bound = meta + size[a] + size[b] + size[c]
    store = open_dataset(http.url, cache_dir=str(tmp_path), max_cache_bytes=bound, **FAST)
    for rel in (b, a, c, a):  # b is now the least recently used
        read_once(store, rel)
    read_once(store, d)
    assert store.cache.usage()[0] <= bound
    present = {rel for rel in (a, b, c, d) if store.cache.path(rel).exists()}
    assert present == {a, c, d}
    assert http.gets[f"/{a}"] == 1  # a stayed cached while being used again


def test_shards_in_use_are_not_evicted(http, tmp_path: Path) -> None:
    probe = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    meta = probe.cache.usage()[0]
    a, b, c, d = four_shards(probe)
    size = {rel: shard_entries(probe.manifest)[rel]["bytes"] for rel in (a, b, c)}
    store = open_dataset(http.url, cache_dir=str(tmp_path), max_cache_bytes=meta + size[a] + size[b], **FAST)
    store.local_path(a)
    store.local_path(b)  # both held: nothing can make room for c
    with pytest.raises(CacheFullError, match="held open|cannot fit"):
        store.local_path(c)
    store.release(a)
    assert store.local_path(c).is_file()
    assert not store.cache.path(a).exists() and store.cache.path(b).exists()
    with pytest.raises(CacheFullError, match="larger than max_cache_bytes"):
        open_dataset(http.url, cache_dir=str(tmp_path), max_cache_bytes=1, **FAST).local_path(d)


def test_a_full_disk_evicts_then_stops_with_a_clear_error(http, tmp_path: Path, monkeypatch) -> None:
    store = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    a, b, c, d = four_shards(store)
    read_once(store, a)
    read_once(store, b)
    real, failures = cache_module._allocate, [1]

    def disk_full_once(fd: int, size: int) -> None:
        if failures:
            failures.pop()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, size)

    monkeypatch.setattr(cache_module, "_allocate", disk_full_once)
    read_once(store, c)  # the first allocation fails; the least recently used shard makes room
    assert not store.cache.path(a).exists() and store.cache.path(b).exists() and store.cache.path(c).exists()

    def disk_full(fd: int, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "_allocate", disk_full)
    with pytest.raises(CacheFullError, match="no space left on the cache disk"):
        store.local_path(d)
    assert not store.cache.partial_path(d).exists()


def test_a_stale_partial_is_cleaned_up(http, tmp_path: Path) -> None:
    store = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    rel = tars(store.manifest)[0]
    partial = store.cache.partial_path(rel)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"x" * 1000)  # as left by a process killed mid-download
    clean = store.cache.usage()[0]
    assert not partial.exists()
    assert clean == sum(
        f.stat().st_size for f in store.root.rglob("*") if f.is_file() and ".locks" not in f.parts
    )
    assert store.local_path(rel).is_file()


def test_lookahead_requests_shards_in_first_use_order() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[list[str]] = []

        def prefetch(self, rels) -> None:
            self.calls.append(list(rels))

    store = Recorder()
    ahead = Lookahead(store, [["a"], ["a", "b"], ["c"], ["b", "d"], ["e"]], shards_ahead=1)
    ahead.advance(0)
    ahead.advance(0)
    ahead.advance(2)
    ahead.advance(4)
    assert store.calls == [["a", "b"], ["c", "d"], ["e"]]


def test_an_epoch_from_s3_equals_the_local_epoch(s3, tiny_shards: Path, tmp_path: Path) -> None:
    cfg = LoaderConfig(backend="torch", batch_size=4, num_workers=0)
    root, store = resolve_dataset(s3.url, RemoteConfig(cache_dir=str(tmp_path)))
    store.prefetch(tars(store.manifest))
    store.wait()
    remote = list(build_loader(cfg, root, "train"))
    local = list(build_loader(cfg, tiny_shards, "train"))
    assert [b["key"] for b in remote] == [b["key"] for b in local]
    assert all(torch.equal(r["image"], m["image"]) for r, m in zip(remote, local, strict=True))
    store.close()


def _lock_when_free(lock: str) -> None:
    """In a forked child: take the lock within ~10 s or exit 1."""
    import fcntl
    import time

    for _ in range(200):
        try:
            with cache_module.flocked(Path(lock), fcntl.LOCK_EX | fcntl.LOCK_NB):
                os._exit(0)
        except BlockingIOError:
            time.sleep(0.05)
    os._exit(1)


def test_a_forked_child_does_not_keep_its_parents_download_lock(tmp_path: Path) -> None:
    cache = cache_module.ShardCache(tmp_path)
    with cache.download_lock("train/a.tar"):
        child = mp.get_context("fork").Process(
            target=_lock_when_free, args=(str(cache.lock_path("train/a.tar")),)
        )
        child.start()  # inherits the locked descriptor; must drop it, or the lock outlives the parent's release
    child.join(timeout=30)
    assert child.exitcode == 0


def test_close_returns_while_a_prefetch_waits_for_a_lock_held_elsewhere(http, tmp_path: Path) -> None:
    """A prefetch blocked on a download lock that another process of the node holds must not hold close (and
    so the rank's exit) until that process lets go. An flock on another open file description conflicts
    exactly like one held by another process."""
    store = open_dataset(http.url, cache_dir=str(tmp_path), **FAST)
    rel = tars(read_manifest(store.root))[0]
    with cache_module.ShardCache(store.root).download_lock(rel):
        store.prefetch([rel])
        running = store._pending[rel]
        for _ in range(200):  # until the prefetch thread runs (then it waits for the lock), not just queued
            if running.running():
                break
            time.sleep(0.05)
        assert running.running()
        closer = threading.Thread(target=store.close, daemon=True)
        closer.start()
        closer.join(timeout=10)
        closed = not closer.is_alive()
    closer.join(timeout=10)
    assert closed
    assert not store.cache.path(rel).exists()  # it gave up rather than fetched
    store.local_path(rel)  # the store still reads after close


def test_endpoint_precedence_and_cache_identity(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env")
    monkeypatch.delenv("RADSTREAM_S3_ENDPOINT", raising=False)
    assert s3_endpoint(RemoteConfig()) == "http://aws-env"
    monkeypatch.setenv("RADSTREAM_S3_ENDPOINT", "http://ours")
    assert s3_endpoint(RemoteConfig()) == "http://ours"
    assert s3_endpoint(RemoteConfig(s3_endpoint="http://cfg")) == "http://cfg"
    base = RemoteConfig(cache_dir=str(tmp_path))
    one, other = base, RemoteConfig(cache_dir=str(tmp_path), s3_endpoint="http://elsewhere")
    assert cache_folder("s3://b/x", one) == cache_folder(
        "s3://b/x/", one
    )  # a trailing slash is the same data
    assert cache_folder("s3://b/x", one) != cache_folder("s3://b/x", other)  # same bucket, another store
    assert cache_folder("http://h/x", one).parent == tmp_path
    monkeypatch.setenv("RADSTREAM_CACHE", str(tmp_path / "env"))
    assert cache_folder("http://h/x", RemoteConfig()).parent == tmp_path / "env"


def test_build_shards_cli_writes_to_s3(s3, synth_corpus: Path, tmp_path: Path, monkeypatch) -> None:
    from radstream.cli import main

    monkeypatch.setenv("RADSTREAM_STAGING", str(tmp_path / "staging"))
    url = f"s3://data/cli-{uuid.uuid4().hex[:8]}"
    assert main(["build-shards", str(synth_corpus / "images"), url, "--labels", "folder"]) == 0
    store = open_dataset(url, cache_dir=str(tmp_path / "cache"))
    staged = next((tmp_path / "staging").iterdir())
    assert store.manifest["counts"] == json.loads((staged / "manifest.json").read_text())["counts"]
    assert_same_files(store, staged)


def test_loader_and_pretraining_read_an_s3_url_directly(
    s3, tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    """A cold cache: the loader resolves the URL itself; the debug MAE recipe trains from the bucket."""
    from radstream.train.pretrain import main as pretrain_main

    monkeypatch.setenv("RADSTREAM_CACHE", str(tmp_path / "cache"))
    cfg = LoaderConfig(backend="torch", batch_size=4, num_workers=0)
    remote = list(build_loader(cfg, s3.url, "val", train=False))
    local = list(build_loader(cfg, tiny_shards, "val", train=False))
    assert [b["key"] for b in remote] == [b["key"] for b in local]
    assert all(torch.equal(r["image"], m["image"]) for r, m in zip(remote, local, strict=True))
    recipe = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "debug.yaml"
    run_dir = tmp_path / "run"
    assert (
        pretrain_main(["--config", str(recipe), f"shards={s3.url}", f"run_dir={run_dir}", "run.epochs=1"])
        == 0
    )
    assert json.loads((run_dir / "summary.json").read_text())["steps"] > 0


def train_keys(root: Path) -> set[str]:
    return set(read_samples(root, "train")["key"].to_pylist())


def test_a_cache_smaller_than_the_dataset_completes_every_epoch(
    http, tiny_shards: Path, tmp_path: Path
) -> None:
    """Shuffle blocks of one shard, two shards open per reader, room for four: every epoch reads each sample
    once, shards are evicted and fetched again, nothing waits forever."""
    probe = open_dataset(http.url, cache_dir=str(tmp_path / "probe"), **FAST)
    entries = {rel: e for rel, e in shard_entries(probe.manifest).items() if e["split"] == "train"}
    largest = sorted((e["bytes"] for e in entries.values()), reverse=True)
    bound = probe.cache.usage()[0] + sum(largest[:4])
    assert bound < probe.cache.usage()[0] + sum(largest)  # the train shards do not all fit
    remote = RemoteConfig(
        cache_dir=str(tmp_path / "cache"),
        max_cache_bytes=bound,
        max_pinned=2,
        prefetch=1,
        prefetch_shards=1,
        **FAST,
    )
    cfg = LoaderConfig(backend="torch", batch_size=4, num_workers=1, shuffle_block=1, remote=remote)
    with build_loader(cfg, http.url, "train", train=False) as loader:
        for _ in range(2):
            keys = [k for b in loader for k, ok in zip(b["key"], b["valid"].tolist(), strict=True) if ok]
            assert sorted(keys) == sorted(train_keys(tiny_shards))
            assert loader.store.cache.usage()[0] <= bound
    assert sum(http.gets[f"/{rel}"] for rel in entries) > len(entries)  # evicted and fetched again


@pytest.mark.slow
def test_two_nodes_download_each_shard_once_per_node(s3, tiny_shards: Path, tmp_path: Path) -> None:
    """Two node caches, two ranks on each (world size 4): a shard is fetched once by each node that reads it,
    and the four ranks together read every train sample."""
    s3.reset_counts()
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    caches = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    procs = [
        ctx.Process(target=read_epoch_as_rank, args=(s3.url, caches[rank // 2], rank, 4, start, out))
        for rank in range(4)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert {k for _, keys, _ in results for k in keys} == train_keys(tiny_shards)
    needed = Counter()
    for node in (0, 1):
        needed.update({s for rank, _, shards in results if rank // 2 == node for s in shards})
    for rel in tars(read_manifest(tiny_shards)):
        assert s3.gets[s3_path(s3, rel)] == needed[rel], rel


EVIL = "../../../x/evil.tar"


def _evil(manifest: dict) -> bytes:
    manifest["bins"][0]["shards"][0]["path"] = EVIL
    return json.dumps(manifest).encode()


@pytest.mark.parametrize("scheme", ["s3", "http"])
def test_a_remote_manifest_naming_a_path_outside_is_refused(
    s3, http, tiny_shards: Path, tmp_path: Path, scheme: str
) -> None:
    """The server supplies manifest and checksums alike: its paths are checked before anything is cached."""
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    if scheme == "http":
        (http.root / "manifest.json").write_bytes(_evil(manifest))
        url = http.url
    else:
        url = f"s3://data/evil-{uuid.uuid4().hex[:8]}"
        publish(tiny_shards, url)
        fs, _ = filesystem(url, RemoteConfig())
        fs.pipe_file(f"{url.removeprefix('s3://')}/manifest.json", _evil(manifest))
    home = tmp_path / "a" / "b" / "c"
    home.mkdir(parents=True)
    with pytest.raises(UnsafePathError) as err:
        open_dataset(url, cache_dir=str(home / "cache"), **FAST)
    assert EVIL in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnsafePathError):
        build_loader(
            LoaderConfig(backend="torch", remote=RemoteConfig(cache_dir=str(home / "cache"))), url, "train"
        )
    assert not (tmp_path / "x").exists()
    assert not list((home / "cache").rglob("manifest.json"))


def test_a_shard_outside_the_dataset_is_neither_fetched_nor_evicted(http, tmp_path: Path) -> None:
    """A cached manifest (poisoned, or from an older version) listing a path outside the cache: the next
    manifest, without that entry, makes eviction refuse rather than delete the outside file."""
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"unrelated")
    store = open_dataset(http.url, cache_dir=str(tmp_path / "c"), **FAST)
    with pytest.raises(UnsafePathError):
        store.local_path("../../victim.tar")
    store.close()
    cached = store.root / "manifest.json"
    poisoned = json.loads(cached.read_text())
    poisoned["bins"][0]["shards"].append({**poisoned["bins"][0]["shards"][0], "path": "../../victim.tar"})
    cached.write_text(json.dumps(poisoned))
    with pytest.raises(UnsafePathError):
        open_dataset(http.url, cache_dir=str(tmp_path / "c"), **FAST)
    assert victim.read_bytes() == b"unrelated"


def test_a_cached_shard_changed_on_disk_is_fetched_again(
    http, tiny_shards: Path, tmp_path: Path, caplog
) -> None:
    """32 flipped bytes inside a cached tar: the next store finds its stamp (size, mtime, inode) broken,
    hashes it, and downloads the shard again instead of serving the damaged bytes."""
    with open_dataset(http.url, cache_dir=str(tmp_path), **FAST) as store:
        rel = tars(store.manifest)[0]
        cached = store.local_path(rel)
    data = bytearray(cached.read_bytes())
    data[600:632] = bytes(b ^ 0xFF for b in data[600:632])
    cached.write_bytes(bytes(data))
    with caplog.at_level("WARNING"), open_dataset(http.url, cache_dir=str(tmp_path), **FAST) as again:
        assert again.local_path(rel).read_bytes() == (tiny_shards / rel).read_bytes()
        fd = again.open(rel)
        os.close(fd)
    assert http.served[f"/{rel}"] == 2
    assert any("changed since it was downloaded" in r.getMessage() for r in caplog.records)


def test_a_cached_samples_table_that_fails_its_checksum_is_fetched_again(
    http, tiny_shards: Path, tmp_path: Path, caplog
) -> None:
    """It failed every later run (exit 3) with advice to rerun finalize-shards, which a remote reader cannot."""
    from radstream.shards.integrity import check_samples_table
    from radstream.shards.layout import DatasetError

    with open_dataset(http.url, cache_dir=str(tmp_path), **FAST) as store:
        cached = store.root / "samples.parquet"
    cached.write_bytes(cached.read_bytes()[:-40] + bytes(40))
    with pytest.raises(DatasetError, match=f"manifest of {http.url} .*fetched again") as err:
        check_samples_table(store.root, store.manifest, http.url)  # the loader's check, mid-run
    assert "finalize" not in str(err.value)
    with caplog.at_level("WARNING"), open_dataset(http.url, cache_dir=str(tmp_path), **FAST) as again:
        assert (again.root / "samples.parquet").read_bytes() == (tiny_shards / "samples.parquet").read_bytes()
        check_samples_table(again.root, again.manifest, http.url)
    assert http.served["/samples.parquet"] == 2
    assert any("cached copy differs from the manifest" in r.getMessage() for r in caplog.records)
