"""The network's one bound: a server that accepts connections and never answers is a timeout, retried and
then an error, not a hang."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="remote extras (aiohttp) not installed")

from radstream.shards.remote import open_dataset  # noqa: E402
from radstream.shards.transport import RemoteError  # noqa: E402


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never writes a byte."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held, stop = [], threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/dataset"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_a_server_that_never_answers_fails_after_the_retries(silent_server: str, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(
        RemoteError, match="failed 2 times, last: .*Timeout.*: no answer within remote.timeout_s"
    ):
        open_dataset(silent_server, cache_dir=str(tmp_path), retries=2, backoff_s=0.01, timeout_s=0.5)
    assert time.monotonic() - start < 20  # two reads of 0.5 s each (and their backoff), not a hang
