"""ShardWriter (tar + DALI index), index reading, ShardReader and verify_index."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from radstream.shards.builder.writer import ShardInfo, ShardWriter, finished_size, member_span
from radstream.shards.codecs import encode
from radstream.shards.index import ShardReader, _ustar_members, read_index, scan_tar, verify_index
from radstream.shards.layout import UnsafePathError
from tests.shards.tar_member import read_member

PREFIX = "train-32x48-0003"


def sample(i: int, labeled: bool = True, image_bytes: int | None = None) -> tuple[str, dict[str, bytes]]:
    """Sample i: a small image whose bytes depend on i, its class and metadata."""
    rng = np.random.default_rng(i)
    if image_bytes is None:
        image = encode(rng.random((32, 48), dtype=np.float32), "jpg", 90)
    else:
        image = rng.integers(0, 256, image_bytes, dtype=np.uint8).tobytes()
    members = {"jpg": image}
    if labeled:
        members["cls"] = str(i % 8).encode()
    members["json"] = json.dumps({"index": i, "source": f"/data/img{i}.dcm"}).encode()
    return f"s{i:06d}", members


def write_samples(out: Path, n: int, **kwargs) -> list[ShardInfo]:
    with ShardWriter(out, PREFIX, **kwargs) as w:
        for i in range(n):
            w.write(*sample(i, labeled=i % 5 != 4))
    return w.infos


def wds2idx_script() -> str:
    path = Path(sys.executable).parent / "wds2idx"
    found = str(path) if path.exists() else shutil.which("wds2idx")
    if found is None:
        pytest.skip("DALI's wds2idx tool is not installed")
    return found


def test_splits_at_max_samples(tmp_path):
    infos = write_samples(tmp_path, 7, max_samples=3)
    assert [i.samples for i in infos] == [3, 3, 1]
    assert [i.path for i in infos] == [f"{PREFIX}-{n:06d}.tar" for n in range(3)]
    for info in infos:
        tar = tmp_path / info.path
        assert tar.stat().st_size == info.bytes
        assert hashlib.sha256(tar.read_bytes()).hexdigest() == info.sha256
        assert len(read_index(tar.with_suffix(".idx"))) == info.samples
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [i.path for i in infos] + [i.path.replace(".tar", ".idx") for i in infos]
    )


def test_splits_at_max_bytes(tmp_path):
    max_bytes = 40_000
    with ShardWriter(tmp_path, PREFIX, max_samples=1000, max_bytes=max_bytes) as w:
        spans = []
        for i in range(40):
            key, members = sample(i, image_bytes=1000 + 150 * i)
            spans.append(sum(member_span(len(v)) for v in members.values()))
            w.write(key, members)
    infos = w.infos
    assert len(infos) > 2
    assert sum(i.samples for i in infos) == 40
    start = 0
    for info in infos:
        assert info.bytes <= max_bytes
        assert info.bytes == (tmp_path / info.path).stat().st_size
        end = start + info.samples
        if end < 40:  # the split is tight: the next sample would not have fit
            assert finished_size(sum(spans[start : end + 1])) > max_bytes
        start = end


def test_oversized_sample_gets_its_own_shard(tmp_path):
    with ShardWriter(tmp_path, PREFIX, max_bytes=20_000) as w:
        w.write(*sample(0, image_bytes=100))
        w.write(*sample(1, image_bytes=50_000))
        w.write(*sample(2, image_bytes=100))
    assert [i.samples for i in w.infos] == [1, 1, 1]
    assert w.infos[1].bytes > 20_000


def test_deterministic_bytes(tmp_path):
    a = write_samples(tmp_path / "a", 12, max_samples=5)
    b = write_samples(tmp_path / "b", 12, max_samples=5)
    assert a == b
    for info in a:
        for suffix in (".tar", ".idx"):
            name = info.path.replace(".tar", suffix)
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tar_metadata_fixed(tmp_path):
    (info,) = write_samples(tmp_path, 3)
    with tarfile.open(tmp_path / info.path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "s000000.jpg", "s000000.cls", "s000000.json",
        "s000001.jpg", "s000001.cls", "s000001.json",
        "s000002.jpg", "s000002.cls", "s000002.json",
    ]  # fmt: skip
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, b"0")
    assert info.bytes % 10240 == 0


def test_no_final_names_before_close(tmp_path):
    w = ShardWriter(tmp_path, PREFIX, max_samples=3)
    for i in range(2):
        w.write(*sample(i))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{PREFIX}-000000.tar.partial"]
    for i in range(2, 5):
        w.write(*sample(i))  # the fourth sample finishes shard 0 and starts shard 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{PREFIX}-000000.idx", f"{PREFIX}-000000.tar", f"{PREFIX}-000001.tar.partial"]
    infos = w.close()
    assert [i.samples for i in infos] == [3, 2]
    assert not list(tmp_path.glob("*.partial"))
    assert w.close() == infos  # idempotent
    with pytest.raises(RuntimeError):
        w.write(*sample(9))


KILLED_WRITER = """
import sys, time
from radstream.shards.builder.writer import ShardWriter
w = ShardWriter(sys.argv[1], "train-32x48-0003", max_samples=2, fsync=False)
for i in range(3):
    w.write(f"s{i:06d}", {"jpg": bytes(5000), "cls": b"1"})
w._shard.file.flush()  # make the partial shard visible on disk, as a long-running build's would be
print("ready", flush=True)
time.sleep(60)
"""


def test_sigkill_leaves_no_finished_looking_half_shard(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.kill()
        proc.wait()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{PREFIX}-000000.idx", f"{PREFIX}-000000.tar", f"{PREFIX}-000001.tar.partial"]
    assert verify_index(tmp_path / names[1], tmp_path / names[0]) == []


def test_exception_removes_partial_shard(tmp_path):
    with pytest.raises(KeyError), ShardWriter(tmp_path, PREFIX, max_samples=2) as w:
        for i in range(3):
            w.write(*sample(i))
        raise KeyError("build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{PREFIX}-000000.idx", f"{PREFIX}-000000.tar"]
    assert [i.samples for i in w.infos] == [2]


def test_empty_writer_writes_nothing(tmp_path):
    with ShardWriter(tmp_path / "out", PREFIX) as w:
        pass
    assert w.infos == []
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "key",
    ["a.b", "a/b", "a b", "", "ä", "a\nb", "x" * 100],
    ids=["dot", "slash", "space", "empty", "non-ascii", "newline", "long"],
)
def test_rejects_bad_keys(tmp_path, key):
    with ShardWriter(tmp_path, PREFIX) as w, pytest.raises(ValueError):
        w.write(key, {"jpg": b"x"})
    assert w.infos == []


def test_rejects_bad_members_and_duplicates(tmp_path):
    with ShardWriter(tmp_path, PREFIX) as w:
        w.write("a", {"jpg": b"x"})
        with pytest.raises(ValueError, match="duplicate"):
            w.write("a", {"jpg": b"y"})
        with pytest.raises(ValueError, match="no members"):
            w.write("b", {})
        with pytest.raises(ValueError, match="extension"):
            w.write("b", {"seg.png": b"y"})
        w.write("b", {"png": b"y"})  # a rejected write leaves no trace
    assert [e.key for e in read_index(tmp_path / w.infos[0].path.replace(".tar", ".idx"))] == ["a", "b"]


@pytest.mark.parametrize("fallback", [False, True], ids=["gnu-tar", "tarfile"])
def test_index_equals_wds2idx(tmp_path, fallback, monkeypatch):
    infos = write_samples(tmp_path, 11, max_samples=4)
    for info in infos:
        tar = tmp_path / info.path
        ref = tmp_path / "ref.idx"
        if fallback:  # wds2idx's own tarfile path, used where GNU tar is missing
            wds2idx = pytest.importorskip("wds2idx")
            monkeypatch.setattr(wds2idx, "which", lambda _: None)
            with wds2idx.IndexCreator(str(tar), str(ref), verbose=False) as creator:
                creator.create_index()
        else:
            if shutil.which("tar") is None:
                pytest.skip("GNU tar not installed")
            subprocess.run([wds2idx_script(), str(tar), str(ref)], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_bytes() == ref.read_bytes()


def test_read_index_and_member(tmp_path):
    (info,) = write_samples(tmp_path, 6)
    tar = tmp_path / info.path
    entries = read_index(tar.with_suffix(".idx"))
    assert [e.key for e in entries] == [f"s{i:06d}" for i in range(6)]
    assert list(entries[4].components) == ["jpg", "json"]  # sample 4 is unlabeled
    for i, entry in enumerate(entries):
        _, members = sample(i, labeled=i % 5 != 4)
        for ext, (offset, size) in entry.components.items():
            assert read_member(tar, offset, size) == members[ext]


def test_shard_reader_exact_bytes(tmp_path):
    (info,) = write_samples(tmp_path, 9)
    with ShardReader(tmp_path / info.path) as reader:
        assert len(reader) == 9
        for i in [8, 0, 4, 3, 8]:  # random access, any order, repeats
            _, members = sample(i, labeled=i % 5 != 4)
            got = reader.read(i)
            assert got == members and list(got) == list(members)
        assert reader.read(2, exts=["json"]) == {"json": sample(2)[1]["json"]}
        assert reader[reader.position("s000007")] == sample(7)[1]
        with pytest.raises(KeyError):
            reader.read(4, exts=["cls"])
        clone = pickle.loads(pickle.dumps(reader))
        assert clone.read(5) == reader.read(5)
        clone.close()
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: reader.read(i % 9), range(90)))
        assert all(results[i] == reader.read(i % 9) for i in range(90))


def test_shard_reader_after_fork(tmp_path):
    (info,) = write_samples(tmp_path, 4)
    reader = ShardReader(tmp_path / info.path)
    expected = reader.read(3)  # opens the descriptor in the parent
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        assert pool.map(reader.read, [3, 3]) == [expected, expected]


def test_verify_index_ok_and_corrupted(tmp_path):
    (info,) = write_samples(tmp_path, 5)
    tar = tmp_path / info.path
    idx = tar.with_suffix(".idx")
    assert verify_index(tar, idx) == []
    assert scan_tar(tar) == read_index(idx)
    good = idx.read_text()

    lines = good.splitlines()
    fields = lines[2].split()
    fields[1] = str(int(fields[1]) + 512)  # shift one offset
    idx.write_text("\n".join([*lines[:2], " ".join(fields), *lines[3:]]) + "\n")
    problems = verify_index(tar, idx)
    assert len(problems) == 1 and "sample 1" in problems[0]

    idx.write_text("\n".join(lines[:-1]) + "\n")  # a sample missing
    assert any("samples" in p for p in verify_index(tar, idx))

    idx.write_text(good.replace("v1.2 5", "v1.2 6"))  # header count wrong
    assert verify_index(tar, idx)[0].startswith("unreadable index")

    idx.write_text(good.replace(".cls", ".txt"))  # names that do not match extensions
    assert verify_index(tar, idx)

    idx.write_text(good)
    data = tar.read_bytes()
    tar.write_bytes(data[: read_index(idx)[-1].components["jpg"][0] + 10])  # truncated tar
    assert any("truncated" in p or "unreadable tar" in p for p in verify_index(tar, idx))


def test_readable_by_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    infos = write_samples(tmp_path, 7, max_samples=4)
    urls = [str(tmp_path / i.path) for i in infos]
    seen = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in seen] == [f"s{i:06d}" for i in range(7)]
    for i, s in enumerate(seen):
        _, members = sample(i, labeled=i % 5 != 4)
        assert {k: v for k, v in s.items() if not k.startswith("__")} == members


def test_readable_by_dali_webdataset_reader(tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    n = 10
    with ShardWriter(tmp_path, PREFIX, max_samples=4) as w:
        for i in range(n):
            w.write(*sample(i))  # all labeled: the reader asks for jpg and cls
    tars = [str(tmp_path / i.path) for i in w.infos]

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(
            paths=tars, index_paths=[t.replace(".tar", ".idx") for t in tars], ext=["jpg", "cls"]
        )
        return jpg, cls, fn.decoders.image(jpg, device="cpu", output_type=types.GRAY)

    p = pipe()
    p.build()
    jpgs, classes, images = p.run()
    for i in range(n):
        _, members = sample(i)
        assert np.array(jpgs[i]).tobytes() == members["jpg"]
        assert np.array(classes[i]).tobytes() == members["cls"]
        assert np.array(images[i]).shape == (32, 48, 1)


def _tarfile_scan(path: Path) -> list:
    """scan_tar as it was: every header read by tarfile."""
    from radstream.shards.index import IndexEntry, split_name
    from radstream.shards.layout import safe_rel

    entries = []
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            safe_rel(m.name, f"{path}: member name")
            key, ext = split_name(m.name)
            if not m.isreg() or not key or key.endswith("/"):
                continue
            if entries and entries[-1].key == key:
                entries[-1].components[ext] = (m.offset_data, m.size)
            else:
                entries.append(IndexEntry(key, {ext: (m.offset_data, m.size)}))
    return entries


def _renamed(raw: bytes, old: bytes, new: bytes) -> bytes:
    """A tar whose member ``old`` is named ``new`` (as long), its header's checksum made right again."""
    at = raw.index(old + b"\0")
    header = bytearray(raw[at : at + 512])
    header[: len(new)] = new
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return raw[:at] + bytes(header) + raw[at + 512 :]


def _outcome(scan, path: Path):
    try:
        return scan(path)
    except Exception as err:  # the same error, or the same entries
        return type(err).__name__, str(err)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reading_headers_directly_gives_what_tarfile_gives(tmp_path: Path, fmt: int) -> None:
    import io

    long_dir = "d" * 120  # past the 100 bytes of a name: a ustar prefix, a GNU or pax long name
    members = [("s1.png", b"x" * 700), ("s1.cls", b"3"), ("sub", None), ("sub/s2.png", b""), (".hidden.png", b"y"),
               (f"{long_dir}/s3.png", b"z" * 513), ("s4.j\u00e9son", b"{}"), ("link", "s1.png")]  # fmt: skip
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = path.read_bytes()
    variants = {"whole": raw, "no end blocks": raw[: raw.rfind(b"z" * 513) + 1024],
                "cut in a member's data": raw[:1100], "empty": b"", "zeros": bytes(1024),
                "bad checksum": raw[:148] + b"0000000\0" + raw[156:],
                "bad checksum later": raw[:1536 + 148] + b"0000000\0" + raw[1536 + 156:],  # s1.cls's header
                "escape": _renamed(raw, b"sub/s2.png", b"../sb2.png")}  # fmt: skip
    for what, data in variants.items():
        path.write_bytes(data)
        assert _outcome(scan_tar, path) == _outcome(_tarfile_scan, path), what
    path.write_bytes(raw)
    assert [e.key for e in scan_tar(path)] == ["s1", "sub/s2", f"{long_dir}/s3", "s4"]
    # read directly where the headers are plain ustar (a long name in its prefix), by tarfile where not
    assert (_ustar_members(path) is None) == (fmt != tarfile.USTAR_FORMAT)
    path.write_bytes(_renamed(raw, b"sub/s2.png", b"../sb2.png"))
    with pytest.raises(UnsafePathError, match="member name"):
        scan_tar(path)
