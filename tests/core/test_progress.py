"""Progress bars: on for a terminal, off for logs and other ranks, forced either way by RADSTREAM_PROGRESS."""

from __future__ import annotations

import io

import pytest

from radstream.core import progress as progress_mod
from radstream.core.progress import progress, progress_enabled


class FakeStderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "env", "main", "shown"),
    [(True, "", True, True), (False, "", True, False), (False, "1", True, True), (True, "0", True, False),
     (True, "1", False, False)],
)  # fmt: skip
def test_bars_follow_the_terminal_the_rank_and_the_override(monkeypatch, tty, env, main, shown) -> None:
    stderr = FakeStderr(tty)
    monkeypatch.setattr(progress_mod.sys, "stderr", stderr)
    monkeypatch.setenv("RADSTREAM_PROGRESS", env)
    assert progress_enabled(main) is shown
    with progress(total=4, desc="embed test", unit="img", unit_scale=8, main_process=main) as bar:
        bar.update(4)
    text = stderr.getvalue()
    assert ("embed test" in text and "img" in text) is shown  # the bar (with its rate unit) or nothing
