"""Secret key files: created once, atomically, readable only by their owner.

A crash never leaves half a key behind, and two processes creating the same file end up
with one key (the first one's). Used for peer identity keys (identity.py) and the run
owner's key (admission.py).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def read_secret(path: Path) -> bytes:
    """A key file's bytes, with a warning if others may read it (ssh refuses such keys;
    we only warn, since a shared lab machine may have reasons)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read key file {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is readable by others (chmod 600 %s)", path, path)
    if len(data) > 64 << 10:
        raise ValueError(f"{path}: {len(data)} bytes is too large for a key file")
    return data


def write_secret(path: Path, data: bytes) -> bool:
    """Create `path` with `data`, mode 0600, atomically; False if it already exists.

    The bytes go to a private temporary file first, which is then hard-linked into place:
    link() fails if the name exists, so a concurrent creator never sees a partial file and
    never overwrites an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_private_key(path: Path) -> object:
    """The private key in a PEM key file (any algorithm; the caller checks which)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = read_secret(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (TypeError, UnsupportedAlgorithm, ValueError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({e})") from None
