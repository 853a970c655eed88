"""radstream.core.atomic: a reader sees the old file or the new one, never half of either."""

import json

import pytest

from radstream.core.atomic import write_bytes, write_json, write_text, write_with


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    write_text(path, "new")
    assert path.read_text() == "new"
    write_bytes(path, b"\x00\x01", durable=True)
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporaries left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"old": True})

    def explode(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_with(path, explode)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
