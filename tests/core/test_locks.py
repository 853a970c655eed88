"""``radstream.core.locks.exclusive``: flock where the filesystem has it, else a lock file with a heartbeat."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from radstream.core import locks


def _no_flock(monkeypatch) -> None:
    """A filesystem that refuses flock, as Lustre mounted without ``flock`` does."""

    def refuse(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "POLL_S", 0.01)


def _holders_overlap(path: Path) -> list[str]:
    """Two threads take the lock in turn; returns the order of their (enter, leave) events."""
    events, first_in = [], threading.Event()

    def hold(name: str, wait: float) -> None:
        with locks.exclusive(path):
            events.append(f"{name} in")
            first_in.set()
            time.sleep(wait)
            events.append(f"{name} out")

    a = threading.Thread(target=hold, args=("a", 0.2))
    a.start()
    first_in.wait(5)
    b = threading.Thread(target=hold, args=("b", 0.0))
    b.start()
    a.join(5)
    b.join(5)
    return events


@pytest.mark.parametrize("flock", [True, False])
def test_one_holder_at_a_time(tmp_path: Path, monkeypatch, flock: bool) -> None:
    if not flock:
        _no_flock(monkeypatch)
    assert _holders_overlap(tmp_path / "plan.lock") == ["a in", "a out", "b in", "b out"]
    assert not (tmp_path / "plan.lock.held").exists()  # the fallback's lock file is gone after


def test_the_fallback_lock_file_is_touched_while_held(tmp_path: Path, monkeypatch) -> None:
    _no_flock(monkeypatch)
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    held = tmp_path / "plan.lock.held"
    with locks.exclusive(tmp_path / "plan.lock"):
        os.utime(held, (1, 1))
        time.sleep(0.3)
        assert time.time() - held.stat().st_mtime < 5
        assert held.read_text().split()[1] == str(os.getpid())  # who holds it


def test_a_dead_holders_lock_file_is_taken_over(tmp_path: Path, monkeypatch, caplog) -> None:
    _no_flock(monkeypatch)
    held = tmp_path / "plan.lock.held"
    held.write_text("node7 4242 0\n")
    os.utime(held, (time.time() - locks.STALE_AFTER_S - 5,) * 2)
    with locks.exclusive(tmp_path / "plan.lock"):
        assert held.read_text().split()[1] == str(os.getpid())
    assert "node7 4242" in caplog.text and not list(tmp_path.glob("*.stale-*"))


def test_a_live_holders_lock_file_is_waited_for(tmp_path: Path, monkeypatch) -> None:
    _no_flock(monkeypatch)
    held = tmp_path / "plan.lock.held"
    held.write_text("node7 4242 0\n")  # fresh: touched now
    got = threading.Event()

    def wait() -> None:
        with locks.exclusive(tmp_path / "plan.lock"):
            got.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert not got.is_set()
    held.unlink()  # its holder lets go
    waiter.join(5)
    assert got.is_set()


def test_other_errors_are_not_taken_for_a_missing_flock(tmp_path: Path, monkeypatch) -> None:
    def fail(fd, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(locks.fcntl, "flock", fail)
    with pytest.raises(OSError, match="I/O error"), locks.exclusive(tmp_path / "plan.lock"):
        pass
