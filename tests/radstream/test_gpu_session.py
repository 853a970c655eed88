"""scripts/gpu_session.sh keeps nothing under a fixed /tmp name (another user of a shared GPU host could
create it first and plant files, or modules on PYTHONPATH)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_session.sh"


def stash(tmp_path: Path, *extra_env: tuple[str, str]) -> subprocess.CompletedProcess:
    piece = tmp_path / "piece"
    piece.mkdir(exist_ok=True)
    (piece / "dali.tar.part1").write_bytes(b"piece one")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), **dict(extra_env)}
    return subprocess.run(["bash", str(SCRIPT), "stash", str(piece)], capture_output=True, text=True, env=env)


def test_the_stash_is_private_to_the_user(tmp_path: Path) -> None:
    result = stash(tmp_path)
    assert result.returncode == 0, result.stderr
    kept = tmp_path / "home" / ".cache" / "radstream" / "dali-stash"
    assert (kept / "dali.tar.part1").read_bytes() == b"piece one"
    assert kept.stat().st_mode & 0o777 == 0o700


def test_a_stash_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "theirs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "theirs")
    result = stash(tmp_path, ("RADSTREAM_DALI_STASH", str(tmp_path / "link")))
    assert result.returncode == 2 and "is a link or not owned" in result.stderr
    assert not any((tmp_path / "theirs").iterdir())


def test_no_fixed_tmp_path_is_left_in_the_script() -> None:
    code = "\n".join(line.split("#")[0] for line in SCRIPT.read_text().splitlines())
    assert not re.search(r"/tmp\b", code), "use mktemp -d or the private stash"
