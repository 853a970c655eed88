"""Privacy by default (ingest.privacy): keyed pseudonyms, the site key, stable splits under one key, file
modes of datasets and node caches, BurnedInAnnotation, and what `publish` refuses."""

from __future__ import annotations

import grp
import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from radstream.core.config import load_config
from radstream.ingest.config import IngestConfig
from radstream.ingest.errors import RejectError
from radstream.ingest.pipeline import run_ingest
from radstream.ingest.privacy import PrivacyConfig, PrivacyKeyError, Pseudonymizer, allowed_header, load_key
from radstream.ingest.readers import ReadConfig
from radstream.ingest.scan import scan_header
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.finalize import finalize
from radstream.shards.builder.parts import run_build
from radstream.shards.builder.publish import PrivateDataError, publish
from radstream.shards.cache import ShardCache
from tests.conftest import tiny_build_config
from tests.shards.identified_dicoms import PATIENTS, write_archive, write_dicom


def test_pseudonyms_are_keyed_stable_and_carry_nothing_of_the_id() -> None:
    one, same, other = Pseudonymizer(b"k" * 32), Pseudonymizer(b"k" * 32), Pseudonymizer(b"j" * 32)
    pid = "dicom:MRN12345678"
    assert one.patient(pid) == same.patient(pid) != other.patient(pid)
    assert (
        one.patient(pid).startswith("psn-")
        and "MRN" not in one.patient(pid)
        and "1234" not in one.patient(pid)
    )
    assert one.path("a/b.dcm") != one.path("a/c.dcm") and one.path("a/b.dcm") != other.path("a/b.dcm")
    assert one.key_id() == same.key_id() != other.key_id()
    sha1 = "ab" * 20
    assert one.pixels(sha1) == same.pixels(sha1) != sha1 and one.pixels(sha1) != other.pixels(sha1)
    kept = Pseudonymizer(None)
    assert kept.patient(pid) == pid and kept.key_id() is None and not kept.enabled
    assert kept.pixels(sha1) == sha1


def test_the_key_file_is_made_once_with_mode_0600_and_a_message(tmp_path: Path, caplog) -> None:
    cfg = PrivacyConfig(key_file=str(tmp_path / "keys" / "site.key"))
    with caplog.at_level(logging.WARNING, logger="radstream.ingest.privacy"):
        key = load_key(cfg)
    assert (tmp_path / "keys" / "site.key").stat().st_mode & 0o777 == 0o600
    assert [r.getMessage() for r in caplog.records if "created the site key" in r.getMessage()][0].count(
        str(tmp_path / "keys" / "site.key")
    ) == 1
    assert load_key(cfg) == key and len(key) >= 32
    (tmp_path / "short.key").write_text("abc\n")
    with pytest.raises(PrivacyKeyError, match=r"short\.key: privacy key file holds 3 bytes"):
        load_key(PrivacyConfig(key_file=str(tmp_path / "short.key")))


def test_the_header_allow_list_drops_everything_else() -> None:
    meta = {"format": "dicom", "height": 48, "width": 64, "bits": 12, "photometric": "MONOCHROME2",
            "frames": 1, "patient_id": "MRN12345678", "StudyDate": "20240315"}  # fmt: skip
    assert allowed_header(meta) == {
        "format": "dicom", "height": 48, "width": 64, "bits": 12, "photometric": "MONOCHROME2", "frames": 1
    }  # fmt: skip
    assert allowed_header({**meta, "photometric": "DOE^JANE"})["photometric"] == "other"


def test_burned_in_annotation_is_rejected_unless_kept(tmp_path: Path) -> None:
    path = tmp_path / "burned.dcm"
    write_dicom(path, {"PatientID": "X1", "SOPInstanceUID": "1.2.3.4"}, seed=0, burned_in=True)
    with pytest.raises(RejectError, match="BurnedInAnnotation is YES.*keep_burned_in=true"):
        scan_header(path, ReadConfig())
    assert scan_header(path, ReadConfig(keep_burned_in=True)).height == 48


def _rows(root: Path) -> dict[str, tuple]:
    cols = ["key", "patient_id", "split", "fractions", "source_hash"]
    table = pq.read_table(root / "samples.parquet", columns=cols).to_pylist()
    return {r["key"]: (r["patient_id"], r["split"], tuple(r["fractions"]), r["source_hash"]) for r in table}


def _private_modes(root: Path) -> list[str]:
    """Every file and folder under ``root`` that another user could read or enter."""
    return [
        f"{p}: {oct(p.stat().st_mode & 0o777)}" for p in [root, *root.rglob("*")] if p.stat().st_mode & 0o077
    ]


def test_one_key_one_set_of_pseudonyms_and_splits_across_builds_and_array_parts(
    synth_corpus: Path, tiny_shards: Path, tmp_path: Path
) -> None:
    old = os.umask(0o022)  # a permissive umask: the build restricts its files by itself
    try:
        out = tmp_path / "array"
        cfg = tiny_build_config(synth_corpus, out)  # the recipe of the session's tiny_shards
        for task in (0, 1):
            run_build(cfg, task_index=task, num_tasks=2)
        finalize(cfg)
    finally:
        os.umask(old)
    assert _rows(out) == _rows(tiny_shards)  # same key: same keys, pseudonyms, splits and fractions
    assert _private_modes(out) == []  # not readable by other users, the private side included
    assert (out / "_private").stat().st_mode & 0o777 == 0o700
    other = IngestConfig(labels="folder", privacy=PrivacyConfig(key_file=str(tmp_path / "other.key")))
    ingested = run_ingest(synth_corpus / "images", other, seed=0)
    mine = {v[0] for v in _rows(tiny_shards).values()}
    assert mine.isdisjoint(r.patient for r in ingested.records)  # another key: other pseudonyms
    assert {v[3] for v in _rows(tiny_shards).values()}.isdisjoint(r.source_hash for r in ingested.records)


def test_the_node_cache_is_private_or_its_named_groups(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for group, dir_mode, file_mode in (
            (None, 0o700, 0o600),
            (grp.getgrgid(os.getgid()).gr_name, 0o2770, 0o660),
        ):
            cache = ShardCache(tmp_path / f"cache-{dir_mode:o}", group=group)
            partial = cache.reserve("train/32x32/a.tar", 10)
            partial.write_bytes(b"x" * 10)
            path = cache.commit(partial, "train/32x32/a.tar")
            assert cache.root.stat().st_mode & 0o7777 == dir_mode
            assert (
                path.stat().st_mode & 0o777 == file_mode and path.parent.stat().st_mode & 0o7777 == dir_mode
            )
            with cache.download_lock("train/32x32/a.tar"):
                assert cache.lock_path("train/32x32/a.tar").stat().st_mode & 0o777 == file_mode
    finally:
        os.umask(old)
    with pytest.raises(ValueError, match="remote.cache_group 'no-such-group-here': no such group"):
        ShardCache(tmp_path / "cache-bad", group="no-such-group-here")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    write_archive(root)
    return root


def _build(archive: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(BuildConfig, None, [f"source={archive}", f"out={out}", "binning.strategy=fixed",
                                          "binning.shape=32x32", *overrides])  # fmt: skip
    run_build(cfg)
    return finalize(cfg)


def test_publish_refuses_kept_identifiers_and_any_private_value_it_finds(
    archive: Path, tmp_path: Path
) -> None:
    kept = _build(archive, tmp_path / "kept", "ingest.privacy.enabled=false")
    assert kept["privacy"]["identifiers"] == "kept" and "IDENTIFIERS KEPT" in kept["privacy"]["warning"]
    with pytest.raises(PrivateDataError, match=r"built with identifiers kept .* --allow-identifiers"):
        publish(tmp_path / "kept", str(tmp_path / "pub-kept"))
    assert not (tmp_path / "pub-kept").exists()  # nothing uploaded
    publish(tmp_path / "kept", str(tmp_path / "pub-kept"), allow_identifiers=True)
    assert (tmp_path / "pub-kept" / "manifest.json").is_file()

    manifest = _build(archive, tmp_path / "private")
    assert manifest["privacy"]["identifiers"] == "pseudonymised" and manifest["counts"]["rejected"] == 1
    publish(tmp_path / "private", str(tmp_path / "pub"))
    assert not (tmp_path / "pub" / "_private").exists() and not (tmp_path / "pub" / "_work").exists()
    leaky = tmp_path / "leaky"
    shutil.copytree(tmp_path / "private", leaky)
    with open(leaky / "rejects.jsonl", "a") as fh:  # as a careless edit would
        fh.write(json.dumps({"note": f"see {PATIENTS[1][2]}"}) + "\n")
    with pytest.raises(
        PrivateDataError,
        match=r"refusing to publish: 1 files .* rejects\.jsonl: 1 private values; privacy was on",
    ):
        publish(leaky, str(tmp_path / "pub-leaky"))  # the fix named: the kept text, not "privacy on"


def test_a_format_1_dataset_is_refused_in_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    from radstream.shards.layout import DatasetError, load_manifest

    old = tmp_path / "old"
    old.mkdir()
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": "1.0"}))
    with pytest.raises(DatasetError, match=r"shard format 1\.0, this radstream reads 2\.x; rebuild"):
        load_manifest(old)


def test_the_opt_out_flags_and_shorthand_turn_privacy_off(tmp_path: Path) -> None:
    from radstream.cli import make_parser
    from radstream.commands import _build_overrides

    def enabled(*argv: str) -> bool:
        args = make_parser().parse_args(["build-shards", str(tmp_path), str(tmp_path / "out"), *argv])
        return load_config(BuildConfig, None, _build_overrides(args)).ingest.privacy.enabled

    assert enabled() and enabled("ingest.privacy=on")
    assert not enabled("--keep-identifiers") and not enabled("ingest.privacy=off")
    assert not enabled("ingest.privacy.enabled=false")


def test_the_rejects_summary_names_files_through_the_private_map(archive: Path, tmp_path: Path) -> None:
    from radstream.shards.builder.private import rejects_summary

    _build(archive, tmp_path / "out")
    text = "\n".join(rejects_summary(tmp_path / "out"))
    assert f"{PATIENTS[0][0]}_{PATIENTS[0][1]}_003.dcm: DICOM BurnedInAnnotation is YES" in text
    assert "1 x DICOM BurnedInAnnotation is YES" in text
    published = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in published] == [["reason", "source_hash"]]  # the public list: no path


def test_a_task_with_another_key_stops_instead_of_rebuilding(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _build(archive, out)
    before = sorted(p.name for p in out.rglob("*.tar"))
    with pytest.raises(ValueError, match=r"planned under another privacy key .* same key file"):
        _build(archive, out, f"ingest.privacy.key_file={tmp_path / 'another.key'}")
    assert sorted(p.name for p in out.rglob("*.tar")) == before and (out / "manifest.json").is_file()


def test_a_key_file_others_can_read_is_named_in_a_warning(tmp_path: Path, caplog) -> None:
    key = tmp_path / "open.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="radstream.ingest.privacy"):
        load_key(PrivacyConfig(key_file=str(key)))
    assert f"privacy: {key} is readable by other users; chmod 600 it" in caplog.text
