"""Keyed pseudonyms: what a shard dataset says about a patient or a source file instead of the identifier.

A patient id becomes ``HMAC-SHA256(site key, id)`` truncated, a source path a keyed hash of it. The site key
is a file outside the dataset (``ingest.privacy.key_file``, else ``$RADSTREAM_PRIVACY_KEY_FILE``, else
``~/.config/radstream/privacy.key``), created with mode 0600 on first use. The same key gives the same
pseudonyms in every build, every task of a SLURM array and every site that shares it, so patient-grouped
splits stay exact; without the key a pseudonym cannot be turned back into the id (or checked against a guess,
as a plain hash of an MRN could be). With ``ingest.privacy.enabled=false`` (``ingest.privacy=off``,
``--keep-identifiers``) the ids and paths are written as they are, and the manifest says so.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

KEY_ENV = "RADSTREAM_PRIVACY_KEY_FILE"
HASH_CHARS = 20
"""Hex characters kept of a keyed hash: 80 bits, no collision to expect below ~10^10 patients or files."""
PSEUDONYM_PREFIX = "psn-"
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class PrivacyConfig:
    """Pseudonyms instead of identifiers in everything a shard dataset publishes (see ``ingest.privacy``)."""

    enabled: bool = True
    """False (``ingest.privacy=off`` or ``--keep-identifiers``): raw patient ids, source paths and file-name keys
    are written, for data that is public already; the manifest names it and `publish` refuses it by default."""
    key_file: str | None = None
    """The site key (a secret, never copied into the dataset); default ``$RADSTREAM_PRIVACY_KEY_FILE``, else
    ``~/.config/radstream/privacy.key``. Created (0600) when missing. Losing it means new pseudonyms."""


class PrivacyKeyError(ValueError):
    """A key file that cannot be used (unreadable, too short); the message names the file."""


def default_key_file() -> Path:
    """Where the site key lives when the config names none."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "radstream" / "privacy.key"


def _create_key(path: Path) -> None:
    """Write a new random key at ``path`` (0600), atomically and without ever replacing an existing one: two
    tasks of an array creating it at once end with the same key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        os.link(tmp, path)  # fails if another process made it first: theirs is kept
        log.warning(
            "privacy: created the site key %s (mode 0600); keep it safe and share it only with the sites that "
            "must produce the same pseudonyms: losing it means new pseudonyms",
            path,
        )
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def load_key(cfg: PrivacyConfig) -> bytes:
    """The site key's bytes, the file created first where it does not exist.

    Raises:
        PrivacyKeyError: the file cannot be read or holds fewer than 16 bytes.
    """
    path = Path(cfg.key_file).expanduser() if cfg.key_file else default_key_file()
    if not path.exists():
        _create_key(path)
    try:
        key = path.read_bytes().strip()
    except OSError as err:
        raise PrivacyKeyError(f"{path}: privacy key file unreadable ({err.strerror or err})") from None
    if len(key) < MIN_KEY_BYTES:
        raise PrivacyKeyError(
            f"{path}: privacy key file holds {len(key)} bytes, at least {MIN_KEY_BYTES} needed"
        )
    if path.stat().st_mode & 0o077:
        log.warning("privacy: %s is readable by other users; chmod 600 it", path)
    return key


class Pseudonymizer:
    """Turns identifiers into what a dataset may publish: keyed pseudonyms, or (privacy off) the identifiers."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key

    @classmethod
    def from_config(cls, cfg: PrivacyConfig) -> Pseudonymizer:
        """The pseudonymizer of a build (loading, or first creating, the site key when privacy is on)."""
        return cls(load_key(cfg) if cfg.enabled else None)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _mac(self, domain: str, value: str) -> str:
        assert self._key is not None
        msg = f"{domain}\0{value}".encode("utf-8", "surrogateescape")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:HASH_CHARS]

    def patient(self, raw: str) -> str:
        """The patient key of a dataset: ``psn-`` + a keyed hash of ``raw``, or ``raw`` with privacy off."""
        return PSEUDONYM_PREFIX + self._mac("patient", raw) if self.enabled else raw

    def path(self, rel: str) -> str:
        """A source path's hash (keyed with privacy on; plain sha256 with it off, where the path is written)."""
        if self.enabled:
            return self._mac("path", rel)
        return hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_CHARS]

    def fingerprint(self, text: str) -> str:
        """A keyed fingerprint of ``text`` (e.g. the source listing): equal sources give equal fingerprints, and
        nobody without the key can test a guess of what the source was."""
        if self.enabled:
            return self._mac("fingerprint", text)
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_CHARS]

    def pixels(self, sha1: str | None) -> str | None:
        """A published duplicate key of an image's pixels: keyed with privacy on (a plain hash would let anyone
        holding an identified copy of the image find its sample), the pixel sha1 itself with privacy off."""
        if sha1 is None or not self.enabled:
            return sha1
        return self._mac("pixels", sha1)

    def key_id(self) -> str | None:
        """Names the key without revealing it (None with privacy off): builds under one key share it."""
        return self._mac("key-id", "radstream") if self.enabled else None


HEADER_ALLOW_LIST = ("format", "height", "width", "bits", "photometric", "frames")
"""The only facts of a file's header a shard carries (what normalisation and the loader need). Every other
element — names, ids, dates, institutions, UIDs, free text — stays out, whatever the file holds."""
_PHOTOMETRIC = re.compile(r"^[A-Z0-9_ ]{1,16}(->L)?$")


def allowed_header(meta: dict) -> dict:
    """The allow-listed header facts of a decoded file's ``meta``: numbers as ints, the photometric
    interpretation only when it reads like a DICOM code string (anything else becomes ``"other"``)."""
    out: dict = {}
    for name in HEADER_ALLOW_LIST:
        value = meta.get(name, 1 if name == "frames" else None)
        if name == "photometric":
            out[name] = value if isinstance(value, str) and _PHOTOMETRIC.match(value) else "other"
        elif name == "format":
            out[name] = value if value in ("dicom", "png", "jpeg", "tiff") else "other"
        else:
            out[name] = int(value) if isinstance(value, int | float) and value == value else None
    return out
