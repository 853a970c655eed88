"""Servers on 127.0.0.1 for the remote-storage tests: moto's S3 and a faulty static HTTP server.

Both run on a free port in a daemon thread, count the requests they see per path and stop on ``stop()`` (the
tests' fixtures call it). Nothing here reaches beyond the loopback interface.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """moto's S3 in server mode, wrapped to count GETs per object path (``/bucket/key``) and to list PUTs in
    the order they arrive."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.gets: Counter[str] = Counter()
        self.puts: list[str] = []
        self._lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            with self._lock:
                if environ["REQUEST_METHOD"] == "GET":
                    self.gets[environ["PATH_INFO"]] += 1
                elif environ["REQUEST_METHOD"] == "PUT":
                    self.puts.append(environ["PATH_INFO"])
            return app(environ, start_response)

        self._server = make_server(
            "127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler
        )
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def reset_counts(self) -> None:
        with self._lock:
            self.gets.clear()
            self.puts.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class FaultyHTTPServer:
    """Serves a folder over HTTP (GET with single byte ranges, HEAD), with injectable faults.

    Faults, counted over all GET requests: every ``drop_every``-th request has its connection closed with no
    response; every ``fail_every``-th (that is not dropped) gets a 503; a path in ``corrupt_once`` is served
    once with one byte flipped, then correctly.

    Attributes:
        gets: GET requests per URL path, faulty ones included.
        served: GETs answered with a 200/206 per URL path.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.drop_every = 0
        self.fail_every = 0
        self.corrupt_once: set[str] = set()
        self.gets: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self._count = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _fault(self, path: str) -> str | None:
        """Count a GET and decide its fault: 'drop', '503', 'corrupt' or None."""
        with self._lock:
            self.gets[path] += 1
            self._count += 1
            if self.drop_every and self._count % self.drop_every == 0:
                return "drop"
            if self.fail_every and self._count % self.fail_every == 0:
                return "503"
            if path in self.corrupt_once:
                self.corrupt_once.discard(path)
                return "corrupt"
            self.served[path] += 1
            return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers: a drop hits a reused connection

            def log_message(self, *args) -> None:
                pass  # keep test output clean

            def _file(self) -> Path | None:
                path = (server.root / self.path.lstrip("/")).resolve()
                return path if path.is_file() and server.root.resolve() in path.parents else None

            def do_HEAD(self) -> None:
                path = self._file()
                self.send_response(200 if path else 404)
                self.send_header("Content-Length", str(path.stat().st_size if path else 0))
                self.end_headers()

            def do_GET(self) -> None:
                fault = server._fault(self.path)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                path = self._file()
                if fault == "503" or path is None:
                    self._reply(503 if fault else 404, b"unavailable" if fault else b"not found")
                    return
                data = path.read_bytes()
                status, start = 200, 0
                if "Range" in self.headers:
                    first, last = self.headers["Range"].removeprefix("bytes=").split("-")
                    start, end = int(first), min(int(last) + 1, len(data))
                    data, status = data[start:end], 206
                if fault == "corrupt":
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                self._reply(status, data, start)

            def _reply(self, status: int, body: bytes, start: int = 0) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/*")
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def fetch_every_shard(url: str, cache_dir: str, start: object) -> None:
    """A spawned reader: open the dataset, wait for the others at ``start`` (a Barrier), fetch every file."""
    from radstream.shards.layout import shard_entries
    from radstream.shards.remote import open_dataset

    with open_dataset(url, cache_dir=cache_dir, backoff_s=0.01) as store:
        start.wait(timeout=60)
        for rel in shard_entries(store.manifest):
            store.local_path(rel)
            store.local_path(rel.replace(".tar", ".idx"))


def read_epoch_as_rank(url: str, cache_dir: str, rank: int, world: int, start: object, out: object) -> None:
    """A spawned rank: read one training epoch through the loader; put (rank, keys, shards it read) on ``out``."""
    from radstream.shards.loader import build_loader
    from radstream.shards.loader_base import shard_schedule
    from radstream.shards.loader_config import LoaderConfig, RemoteConfig

    cfg = LoaderConfig(
        backend="torch",
        batch_size=2,
        num_workers=0,
        shuffle_block=1,
        remote=RemoteConfig(cache_dir=cache_dir),
    )
    with build_loader(cfg, url, "train", process_index=rank, num_processes=world, train=False) as loader:
        shards = {s for step in shard_schedule(loader.data, loader.epoch_plans(0)) for s in step}
        start.wait(timeout=60)
        keys = [
            k for batch in loader for k, ok in zip(batch["key"], batch["valid"].tolist(), strict=True) if ok
        ]
        out.put((rank, keys, sorted(loader.store.rel(s) for s in shards)))
