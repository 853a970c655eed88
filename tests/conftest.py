"""Shared fixtures: the real test data folder and a tiny synthetic shard dataset built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Node caches and the records of verified shards (radstream.shards.integrity) go to a folder of this test run, not to
# the user's ~/.cache/radstream; subprocesses inherit it.
os.environ.setdefault("RADSTREAM_CACHE", tempfile.mkdtemp(prefix="radstream-test-cache-"))
# The privacy key of every build (ingest.privacy) too: one per test run, made on first use.
os.environ.setdefault(
    "RADSTREAM_PRIVACY_KEY_FILE", str(Path(tempfile.mkdtemp(prefix="radstream-test-key-")) / "privacy.key")
)

# ../shared/data beside the checkout; a git worktree elsewhere names it with RADSTREAM_TEST_DATA.
SHARED_DATA = Path(
    os.environ.get("RADSTREAM_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real DICOM files and IRMA code lists); skip where absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """60 synthetic radiographs (all formats, 8 regions), small sides so the build takes seconds."""
    from radstream.ingest.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=60, seed=0, max_side=256)
    return root


def tiny_build_config(source: Path, out: Path, *overrides: str):
    """The build config of :func:`build_tiny_shards` (a synth corpus, test-sized settings)."""
    from radstream.core.config import load_config
    from radstream.shards.builder.config import BuildConfig

    return load_config(
        BuildConfig,
        None,
        [
            f"source={source / 'images'}",
            f"out={out}",
            "ingest.labels=folder",
            "binning.strategy=smart",
            "binning.num_bins=3",
            "binning.max_tokens=24",
            "shards.max_samples_per_shard=8",
            "shards.part_size=25",
            *overrides,
        ],
    )


def build_tiny_shards(source: Path, out: Path, *overrides: str) -> Path:
    """Build a finalized shard dataset from ``source`` (a synth corpus) with test-sized settings."""
    from radstream.shards.builder.parts import build_dataset

    build_dataset(tiny_build_config(source, out, *overrides))
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, synth_corpus) -> Path:
    """A finalized shard dataset: ~60 samples, 3 smart bins (≤ 24 patches of 16 px), jpg, folder labels."""
    return build_tiny_shards(synth_corpus, tmp_path_factory.mktemp("shards"))
