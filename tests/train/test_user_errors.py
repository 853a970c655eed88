"""A user's mistake gets one line naming the path, no traceback, and a non-zero exit: through the real entry
points (`python -m radstream.train.pretrain`, `python -m radstream.cli`), or their ``main`` in this process where a
subprocess per case would cost more than it checks (the same code turns the error into its line)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from radstream.shards.index import read_index

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "pretrain" / "debug.yaml"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=REPO)


def one_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The single error line of ``result`` (other log lines may be INFO), after checking code and words."""
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line or ": error:" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def pretrain(shards: Path | str, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(
        "radstream.train.pretrain", "--config", str(RECIPE), f"shards={shards}", f"run_dir={run_dir}", *extra
    )


def pretrain_here(caplog, shards: Path | str, run_dir: Path, code: int, *words: str, extra=()) -> str:
    """``radstream.train.pretrain.main`` in this process: exit code, exactly one ERROR record (one line) with ``words``."""
    from radstream.train.pretrain import main

    caplog.clear()
    argv = ["--config", str(RECIPE), f"shards={shards}", f"run_dir={run_dir}", *extra]
    with caplog.at_level(logging.INFO):
        assert main(argv) == code
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert "\n" not in line and all(w in line for w in words), line
    return line


@pytest.fixture
def copy(tiny_shards: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_shards, root, ignore=shutil.ignore_patterns("_work"))
    return root


def test_shards_missing_or_not_a_dataset(tmp_path: Path, caplog) -> None:
    one_error(
        pretrain(tmp_path / "nope", tmp_path / "run"), 3, str(tmp_path / "nope"), "no such dataset folder"
    )
    pretrain_here(caplog, tmp_path, tmp_path / "run", 3, str(tmp_path / "manifest.json"), "no manifest")


def test_run_dir_under_a_regular_file(tiny_shards: Path, tmp_path: Path, caplog) -> None:
    (tmp_path / "file").write_text("x")
    pretrain_here(caplog, tiny_shards, tmp_path / "file" / "run", 3, str(tmp_path / "file"))


def test_an_override_typo_is_blamed_on_the_override(tiny_shards: Path, tmp_path: Path, caplog) -> None:
    line = pretrain_here(caplog, tiny_shards, tmp_path / "run", 2, extra=["optim.bse_lr=1"])
    assert line.endswith("bad config: override 'optim.bse_lr=1': no such key 'bse_lr' in optim")
    assert str(RECIPE) not in line


def test_a_missing_tar_is_named(copy: Path, tmp_path: Path, caplog) -> None:
    tar = sorted(copy.glob("train/*/*.tar"))[0]
    tar.unlink()
    pretrain_here(caplog, copy, tmp_path / "run", 3, str(tar), "missing")
    off = ["loader.verify=false"]
    pretrain_here(caplog, copy, tmp_path / "run2", 3, str(tar), "not in the dataset", extra=off)


def test_a_truncated_tar_or_undecodable_image_is_named_during_training(
    copy: Path, tmp_path: Path, caplog
) -> None:
    """With loader.verify=false the checksums are not read first: the reader names shard and sample."""
    tar = sorted(copy.glob("train/*/*.tar"))[0]
    entry = read_index(tar.with_suffix(".idx"))[0]
    offset, size = entry.components["jpg"]
    data = bytearray(tar.read_bytes())
    data[offset : offset + size] = bytes(size)  # the JPEG's bytes zeroed: no image any more
    tar.write_bytes(bytes(data))
    off = "loader.verify=false"
    one_error(pretrain(copy, tmp_path / "run", off), 3, str(tar), f"sample {entry.key} does not decode")
    pretrain_here(caplog, copy, tmp_path / "run2", 3, str(tar), "sha256 differs")
    tar.write_bytes(bytes(data[: offset + 10]))
    pretrain_here(caplog, copy, tmp_path / "run3", 3, str(tar), "truncated", extra=[off])


def test_build_shards_onto_a_file_or_under_one(synth_corpus: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    src = str(synth_corpus / "images")
    for out in (tmp_path / "file", tmp_path / "file" / "out"):
        one_error(run("radstream.cli", "build-shards", src, str(out)), 2, str(out), "choose another OUT")
    one_error(run("radstream.cli", "verify-shards", str(tmp_path / "nope")), 2, "no such dataset folder")


def test_a_yaml_syntax_error_names_the_recipe_and_line(tmp_path: Path, caplog, capsys) -> None:
    """PyYAML's error is not OmegaConf's: without its own branch it escaped as a 37-line traceback."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("seed: 1\nbinning: {strategy: fixed\nworkers: 2\n")
    from radstream.train.pretrain import main

    with caplog.at_level(logging.INFO):
        assert main(["--config", str(recipe), f"shards={tmp_path}", f"run_dir={tmp_path / 'run'}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{recipe}:3: YAML syntax error" in errors[0], errors
    from radstream.cli import main as cli

    assert cli(["build-shards", str(tmp_path), str(tmp_path / "out"), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"build-shards: error: {recipe}:3: YAML syntax error" in err, err


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"seed: 1\n\xff\xfe: 2\n", "not UTF-8 text"),
        (b"- seed\n- 1\n", "top level is a list, not a mapping"),
        (b"just words\n", "top level is a str, not a mapping"),
    ],
)
def test_a_recipe_not_utf8_or_not_a_mapping_is_one_line(
    tmp_path: Path, caplog, capsys, content: bytes, words: str
) -> None:
    """A UnicodeDecodeError and OmegaConf's TypeError on a list escaped as tracebacks."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(content)
    from radstream.cli import main as cli
    from radstream.train.pretrain import main

    with caplog.at_level(logging.INFO):
        assert main(["--config", str(recipe), f"shards={tmp_path}", f"run_dir={tmp_path / 'run'}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{recipe}: " in errors[0] and words in errors[0], errors
    assert cli(["build-shards", str(tmp_path), str(tmp_path / "out"), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"build-shards: error: {recipe}: " in err and words in err, err


def test_an_override_of_bad_yaml_names_the_override(tmp_path: Path, caplog, capsys) -> None:
    from radstream.cli import main as cli
    from radstream.train.pretrain import main

    with caplog.at_level(logging.INFO):
        assert main(["--config", str(RECIPE), f"shards={tmp_path}", "optim.lr=[1,"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "override 'optim.lr=[1,': not valid YAML" in errors[0], errors
    assert cli(["build-shards", str(tmp_path), str(tmp_path / "out"), "binning.num_bins=[1,"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: override 'binning.num_bins=[1,': not valid YAML" in err, err


def test_s3_without_credentials_is_one_line_naming_the_url(
    tiny_shards: Path, tmp_path: Path, caplog, capsys, monkeypatch
) -> None:
    """botocore's NoCredentialsError is no OSError: it escaped pretrain and publish as 80-100 lines."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup (slow, off-cloud)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("RADSTREAM_S3_ENDPOINT", "http://127.0.0.1:9")  # never reached: signing fails first
    url = "s3://bucket/ds"
    fast = [f"loader.remote.cache_dir={tmp_path / 'c'}", "loader.remote.backoff_s=0"]
    pretrain_here(caplog, url, tmp_path / "run", 3, url, "S3 credentials are missing", extra=fast)
    from radstream.cli import main as cli

    assert cli(["publish", str(tiny_shards), url]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and url in err and "S3 credentials are missing" in err, err


def test_an_unreachable_host_is_one_line_naming_it(tmp_path: Path, caplog) -> None:
    """Nothing listens on port 9 (discard) of this machine: a refused connection, retried, then one line."""
    fast = [
        "loader.remote.retries=2",
        "loader.remote.backoff_s=0",
        f"loader.remote.cache_dir={tmp_path / 'c'}",
    ]
    url = "http://127.0.0.1:9/ds"
    pretrain_here(caplog, url, tmp_path / "run", 3, f"GET {url}/manifest.json", "failed 2 times", extra=fast)


def test_mixed_precision_no_as_typed_is_no() -> None:
    """`run.mixed_precision=no` on the command line (and `mixed_precision: no` in a recipe) is YAML 1.1's
    false; it means "no", not an error."""
    from radstream.core.config import load_config
    from radstream.train.config import PretrainConfig

    cfg = load_config(PretrainConfig, RECIPE, ["shards=x", "run_dir=y", "run.mixed_precision=no"])
    assert cfg.run.mixed_precision == "no"
