"""Corruption is found where it matters: verify-shards lists every problem with shard and sample, the samples
table is checksummed and cross-checked, and the loader checks local shards before training reads them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radstream.shards.builder.private import source_names
from radstream.shards.builder.verify import verify_shards
from radstream.shards.index import read_index
from radstream.shards.layout import DatasetError
from radstream.shards.loader import build_loader
from radstream.shards.loader_config import LoaderConfig

CFG = LoaderConfig(backend="torch", batch_size=4, num_workers=0)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def copy(tiny_shards: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_shards, root, ignore=shutil.ignore_patterns("_work", ".verified-shards.*"))
    return root


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """The files ``radstream.shards.integrity`` opens (to hash them), in order."""
    from radstream.shards import integrity

    opened, real_open = [], open
    monkeypatch.setattr(
        integrity, "open", lambda p, *a: opened.append(Path(p)) or real_open(p, *a), raising=False
    )
    return opened


def rewrite_row(root: Path, column: str, change) -> str:
    """Change ``column`` of the samples table's first row; returns that row's key."""
    table = pq.read_table(root / "samples.parquet")
    values = table[column].to_pylist()
    values[0] = change(values[0])
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, root / "samples.parquet")
    return table["key"][0].as_py()


def flip_member(root: Path, shard_glob: str, ext: str, sample: int = 0) -> tuple[str, str]:
    """Flip the first byte of member ``ext`` of a sample of the first shard matching; (shard rel, key)."""
    tar = sorted(root.glob(shard_glob))[0]
    entry = read_index(tar.with_suffix(".idx"))[sample]
    offset, _ = entry.components[ext]
    data = bytearray(tar.read_bytes())
    data[offset] ^= 0xFF
    tar.write_bytes(bytes(data))
    return str(tar.relative_to(root)), entry.key


def test_a_truncated_samples_table_is_one_line(copy: Path) -> None:
    data = (copy / "samples.parquet").read_bytes()
    (copy / "samples.parquet").write_bytes(data[: len(data) // 2])
    report = verify_shards(copy)
    assert [p for p in report.problems if "samples.parquet" in p] == [
        f"{copy / 'samples.parquet'}: sha256 differs from the manifest (truncated or corrupt samples table); "
        "rerun `radstream finalize-shards` or fetch the dataset again"
    ]
    with pytest.raises(DatasetError, match="samples.parquet: sha256 differs"):
        build_loader(CFG, copy, "train")
    with pytest.raises(DatasetError, match="unreadable samples table"):
        build_loader(LoaderConfig(backend="torch", num_workers=0, verify=False), copy, "train")


@pytest.mark.parametrize(
    ("column", "change", "words"),
    [
        ("offset", lambda v: v + 512, "image at"),
        ("key", lambda v: chr(ord(v[0]) ^ 1) + v[1:], "the tar holds"),
        ("bin", lambda v: "999x999", "the manifest says"),
        ("shard", lambda v: v.replace(".tar", "-x.tar"), "shard not in the manifest"),
    ],
)
def test_every_samples_row_is_checked_against_the_tars(copy: Path, column: str, change, words: str) -> None:
    key = rewrite_row(copy, column, change)
    report = verify_shards(copy)
    rows = [p for p in report.problems if p.startswith("samples.parquet row 0")]
    assert len(rows) == 1 and words in rows[0], report.problems
    assert any("sha256 differs" in p for p in report.problems)
    assert key[1:] in rows[0]


def test_a_shard_the_manifest_does_not_list_is_not_read(copy: Path) -> None:
    """Its checksum would be unknown (a remote store would fetch it unverified)."""
    rewrite_row(copy, "shard", lambda v: v.replace(".tar", "-x.tar"))
    split = pq.read_table(copy / "samples.parquet")["split"][0].as_py()
    with pytest.raises(DatasetError, match="-x.tar' is not in the manifest"):
        build_loader(LoaderConfig(backend="torch", num_workers=0, verify=False), copy, split)


def test_a_corrupt_json_member_names_shard_and_sample_and_verify_goes_on(copy: Path) -> None:
    first, key = flip_member(copy, "train/*/*.tar", "json")
    second, _ = flip_member(copy, "val/*/*.tar", "jpg")
    report = verify_shards(copy)
    # The sample is named by its key and, through the dataset's private map, by its source file.
    named = f"{first}: sample {key} ({source_names(copy)[key]}) has an unreadable .json member"
    assert named in "\n".join(report.problems)
    assert any(p.startswith(f"{second}: sha256") for p in report.problems)  # the later shard is checked too
    assert report.shards == sum(1 for _ in copy.glob("*/*/*.tar"))
    run = subprocess.run(
        [sys.executable, "-m", "radstream.cli", "verify-shards", str(copy)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert named in run.stdout
    shutil.rmtree(copy / "_private")  # where the map is absent (a published copy): the key alone
    assert f"{first}: sample {key} has an unreadable .json member" in "\n".join(verify_shards(copy).problems)


def test_flipped_bytes_in_a_jpeg_stop_the_loader_naming_the_shard(copy: Path) -> None:
    rel, _ = flip_member(copy, "train/*/*.tar", "jpg")
    with pytest.raises(DatasetError) as err:
        build_loader(CFG, copy, "train")
    assert str(err.value).startswith(f"{copy / rel}: sha256 differs from the manifest")
    assert len(build_loader(LoaderConfig(backend="torch", num_workers=0, verify=False), copy, "train")) > 0


def test_a_shard_is_hashed_once_per_process_until_it_changes(copy: Path, reads: list[Path]) -> None:
    tar = sorted(copy.glob("train/*/*.tar"))[0]
    build_loader(CFG, copy, "train")
    build_loader(CFG, copy, "train")
    assert reads.count(tar) == 1
    os.utime(tar, ns=(1, 1))  # another mtime: hashed again
    build_loader(CFG, copy, "train")
    assert reads.count(tar) == 2


def test_a_node_keeps_a_record_of_verified_shards_across_processes(
    copy: Path, tmp_path: Path, monkeypatch, reads: list[Path]
) -> None:
    """A new process (the memo of this one cleared) does not read shards verified unchanged; a touched shard
    is read again, a corrupt one still stops the loader. The record lies beside the dataset (every node that
    mounts the folder shares it), not in the node cache."""
    from radstream.shards import integrity

    monkeypatch.setenv("RADSTREAM_CACHE", str(tmp_path / "node-cache"))
    tars = sorted(copy.glob("train/*/*.tar"))
    build_loader(CFG, copy, "train")
    assert {t for t in tars if t in reads} == set(tars)  # the first process hashes every train shard
    assert set(json.loads((copy / integrity.SHARED_RECORD).read_text())) == {
        str(t.relative_to(copy)) for t in tars
    }
    assert not list((tmp_path / "node-cache").glob("verified/*.json"))
    integrity._SEEN.clear()  # a new process
    reads.clear()
    build_loader(CFG, copy, "train")
    assert not [r for r in reads if r.suffix == ".tar"]
    integrity._SEEN.clear()
    os.utime(tars[0], ns=(1, 1))  # changed (a new mtime): read again, alone
    build_loader(CFG, copy, "train")
    assert [r for r in reads if r.suffix == ".tar"] == [tars[0]]
    integrity._SEEN.clear()
    rel, _ = flip_member(copy, "train/*/*.tar", "jpg")
    with pytest.raises(DatasetError, match="sha256 differs"):
        build_loader(CFG, copy, "train")


def test_without_a_writable_record_every_process_hashes(
    copy: Path, tmp_path: Path, monkeypatch, reads: list[Path]
) -> None:
    from radstream.shards import integrity

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("RADSTREAM_CACHE", str(tmp_path / "a-file"))
    monkeypatch.setattr(integrity, "SHARED_RECORD", "manifest.json/record.json")  # nor beside the dataset
    for _ in range(2):
        integrity._SEEN.clear()
        build_loader(CFG, copy, "train")
    tar = sorted(copy.glob("train/*/*.tar"))[0]
    assert reads.count(tar) == 2


HASHES_OF_ONE_PROCESS = """
import json, os, sys, time
from radstream.shards import integrity
from radstream.shards.loader_data import load_split
from radstream.shards.manifest import read_manifest

hashed, real = [], integrity.sha256_of

def slow(path):  # a big shard: long enough that the other process would hash it too, were it not locked out
    hashed.append(str(path))
    time.sleep(0.05)
    return real(path)

integrity.sha256_of = slow
root, go = sys.argv[1], sys.argv[2]
shards, manifest = load_split(root, "train").shards, read_manifest(root)
print("ready", flush=True)
while not os.path.exists(go):  # both processes start checking at the same moment
    time.sleep(0.01)
integrity.check_shards(root, shards, manifest)
print(json.dumps(hashed))
"""


def test_processes_of_a_node_starting_together_hash_each_shard_once(copy: Path, tmp_path: Path) -> None:
    """The record is read and written under a file lock: of two processes checking the same shards at the
    same moment, one hashes them and the other finds them recorded."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RADSTREAM_CACHE": str(tmp_path / "node-cache")}
    go = tmp_path / "go"
    command = [sys.executable, "-c", HASHES_OF_ONE_PROCESS, str(copy), str(go)]
    procs = [
        subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    go.touch()
    hashed = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    train = {str(t) for t in copy.glob("train/*/*.tar")}
    assert sorted(hashed[0] + hashed[1]) == sorted(train)  # each train shard hashed once, by one of them


def test_labels_and_patients_in_the_table_are_checked_against_each_samples_members(copy: Path) -> None:
    """An edit of the table and of its checksum in the manifest passes every check of the table itself; the
    tars (checked against their own sha256) still say what each sample is."""
    import hashlib

    table = pq.read_table(copy / "samples.parquet")
    labelled = next(i for i, v in enumerate(table["label_index"].to_pylist()) if v >= 0)
    names = json.loads((copy / "manifest.json").read_text())["class_names"]
    old = table["label"][labelled].as_py()
    other = next(n for n in names if n != old)
    edits = {"label": other, "label_index": names.index(other), "patient_id": "someone else"}
    for column, value in edits.items():
        values = table[column].to_pylist()
        values[labelled] = value
        field = table.schema.field(column)
        table = table.set_column(table.schema.get_field_index(column), field, pa.array(values, field.type))
    pq.write_table(table, copy / "samples.parquet")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["samples_sha256"] = hashlib.sha256((copy / "samples.parquet").read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = verify_shards(copy, quick=True)
    assert len(report.problems) == 1 and report.problems[0].startswith(f"samples.parquet row {labelled} ")
    line = report.problems[0]
    assert f"label {other!r}, its .json member says {old!r}" in line
    assert f"label_index {names.index(other)}, its .json member says {names.index(old)}" in line
    assert f"label_index {names.index(other)}, its .cls member says {names.index(old)}" in line
    assert "patient_id 'someone else', its .json member says" in line


def test_a_duplicated_row_with_its_checksum_updated_is_refused(copy: Path) -> None:
    """Every per-row check passes a copy of a good row; it is a row beyond its shard's samples."""
    import hashlib

    table = pq.read_table(copy / "samples.parquet")
    n = table.num_rows
    pq.write_table(pa.concat_tables([table, table.slice(1, 1), table.slice(1, 1)]), copy / "samples.parquet")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["samples_sha256"] = hashlib.sha256((copy / "samples.parquet").read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    report = verify_shards(copy, quick=True)
    key, shard = table["key"][1].as_py(), table["shard"][1].as_py()
    size = len(read_index((copy / shard).with_suffix(".idx")))
    assert len(report.problems) == 2, report.problems
    for row, line in zip((n, n + 1), report.problems, strict=True):
        assert line.startswith(f"samples.parquet row {row} (key {key}"), line  # then its source's name
        assert line.endswith(f"shard {shard}): duplicate of row 1 (a row beyond the shard's {size} samples)")


def test_the_record_falls_back_to_the_node_cache(copy: Path, tmp_path: Path, monkeypatch, reads) -> None:
    from radstream.shards import integrity

    monkeypatch.setenv("RADSTREAM_CACHE", str(tmp_path / "node-cache"))
    monkeypatch.setattr(integrity, "SHARED_RECORD", "manifest.json/record.json")  # the folder cannot hold it
    build_loader(CFG, copy, "train")
    assert list((tmp_path / "node-cache" / "verified").glob("*.json"))
    integrity._SEEN.clear()
    reads.clear()
    build_loader(CFG, copy, "train")
    assert not [r for r in reads if r.suffix == ".tar"]


KILLED_WHILE_HASHING = """
import sys, time
from radstream.shards import integrity
from radstream.shards.loader_data import load_split
from radstream.shards.manifest import read_manifest

real = integrity.sha256_of
integrity.SAVE_EVERY_S, integrity.HASH_THREADS = 0.0, 1
integrity.sha256_of = lambda path: time.sleep(0.5) or real(path)  # a slow disk: killed before the end
root = sys.argv[1]
integrity.check_shards(root, load_split(root, "train").shards, read_manifest(root))
"""


def test_a_killed_check_keeps_what_it_verified(copy: Path, tmp_path: Path, reads: list[Path]) -> None:
    from radstream.shards import integrity

    env = {**os.environ, "PYTHONPATH": str(REPO), "RADSTREAM_CACHE": str(tmp_path / "node-cache")}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_HASHING, str(copy)], env=env, cwd=REPO)
    record = copy / integrity.SHARED_RECORD
    while proc.poll() is None and not (record.exists() and len(json.loads(record.read_text() or "{}")) >= 2):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    kept = set(json.loads(record.read_text()))
    tars = {str(t.relative_to(copy)) for t in copy.glob("train/*/*.tar")}
    assert 2 <= len(kept) < len(tars)  # saved as it went, killed before the end
    integrity._SEEN.clear()
    build_loader(CFG, copy, "train")  # the next start hashes only the rest
    assert {str(r.relative_to(copy)) for r in reads if r.suffix == ".tar"} == tars - kept
