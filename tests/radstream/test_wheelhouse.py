"""The offline install path of `make wheelhouse`, without downloading anything.

radstream's own wheel plus a tiny wheelhouse (small dependencies re-packed from this environment's installed
files) go into a fresh venv with ``pip install --no-index --find-links``, then radstream's config layer
imports there with its real dependency (omegaconf) taken from the wheelhouse.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ("omegaconf", "PyYAML", "tqdm", "braceexpand")
"""Small installed distributions re-packed into the test's wheelhouse (omegaconf needs PyYAML)."""


def repack(name: str, out: Path) -> Path:
    """A wheel of the installed distribution ``name`` (its RECORD's files, a fresh RECORD); offline."""
    dist = importlib.metadata.distribution(name)
    info = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip().split("-") for line in info.splitlines() if line.startswith("Tag:")]
    tag = "-".join(".".join(dict.fromkeys(t[i] for t in tags)) for i in range(3))  # py2.py3-none-any
    project = dist.metadata["Name"].replace("-", "_")
    wheel = out / f"{project}-{dist.version}-{tag}.whl"
    root = Path(dist.locate_file(""))
    files = [f for f in dist.files if not f.parts[0].startswith("..") and f.suffix != ".pyc"]
    records = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            if f.name == "RECORD" or not (root / f).is_file():
                continue
            data = (root / f).read_bytes()
            zf.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{f},sha256={digest},{len(data)}")
        record = next(f for f in files if f.name == "RECORD")
        zf.writestr(str(record), "\n".join([*records, f"{record},,"]) + "\n")
    return wheel


def clean_env() -> dict[str, str]:
    """No PYTHONPATH (the checkout) and no pip configuration (a configured find-links or index would hide
    a broken wheelhouse)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}


def pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", *args], env=clean_env(), capture_output=True, text=True, timeout=120
    )


def test_make_wheelhouse_downloads_binary_wheels_for_the_target():
    out = subprocess.run(
        ["make", "-n", "wheelhouse", "WHEEL_PY=3.12", "WHEEL_PLATFORM=manylinux2014_x86_64", "WHEELHOUSE=wh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    assert "pip wheel --no-deps -w wh ." in out
    download = next(line for line in out.splitlines() if "pip download" in line)
    for flag in ("--only-binary=:all:", "--python-version 3.12", "--platform manylinux2014_x86_64", "-d wh"):
        assert flag in download
    assert "torch==" in download and "radstream-*.whl" in download


@pytest.mark.timeout(150)
def test_offline_install_from_a_wheelhouse(tmp_path):
    house = tmp_path / "wheelhouse"
    house.mkdir()
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(house),
         str(REPO)], env={**os.environ, "PIP_CONFIG_FILE": os.devnull}, capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    wheel = next(house.glob("radstream-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"radstream"}  # no bare core, train
    for name in SMALL:
        repack(name, house)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # ensurepip's bundled pip: offline
    python = env_dir / "bin" / "python"
    deps = pip(python, "install", "-q", "--no-index", "--find-links", str(house), "omegaconf", "tqdm",
               "braceexpand")  # fmt: skip
    assert deps.returncode == 0, deps.stderr  # PyYAML came in as omegaconf's dependency
    # radstream's own heavy dependencies (torch, DALI) are not in this tiny wheelhouse: --no-deps.
    ours = pip(python, "install", "-q", "--no-index", "--find-links", str(house), "--no-deps", "radstream")
    assert ours.returncode == 0, ours.stderr
    check = subprocess.run(
        [str(python), "-c", "import yaml, tqdm, braceexpand, radstream, radstream.core.config; "
         "print(radstream.core.config.__file__)"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert str(env_dir) in check.stdout  # imported from the venv, not from the checkout
    missing = pip(python, "install", "--no-index", "--find-links", str(house), "radstream")
    assert missing.returncode != 0 and "No matching distribution" in missing.stderr  # nothing fetched
