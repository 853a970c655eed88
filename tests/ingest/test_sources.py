from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from radstream.ingest.sources import HIDDEN_FILE, SourceItem, discover


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel in [
        "chest/b.png",
        "chest/a.dcm",
        "chest/sub/c.png",
        "spine/d.jpg",
        "spine/notes.txt",  # not an image: the reader rejects it later, but it must be seen
        "loose.png",
        ".hidden.png",
        ".cache/e.png",
        "chest/.DS_Store",
    ]:
        touch(root / rel)
    return root


def rel_paths(items: list[SourceItem], root: Path) -> list[str]:
    return [Path(item.path).relative_to(root).as_posix() for item in items]


def test_source_item_is_frozen():
    item = SourceItem("/a.png", "chest", "P1", "1121-120-500-700")
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.label = "spine"  # type: ignore[misc]
    assert SourceItem("/a.png") == SourceItem("/a.png", None, None, None)


def test_folder_tree_lists_every_visible_file_sorted(tree):
    items, rejects = discover(str(tree))
    assert [(Path(r["path"]).relative_to(tree).as_posix(), r["reason"]) for r in rejects] == [
        (".cache/e.png", HIDDEN_FILE),
        (".hidden.png", HIDDEN_FILE),
        ("chest/.DS_Store", HIDDEN_FILE),
    ]  # counted, so that seen = written + rejected + duplicates holds over every file under the source
    assert rel_paths(items, tree) == [
        "chest/a.dcm",
        "chest/b.png",
        "chest/sub/c.png",
        "loose.png",
        "spine/d.jpg",
        "spine/notes.txt",
    ]
    assert all(os.path.isabs(item.path) for item in items)
    assert {(item.label, item.patient_id, item.irma_code) for item in items} == {(None, None, None)}


def test_folder_labels_are_the_first_folder_level(tree):
    items, _ = discover(str(tree), label_from="folder")
    labels = {Path(item.path).relative_to(tree).as_posix(): item.label for item in items}
    assert labels["chest/sub/c.png"] == "chest"
    assert labels["spine/notes.txt"] == "spine"
    assert labels["loose.png"] is None  # directly in the root: unlabeled, not rejected


def test_folder_labels_can_be_dropped(tree):
    items, rejects = discover(str(tree), label_from="folder", drop_labels=("spine",))
    assert {item.label for item in items} == {"chest", None}
    dropped = [r for r in rejects if r["reason"] != HIDDEN_FILE]
    assert sorted(Path(r["path"]).name for r in dropped) == ["d.jpg", "notes.txt"]
    assert {r["reason"] for r in dropped} == {"spine (dropped by config)"}


def test_folder_link_cycles_are_not_followed(tree):
    os.symlink(tree, tree / "chest" / "loop", target_is_directory=True)
    items, _ = discover(str(tree))
    assert len(items) == 6


def test_irma_labels_from_a_code_list_keyed_by_stem(tmp_path):
    root = tmp_path / "images"
    for name in ["1877.png", "1878.png", "1879.png", "1880.png", "1881.png", "1882.png"]:
        touch(root / name)
    codes = touch(
        tmp_path / "codes.csv",
        b"image_id;irma_code;05_class\n"
        b"1877;1121-117-720-452;52\n"
        b"1878;1121-120-500-700;1\n"
        b"1879;1121-115-110-400;2\n"
        b"1880;1121-120-000-700;3\n"
        b"1881;\\N;4\n",
    )
    items, rejects = discover(str(root), label_from="irma", irma_csv=str(codes))
    by_name = {Path(item.path).name: item for item in items}
    assert by_name["1877.png"].label == "abdomen"
    assert by_name["1877.png"].irma_code == "1121-117-720-452"
    assert by_name["1878.png"].label == "chest"
    assert by_name["1881.png"].label is None and by_name["1881.png"].irma_code is None
    assert by_name["1882.png"].label is None  # not in the list: unlabeled
    reasons = {Path(r["path"]).name: r["reason"] for r in rejects}
    assert reasons == {
        "1879.png": "whole_body (dropped by config)",
        "1880.png": "unknown IRMA code '1121-120-000-700': anatomical region '0' is not one of 1-9",
    }


def write_manifest(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_manifest_paths_labels_and_patients(tmp_path):
    touch(tmp_path / "data" / "img" / "a.png")
    touch(tmp_path / "data" / "img" / "b.dcm")
    absolute = touch(tmp_path / "elsewhere" / "c.png")
    manifest = write_manifest(
        tmp_path / "data" / "manifest.csv",
        "path,label,patient_id,site\n"
        "img/a.png,chest,P1,x\n"
        f"{absolute},,P2,y\n"
        "img/b.dcm, spine ,,z\n"
        "img/missing.png,chest,P3,z\n",
    )
    items, rejects = discover(str(tmp_path / "data"), manifest_csv=str(manifest), label_from="csv")
    assert items == [
        SourceItem(str(tmp_path / "data" / "img" / "a.png"), "chest", "P1", None),
        SourceItem(str(absolute), None, "P2", None),
        SourceItem(str(tmp_path / "data" / "img" / "b.dcm"), "spine", None, None),
    ]
    assert rejects == [
        {"path": str(tmp_path / "data" / "img" / "missing.png"), "reason": "file not found (manifest line 5)"}
    ]


def test_manifest_as_the_source_with_irma_codes(tmp_path):
    for name in ["a.png", "b.png", "c.png", "d.png", "e.png"]:
        touch(tmp_path / name)
    manifest = write_manifest(
        tmp_path / "list.csv",
        "\ufeffpath,irma_code,patient_id\n"  # a byte-order mark, as spreadsheets write it
        "a.png,1121-120-200-700,P1\n"
        "b.png,1121-120-110-700,P1\n"
        "c.png,not-a-code,P2\n"
        "d.png,,P3\n"
        ",1121-120-200-700,P4\n"
        "e.png\n",
    )
    items, rejects = discover(str(manifest), label_from="irma")
    assert [(Path(i.path).name, i.label, i.patient_id, i.irma_code) for i in items] == [
        ("a.png", "cranium", "P1", "1121-120-200-700"),
        ("d.png", None, "P3", None),
        ("e.png", None, None, None),
    ]
    assert [r["reason"] for r in rejects] == [
        "whole_body (dropped by config)",
        "unknown IRMA code 'not-a-code': expected the form TTTT-DDD-AAA-BBB",
        "manifest row has an empty path",
    ]
    assert rejects[2]["path"].endswith("list.csv:6")


def test_manifest_column_wins_over_the_code_list(tmp_path):
    touch(tmp_path / "7.png")
    touch(tmp_path / "8.png")
    manifest = write_manifest(tmp_path / "m.csv", "path,irma_code\n7.png,1121-120-500-700\n8.png,\n")
    codes = write_manifest(
        tmp_path / "codes.csv", "image_id;irma_code\n7;1121-120-200-700\n8;1121-120-300-700\n"
    )
    items, _ = discover(str(tmp_path), manifest_csv=str(manifest), label_from="irma", irma_csv=str(codes))
    assert [item.label for item in items] == ["chest", "spine"]


def test_manifest_folder_labels_are_relative_to_the_source_root(tmp_path):
    touch(tmp_path / "images" / "chest" / "a.png")
    touch(tmp_path / "images" / "b.png")
    manifest = write_manifest(tmp_path / "manifest.csv", "path\nimages/chest/a.png\nimages/b.png\n")
    items, _ = discover(str(tmp_path / "images"), manifest_csv=str(manifest), label_from="folder")
    assert [item.label for item in items] == ["chest", None]
    items, _ = discover(str(manifest), label_from="folder")
    assert [item.label for item in items] == ["images", "images"]


def test_manifest_without_path_column(tmp_path):
    manifest = write_manifest(tmp_path / "bad.csv", "file,label\na.png,chest\n")
    with pytest.raises(
        ValueError, match=r"bad\.csv: manifest has no 'path' column \(columns: \['file', 'label'\]\)"
    ):
        discover(str(tmp_path), manifest_csv=str(manifest))
    empty = write_manifest(tmp_path / "empty.csv", "")
    with pytest.raises(ValueError, match=r"empty\.csv: manifest has no 'path' column"):
        discover(str(empty))


def test_unreadable_manifest(tmp_path):
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"path\n\xff\xfe\x81.png\n")
    with pytest.raises(ValueError, match=r"binary\.csv: cannot read manifest"):
        discover(str(tmp_path), manifest_csv=str(binary))
    with pytest.raises(ValueError, match=r"absent\.csv: cannot read manifest"):
        discover(str(tmp_path), manifest_csv=str(tmp_path / "absent.csv"))


def test_label_sources_the_inputs_cannot_provide(tree, tmp_path):
    with pytest.raises(ValueError, match="label_from='csv' needs a manifest with a 'label' column"):
        discover(str(tree), label_from="csv")
    with pytest.raises(ValueError, match="label_from='irma' needs irma_csv or a manifest 'irma_code' column"):
        discover(str(tree), label_from="irma")
    manifest = write_manifest(tmp_path / "m.csv", "path,patient_id\n")
    with pytest.raises(ValueError, match=r"m\.csv has none"):
        discover(str(manifest), label_from="csv")
    with pytest.raises(ValueError, match="label_from='sheet': expected one of"):
        discover(str(tree), label_from="sheet")
    with pytest.raises(ValueError, match="nowhere: source not found"):
        discover(str(tmp_path / "nowhere"))


def test_empty_folder(tmp_path):
    assert discover(str(tmp_path)) == ([], [])


def reasons_by_name(rejects: list[dict]) -> dict[str, str]:
    return {Path(r["path"]).name: r["reason"] for r in rejects}


def test_links_that_lead_nowhere_are_rejects_not_crashes(tree):
    os.symlink("b_loop", tree / "chest" / "a_loop")
    os.symlink("a_loop", tree / "chest" / "b_loop")
    os.symlink("gone.png", tree / "chest" / "dangling.png")
    os.symlink(tree / "spine", tree / "chest" / "spine_link", target_is_directory=True)
    items, rejects = discover(str(tree))
    assert len(items) == 6
    reasons = reasons_by_name(rejects)
    assert reasons["a_loop"].startswith("symlink loop") and reasons["b_loop"].startswith("symlink loop")
    assert reasons["dangling.png"] == "dangling link (its target does not exist)"
    assert reasons["spine_link"] == "link to a folder, not followed"
    assert [r["path"] for r in rejects] == sorted(r["path"] for r in rejects)
    assert all(os.path.isabs(r["path"]) for r in rejects)


def test_a_file_name_that_is_not_utf8_is_rejected_by_name(tree):
    bad_file = os.fsencode(tree / "chest") + b"/bad\xffname.png"
    bad_folder = os.fsencode(tree) + b"/caf\xe9"
    with open(bad_file, "wb") as f:
        f.write(b"x")
    os.mkdir(bad_folder)
    with open(bad_folder + b"/inside.png", "wb") as f:
        f.write(b"x")
    items, rejects = discover(str(tree))
    assert len(items) == 6
    assert [r for r in rejects if r["reason"] != HIDDEN_FILE] == [
        {"path": f"{tree}/caf\\xe9", "reason": "folder name is not valid UTF-8, skipped (rename it)"},
        {"path": f"{tree}/chest/bad\\xffname.png", "reason": "file name is not valid UTF-8 (rename it)"},
    ]
    for reject in rejects:
        reject["path"].encode("utf-8")  # writable to rejects.jsonl


def test_an_unreadable_folder_is_a_reject(tree, monkeypatch):
    # Tests run as root, who reads every folder: the denial is simulated where the walk lists a folder.
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == tree / "spine":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items, rejects = discover(str(tree))
    assert rel_paths(items, tree) == ["chest/a.dcm", "chest/b.png", "chest/sub/c.png", "loose.png"]
    assert [r for r in rejects if r["reason"] != HIDDEN_FILE] == [
        {"path": str(tree / "spine"), "reason": "unreadable folder, skipped (Permission denied)"}
    ]


def test_rare_csv_labels_are_warned_about(tmp_path, caplog):
    rows = ["path,label"]
    for i in range(12):
        touch(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'chset' if i == 0 else 'Chest ' if i in (1, 2) else 'chest'}")
    manifest = write_manifest(tmp_path / "m.csv", "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="radstream.ingest.sources"):
        items, _ = discover(str(manifest), label_from="csv")
    assert {item.label for item in items} == {"chest", "chset", "Chest"}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "'chset' (1), 'Chest' (2)" in warnings[0] and "typo" in warnings[0]
    assert "'chest'" not in warnings[0]


def test_no_rare_label_warning_without_csv_labels(tree, caplog):
    with caplog.at_level("WARNING", logger="radstream.ingest.sources"):
        discover(str(tree), label_from="folder")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_irma_codes_with_malformed_other_axes_are_rejected(tmp_path):
    codes = {
        "a": "1121-120-200-700",
        "b": "1121-102-200-700",  # directional axis: a refinement of an unspecified (0) level
        "c": "a121-120-200-700",  # technical axis: a letter at the top level
        "d": "1121-120-200-7a0",
    }
    for name in codes:
        touch(tmp_path / f"{name}.png")
    manifest = write_manifest(
        tmp_path / "m.csv", "path,irma_code\n" + "".join(f"{n}.png,{c}\n" for n, c in codes.items())
    )
    items, rejects = discover(str(manifest), label_from="irma")
    assert [(Path(i.path).stem, i.label) for i in items] == [("a", "cranium"), ("d", "cranium")]
    assert reasons_by_name(rejects) == {
        "b.png": "unknown IRMA code '1121-102-200-700': directional axis '102' refines an unspecified level",
        "c.png": "unknown IRMA code 'a121-120-200-700': technical axis 'a121' starts with a letter",
    }
