"""Nothing identifying leaves the hospital: DICOMs with identifiers in every Annex E header field they carry
and in their folder and file names → build → publish → one epoch of a tiny MAE from the published copy →
embeddings → export → report; then every byte of what was published and of the run, embeddings, export and
report folders (tar members included, the samples table and the zarr keys decoded) is searched for every
identifier. Patients stay grouped: one patient, one pseudonym, one split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radstream.core.config import load_config
from radstream.ingest.readers import ReadConfig, read_image
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.finalize import finalize
from radstream.shards.builder.parts import run_build
from radstream.shards.builder.private import PRIVATE
from radstream.shards.builder.publish import publish
from tests.accelerate_state import reset_accelerate
from tests.shards.identified_dicoms import write_archive

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "debug.yaml"


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it after the test."""
    yield
    reset_accelerate()


def _decoded(path: Path) -> bytes:
    """What a file says once decoded where compression could hide text: parquet cells, zarr arrays."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        return json.dumps(table.to_pylist(), default=str).encode()
    return b""


def _zarr_text(store: Path) -> bytes:
    """Every string array of the embedding store (keys) and its attributes, decoded."""
    import zarr

    chunks = []
    root = zarr.open_group(str(store), mode="r")
    chunks.append(json.dumps(dict(root.attrs), default=str).encode())
    for name, group in root.groups():
        for array_name, array in group.arrays():
            if array.dtype.kind in "OUT" or str(array.dtype).startswith(("str", "<U", "|S")):
                chunks.append(f"{name}/{array_name}: {list(array[:])}".encode())
    return b"\n".join(chunks)


def _hits(folders: list[Path], secrets: list[str], extra: bytes) -> list[str]:
    found = []
    blobs = [
        (str(p), p.read_bytes() + _decoded(p)) for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    ]
    blobs.append(("decoded zarr", extra))
    for where, data in blobs:
        found += [f"{where}: {s!r}" for s in secrets if s.encode() in data]
    return found


def _train_embed_export_report(published: Path, work: Path) -> tuple[Path, Path, Path, Path]:
    from radstream.eval.embed import EmbedConfig
    from radstream.eval.embed import run as embed
    from radstream.report.export import export
    from radstream.report.report import write_report
    from radstream.train import pretrain
    from radstream.train.config import PretrainConfig

    run_dir = work / "runs" / "mae"
    overrides = [f"shards={published}", f"run_dir={run_dir}", "run.tensorboard=false", "run.epochs=1",
                 "loader.batch_size=2", "run.grid_images=2"]  # fmt: skip
    assert pretrain.run(load_config(PretrainConfig, RECIPE, overrides)) == 0
    emb = work / "emb.zarr"
    sizes = json.loads((published / "manifest.json").read_text())["split_sizes"]
    splits = "[" + ",".join(s for s, n in sizes.items() if n) + "]"  # 3 patients: not every split has one
    embed(load_config(EmbedConfig, None, [f"checkpoint={run_dir / 'best'}", f"shards={published}", f"out={emb}",
                                          f"splits={splits}",
                                          "cpu=true", "chunk_rows=4", "loader.backend=torch",
                                          "loader.batch_size=2", "loader.num_workers=0"]))  # fmt: skip
    export(run_dir, work / "encoder")
    write_report([work / "runs"], work / "report")
    return run_dir, emb, work / "encoder", work / "report"


@dataclass(frozen=True)
class Published:
    out: Path
    published: Path
    secrets: list[str]
    owner: dict[str, str]
    """Source path -> the raw patient id."""


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Published:
    """The identified archive built (privacy on, the default) and published to a folder."""
    tmp = tmp_path_factory.mktemp("hospital")
    archive, out = tmp / "archive", tmp / "dataset"
    secrets, owner = write_archive(archive)
    # and each image's pixel sha1: a plain hash would link a sample to an identified copy of its image
    keep = ReadConfig(keep_burned_in=True)
    secrets = secrets + [read_image(archive / rel, keep).meta["pixel_sha1"] for rel in owner]
    cfg = load_config(
        BuildConfig,
        None,
        [
            f"source={archive}",
            f"out={out}",
            "binning.strategy=fixed",
            "binning.shape=32x32",
            "shards.max_samples_per_shard=4",
            "ingest.splits.fractions=[0.34,0.33,0.33]",
        ],
    )  # one patient each
    run_build(cfg)
    finalize(cfg)
    publish(out, str(tmp / "published"))
    return Published(out, tmp / "published", secrets, owner)


def test_nothing_published_names_a_patient_or_a_file(published: Published) -> None:
    out = published.out
    manifest = json.loads((published.published / "manifest.json").read_text())
    assert manifest["counts"]["rejected"] == 1  # the BurnedInAnnotation YES image
    rejects = [json.loads(line) for line in (out / PRIVATE / "rejects.jsonl").read_text().splitlines()]
    assert "BurnedInAnnotation is YES" in rejects[0]["reason"] and rejects[0]["path"].endswith("_003.dcm")
    assert _hits([published.published], published.secrets, b"") == []
    # The search finds what it looks for: the private side holds the ids and paths.
    assert _hits([out / PRIVATE], [next(iter(published.owner.values())), next(iter(published.owner))], b"")

    # Patients stay grouped as their ids group them: one pseudonym and one split per patient.
    rows = pq.read_table(published.published / "samples.parquet").to_pylist()
    paths = {json.loads(line)["source_hash"]: json.loads(line)["path"]
             for line in (out / PRIVATE / "sources.jsonl").read_text().splitlines()}  # fmt: skip
    by_patient: dict[str, set] = {}
    for r in rows:
        by_patient.setdefault(published.owner[paths[r["source_hash"]]], set()).add(
            (r["patient_id"], r["split"])
        )
    assert len(by_patient) == 3 and all(len(v) == 1 for v in by_patient.values())
    assert len({next(iter(v))[0] for v in by_patient.values()}) == 3


@pytest.mark.long
def test_nothing_trained_embedded_exported_or_reported_names_a_patient(
    published: Published, tmp_path: Path, fresh_accelerate: None
) -> None:
    # about 25 s on a loaded 2-core machine: a tiny MAE for one epoch, embeddings, export, report
    run_dir, emb, encoder, report = _train_embed_export_report(published.published, tmp_path / "work")
    assert (encoder / "README.md").is_file() and (report / "results.md").is_file()
    folders = [published.published, run_dir, emb, encoder, report]
    assert _hits(folders, published.secrets, _zarr_text(emb)) == []


def test_the_search_would_see_an_identifier_in_a_decoded_table(tmp_path: Path) -> None:
    # parquet compresses and dictionary-encodes strings: the search reads the cells, not only the bytes.
    table = pa.table({"patient_id": ["MRN12345678"] * 500})
    pq.write_table(table, tmp_path / "t.parquet", compression="zstd")
    assert _hits([tmp_path], ["MRN12345678"], b"") == [f"{tmp_path / 't.parquet'}: 'MRN12345678'"]
