"""Talking to object storage (``s3://``) or a web server (``http(s)://``): the filesystem of a URL and retries.

All network access is fsspec (s3fs for S3, its aiohttp HTTP filesystem); transient failures (dropped
connections, timeouts, 5xx, 408/429) are retried with exponential backoff, a bounded number of times. Every
connection and every read waits at most ``RemoteConfig.timeout_s`` (a server that never answers is a timeout).
S3 endpoint: ``RemoteConfig.s3_endpoint``, else ``$RADSTREAM_S3_ENDPOINT``, else ``$AWS_ENDPOINT_URL``;
credentials only from the environment or the usual AWS config files (botocore's chain). Used by the remote
store (reading) and by ``radstream.shards.builder.publish`` (writing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

from radstream.shards.loader_config import RemoteConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
REMOTE_SCHEMES = ("s3://", "http://", "https://")


class RemoteError(OSError):
    """A remote read or write still failed after every retry."""


def is_remote(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names an S3 or HTTP(S) location rather than a local path."""
    return str(url).startswith(REMOTE_SCHEMES)


def s3_endpoint(cfg: RemoteConfig) -> str | None:
    """The S3 endpoint in force: config, then ``$RADSTREAM_S3_ENDPOINT``, then ``$AWS_ENDPOINT_URL``."""
    return cfg.s3_endpoint or os.environ.get("RADSTREAM_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(url: str, cfg: RemoteConfig):
    """(fsspec filesystem, base path without trailing slash) for ``url``."""
    from fsspec.core import url_to_fs

    options: dict = {} if is_remote(url) else {"auto_mkdir": True}  # publishing into a local folder
    if url.startswith("s3://"):
        options["config_kwargs"] = {"connect_timeout": cfg.timeout_s, "read_timeout": cfg.timeout_s}
        if s3_endpoint(cfg):
            options["endpoint_url"] = s3_endpoint(cfg)
    elif url.startswith(("http://", "https://")):
        import aiohttp  # the HTTP filesystem's client: no total bound (a big shard may take long), per read one

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.timeout_s, sock_read=cfg.timeout_s)
        options["client_kwargs"] = {"timeout": timeout}
    fs, base = url_to_fs(url.rstrip("/"), **options)
    return fs, base.rstrip("/")


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, asyncio.TimeoutError]
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:
        pass  # no HTTP filesystem installed: its errors cannot occur
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [HTTPClientError, BotoConnectionError]  # the second: an endpoint that cannot be reached
    except ImportError:
        pass
    return tuple(types)


def _credential_types() -> tuple[type[BaseException], ...]:
    """botocore's "no credentials" errors: not an OSError, so without their own branch they escaped
    ``with_retries`` as an 80-line traceback."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return ()
    return (NoCredentialsError, PartialCredentialsError)


def is_transient(err: BaseException) -> bool:
    """Whether retrying may help: not for missing files or refused access, not for 4xx except 408/429."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return status >= 500 or status in (408, 429)
    return isinstance(err, _transient_types())


def describe(err: BaseException) -> str:
    """An error in one line: its type and message, or for a timeout without one, what timed out."""
    text = str(err).strip() or (
        "no answer within remote.timeout_s" if "Timeout" in type(err).__name__ else ""
    )
    return f"{type(err).__name__}: {text}".rstrip(": ")


def with_retries(call: Callable[[], T], what: str, retries: int, backoff_s: float) -> T:
    """``call()``, retried on transient errors with exponential backoff.

    Raises:
        RemoteError: still failing after ``retries`` attempts (naming ``what`` and the last error), or S3
            credentials missing (never retried: they will not appear by waiting).
    """
    for attempt in range(1, retries + 1):
        try:
            return call()
        except _credential_types() as err:
            raise RemoteError(
                f"{what}: S3 credentials are missing or incomplete ({err}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials"
            ) from None
        except _transient_types() as err:
            if not is_transient(err):
                raise
            if attempt == retries:
                raise RemoteError(f"{what}: failed {retries} times, last: {describe(err)}") from err
            delay = min(30.0, backoff_s * 2 ** (attempt - 1)) * random.uniform(
                0.5, 1.0
            )  # jitter spreads nodes
            log.info("%s: %s; retry %d in %.2f s", what, describe(err), attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
