"""Paths a dataset names (manifest, samples table, index, tar members) never reach outside their root."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from radstream.shards.cache import ShardCache
from radstream.shards.index import parse_index, scan_tar, verify_index
from radstream.shards.layout import (
    UnsafePathError,
    all_inside,
    inside,
    load_manifest,
    safe_rel,
    shard_entries,
)
from radstream.shards.loader import build_loader
from radstream.shards.loader_config import LoaderConfig
from radstream.shards.store import ShardStore

EVIL = "../../../x/evil.tar"
CFG = LoaderConfig(backend="torch", batch_size=4, num_workers=0)


def copy_of(tiny_shards: Path, tmp_path: Path) -> Path:
    root = tmp_path / "a" / "b" / "c" / "data"
    shutil.copytree(tiny_shards, root, ignore=shutil.ignore_patterns("_work"))
    return root


def evil_manifest(root: Path) -> str:
    """Rename the first shard of the manifest to ``EVIL``; returns its old name."""
    manifest = json.loads((root / "manifest.json").read_text())
    shard = manifest["bins"][0]["shards"][0]
    old, shard["path"] = shard["path"], EVIL
    (root / "manifest.json").write_text(json.dumps(manifest))
    return old


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../b", "a//b", "./a", "", "a\\..\\b", "train/.."])
def test_unsafe_relative_paths_are_refused(rel: str) -> None:
    with pytest.raises(UnsafePathError, match="refused"):
        safe_rel(rel)
    assert safe_rel("train/224x224/train-224x224-0000-000000.tar").endswith(".tar")


def test_a_manifest_naming_a_path_outside_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    root = copy_of(tiny_shards, tmp_path)
    evil_manifest(root)
    before = files_under(tmp_path)
    for open_it in (load_manifest, ShardStore, lambda r: build_loader(CFG, r, "train")):
        with pytest.raises(UnsafePathError) as err:
            open_it(root)
        assert EVIL in str(err.value) and "\n" not in str(err.value)
    assert files_under(tmp_path) == before


def test_a_samples_table_naming_a_path_outside_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    root = copy_of(tiny_shards, tmp_path)
    table = pq.read_table(root / "samples.parquet")
    first = table["shard"][0].as_py()
    shard = pc.if_else(pc.equal(table["shard"], first), EVIL, table["shard"])
    pq.write_table(
        table.set_column(table.schema.get_field_index("shard"), "shard", shard), root / "samples.parquet"
    )
    split = table["split"][0].as_py()
    with pytest.raises(UnsafePathError, match="samples.parquet"):  # the table's checksum is not looked at
        build_loader(LoaderConfig(backend="torch", num_workers=0, verify=False), root, split)
    store = ShardStore(root)
    with pytest.raises(UnsafePathError):
        store.open(EVIL)
    with pytest.raises(UnsafePathError):
        store.open(str(tmp_path / "a" / "outside.tar"))  # absolute, not under the root


def test_a_symlink_leading_outside_the_dataset_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    root = copy_of(tiny_shards, tmp_path)
    rel = sorted(shard_entries(load_manifest(root)))[0]
    outside = tmp_path / "elsewhere.tar"
    shutil.move(root / rel, outside)
    (root / rel).symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        ShardStore(root).local_path(rel)
    split = rel.split("/")[0]
    with pytest.raises(UnsafePathError, match="outside"):
        build_loader(CFG, root, split)
    (root / rel).unlink()
    (root / rel).symlink_to(Path("..") / ".." / Path(rel).name)  # relative link, inside: fine
    shutil.move(outside, root / Path(rel).name)
    assert ShardStore(root).local_path(rel).is_file()


def test_the_cache_never_writes_or_evicts_outside_its_root(tmp_path: Path) -> None:
    cache = ShardCache(tmp_path / "cache")
    victim = tmp_path / "victim.tar"
    victim.write_bytes(b"not the cache's")
    for rel in ("../victim.tar", str(victim)):
        for use in (cache.path, cache.evict, cache.lock_path, lambda r: cache.reserve(r, 10)):
            with pytest.raises(UnsafePathError):
                use(rel)
    assert victim.read_bytes() == b"not the cache's"
    assert files_under(tmp_path) == {victim, *files_under(tmp_path / "cache"), tmp_path / "cache"}
    (tmp_path / "cache" / "train").symlink_to(tmp_path)  # a folder link out of the cache
    with pytest.raises(UnsafePathError, match="outside"):
        cache.evict("train/victim.tar")
    assert victim.exists()
    assert inside(tmp_path, "cache/train").name == "train"  # inside its own root: fine


def _tar_with(name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../evil.jpg", "/tmp/evil.jpg", "a/../../evil.jpg"])
def test_tar_member_names_leaving_the_folder_are_refused(tmp_path: Path, name: str) -> None:
    tar = tmp_path / "x.tar"
    tar.write_bytes(_tar_with(name))
    with pytest.raises(UnsafePathError, match="member name"):
        scan_tar(tar)
    idx = tmp_path / "x.idx"
    idx.write_text(f"v1.2 1\njpg 512 3 {name}\n")
    problems = verify_index(tar, idx)
    assert problems and all("refused" in p for p in problems)
    with pytest.raises(ValueError, match="line 2: member name"):
        parse_index(["v1.2 1", f"jpg 512 3 {name}"])


def test_checking_many_paths_refuses_what_inside_refuses(tmp_path: Path) -> None:
    # the loader checks every shard of a split at once (one lstat each, folders resolved once)
    root, away = tmp_path / "ds", tmp_path / "away"
    (root / "train" / "a").mkdir(parents=True)
    away.mkdir()
    (away / "x.tar").write_bytes(b"")
    (root / "train" / "a" / "ok.tar").write_bytes(b"")
    (root / "train" / "b").symlink_to(away)  # a folder leading outside
    (root / "train" / "a" / "out.tar").symlink_to(away / "x.tar")
    (root / "train" / "a" / "in.tar").symlink_to(Path("ok.tar"))
    cases = {"train/a/ok.tar": True, "train/a/in.tar": True, "train/a/gone.tar": True, "train/b/x.tar": False,
             "train/a/out.tar": False, "train/../x.tar": False}  # fmt: skip
    for rel, fine in cases.items():
        for check in (
            lambda r: inside(root, r, "shard"),
            lambda r: all_inside(root, ["train/a/ok.tar", r], "shard"),
        ):
            if fine:
                check(rel)
            else:
                with pytest.raises(UnsafePathError, match=r"shard .*(outside|not a plain)"):
                    check(rel)
