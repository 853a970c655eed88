"""The ingest stage: a source (folder tree or CSV manifest) → typed records with label, patient, split and
label fractions, plus the inputs rejected on the way.

Privacy: each patient id becomes a keyed pseudonym and each source path gets a keyed hash
(``ingest.privacy``) here, before grouping and splitting, so nothing downstream needs the identifiers; the
pairs (pseudonym, id) and (hash, path) come back apart, in ``IngestResult.identities``, for the private map.

discover (``radstream.ingest.sources``) → header scan without decoding pixels (``radstream.ingest.scan``) → patient ids →
patient-grouped, class-stratified splits and nested label fractions (``ingest.splits``). The result is a pure
function of the files and the config, so every task of a build array computes the same one. The shard build
(``radstream.shards.builder.plan``) takes the records and bins, parts, encodes and writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

from radstream.core.progress import progress
from radstream.ingest.config import IngestConfig
from radstream.ingest.labels import class_names_for
from radstream.ingest.privacy import Pseudonymizer
from radstream.ingest.readers import ReadConfig
from radstream.ingest.scan import HeaderInfo, scan_one
from radstream.ingest.sources import SourceItem, discover
from radstream.ingest.splits import assign_splits, label_fractions

# A header read takes about 0.1 ms on a local disk and a process pool about 20 ms to start: below this many
# files a pool makes the scan slower, not faster.
SCAN_POOL_MIN_FILES = 500


@dataclass(frozen=True)
class Reject:
    """An input that will not be written, and why (one line)."""

    path: str
    """Relative to the source root (absolute when outside it); private (see ``source_hash``)."""
    reason: str
    source_hash: str = ""
    """The keyed hash of the path: what a published rejects list names."""


class NoUsableImages(ValueError):
    """Every input was rejected. Carries the rejects, so that the build can still write them for the user."""

    def __init__(self, message: str, rejects: list[Reject]) -> None:
        super().__init__(message)
        self.rejects = rejects


@dataclass(frozen=True)
class IngestRecord:
    """One kept input, with everything the build needs except its pixels."""

    path: str
    """Absolute path of the file."""
    rel: str
    """Path relative to the source root (absolute when outside it): the sample's name everywhere."""
    label: str | None
    """Class name, None when unlabeled."""
    patient: str
    """The patient's pseudonym (``ingest.privacy``) of its id, prefixed by where that came from (``dicom:``,
    ``dir:``, ``file:``) unless the manifest gave it; the id itself with privacy off."""
    height: int
    width: int
    format: str
    """Container format told by content (``radstream.ingest.readers.sniff_format``)."""
    split: str
    """``train``, ``val`` or ``test``."""
    fractions: tuple[float, ...]
    """The nested label fractions of the train split this record belongs to."""
    source_hash: str = ""
    """The keyed hash of ``rel``: the sample's name in everything a dataset publishes."""


@dataclass(frozen=True)
class IngestResult:
    """The records of one source, its rejects and the class names."""

    records: tuple[IngestRecord, ...]
    rejects: tuple[Reject, ...]
    seen: int
    """Inputs discovered: kept + rejected."""
    class_names: tuple[str, ...]
    identities: dict[str, dict[str, str]] = field(default_factory=dict)
    """The private map: ``{"patients": {pseudonym: id}, "sources": {hash: path}}`` (never published)."""
    privacy: dict = field(default_factory=dict)
    """What the manifest says about it: ``identifiers`` (pseudonymised | kept), ``key_id``,
    ``source_fingerprint`` (a keyed hash of the sorted source hashes)."""


def _rel(resolved: Path, root: Path) -> str:
    try:
        return str(resolved.relative_to(root))
    except ValueError:
        return str(resolved)


def _patient(item: SourceItem, head_pid: str | None, rel: str, how: str) -> str:
    if item.patient_id:
        return item.patient_id
    if how in ("auto", "dicom") and head_pid:
        return f"dicom:{head_pid}"
    if how == "parent":
        return f"dir:{Path(rel).parent}"
    return f"file:{rel}"


def scan_sources(
    items: list[SourceItem], read: ReadConfig, workers: int = 1
) -> list[tuple[HeaderInfo | None, str | None]]:
    """Header-scan every item (in parallel with ``workers``): per item (HeaderInfo, None) or (None, reason)."""
    args = [(it.path, read) for it in items]
    bar = dict(total=len(args), desc="scan headers", unit="img")
    if workers > 1 and len(args) >= SCAN_POOL_MIN_FILES:
        with Pool(workers) as pool:
            return list(progress(pool.imap(scan_one, args, chunksize=64), **bar))
    return [scan_one(a) for a in progress(args, **bar)]


@dataclass(frozen=True)
class _Scanned:
    """A discovered input whose header was read: everything but its split."""

    path: str
    rel: str
    label: str | None
    patient: str
    head: HeaderInfo


def _scan(root: Path, cfg: IngestConfig, workers: int) -> tuple[list[_Scanned], list[Reject], int]:
    """Discover and header-scan the source: (scanned inputs, rejects, inputs seen)."""
    found, early = discover(
        str(root),
        manifest_csv=cfg.manifest_csv,
        label_from=cfg.labels,
        irma_csv=cfg.irma_csv,
        drop_labels=tuple(cfg.drop_labels),
    )
    rejects = [Reject(r["path"], r["reason"]) for r in early]
    scanned = []
    for item, (head, reason) in zip(found, scan_sources(found, cfg.read, workers), strict=True):
        resolved = Path(item.path).resolve()
        rel = _rel(resolved, root)
        if head is None:
            rejects.append(Reject(rel, reason))
            continue
        patient = _patient(item, head.patient_id, rel, cfg.patient_from)
        scanned.append(_Scanned(str(resolved), rel, item.label, patient, head))
    return scanned, rejects, len(found) + len(early)


def _pseudonymise(
    scanned: list[_Scanned], rejects: list[Reject], root: Path, psn: Pseudonymizer
) -> tuple[list[str], list[Reject], dict[str, dict[str, str]]]:
    """(each scanned input's pseudonym, the rejects with their path hashes, the private map)."""
    patients = {s.patient: psn.patient(s.patient) for s in scanned}
    sources = {psn.path(s.rel): s.rel for s in scanned}
    hashed = []
    for r in rejects:
        rel = _rel(Path(r.path), root) if Path(r.path).is_absolute() else r.path
        hashed.append(Reject(r.path, r.reason, psn.path(rel)))
        sources[hashed[-1].source_hash] = r.path
    identities = {"patients": {v: k for k, v in patients.items()}, "sources": sources}
    return [patients[s.patient] for s in scanned], hashed, identities


def _privacy_summary(psn: Pseudonymizer, sources: dict[str, str]) -> dict:
    """What the manifest may say about the source and its pseudonyms (no path, no id)."""
    return {
        "identifiers": "pseudonymised" if psn.enabled else "kept",
        "key_id": psn.key_id(),
        "source_fingerprint": psn.fingerprint("\n".join(sorted(sources))),
    }


def run_ingest(source: str | Path, cfg: IngestConfig, *, seed: int, workers: int = 1) -> IngestResult:
    """Discover, scan, label, pseudonymise, group and split every input of ``source`` (no pixel decoding).

    Raises:
        NoUsableImages: no usable image in the source (a ValueError holding the rejects, with their path
            hashes).
        ingest.privacy.PrivacyKeyError: the site key cannot be read.
    """
    root = Path(source).resolve()
    psn = Pseudonymizer.from_config(cfg.privacy)
    scanned, rejects, seen = _scan(root, cfg, workers)
    if not scanned:
        _, hashed, _ = _pseudonymise([], rejects, root, psn)
        raise NoUsableImages(f"{root}: no usable images found ({len(rejects)} rejected)", hashed)
    patients, rejects, identities = _pseudonymise(scanned, rejects, root, psn)
    labels = [s.label for s in scanned]
    sp = cfg.splits
    counts = tuple(sp.counts) if sp.counts is not None else None
    splits = assign_splits(
        labels,
        patients,
        seed=seed,
        counts=counts,
        fractions=None if counts else tuple(sp.fractions),
    )
    fracs = label_fractions(
        labels, splits, fractions=tuple(sp.label_fractions), seed=seed, patients=[s.patient for s in scanned]
    )
    records = []
    for s, patient, split, frac in zip(scanned, patients, splits, fracs, strict=True):
        source_hash = psn.path(s.rel)
        if split == "unused":
            reason = f"outside the requested split counts {list(counts)}"
            rejects.append(Reject(s.rel, reason, source_hash))
            continue
        h = s.head
        records.append(
            IngestRecord(
                s.path, s.rel, s.label, patient, h.height, h.width, h.format, split, tuple(frac), source_hash
            )
        )
    class_names = class_names_for(cfg.labels, [r.label for r in records], drop=tuple(cfg.drop_labels))
    summary = _privacy_summary(psn, identities["sources"])
    return IngestResult(tuple(records), tuple(rejects), seen, tuple(class_names), identities, summary)
