"""A peer's long-lived identity: the RSA key that signs its DHT records.

hivemind's RSASignatureValidator signs every record we store under a subkey that ends in
our *owner tag*, `[owner:<ssh-rsa public key>]`, and every DHT node checks that signature.
Our peer id is a hash of that tag (`peer_id_of`), so it cannot be chosen: whoever wants an
id needs the private key behind it. Keeping the key in a file keeps the id across restarts,
which is what a run owner's certificate (admission.py) names.

Key files hold one unencrypted PKCS#8 PEM key, mode 0600 (keyfile.py).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from peers.keyfile import load_private_key, write_secret

log = logging.getLogger(__name__)

MIN_RSA_BITS = 2048  # what hivemind generates; a shorter key is either old or forged


def owner_tag(key: RSAPrivateKey) -> bytes:
    """The `[owner:...]` subkey suffix hivemind signs our records under."""
    public = key.get_public_key().to_bytes()
    return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", public)


def peer_id_of(owner: bytes) -> str:
    """Our short peer id: a hash of the RSA owner tag that signs this peer's records."""
    return hashlib.sha256(owner).hexdigest()[:20]


def peer_id_of_key(key: RSAPrivateKey) -> str:
    return peer_id_of(owner_tag(key))


def load_or_create(path: str | Path) -> RSAPrivateKey:
    """The RSA identity key in `path`; a new one is written there first if it is missing."""
    p = Path(path)
    if not p.exists():
        fresh = RSAPrivateKey()
        pem = fresh._private_key.private_bytes(  # hivemind exposes no PEM writer of its own
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if write_secret(p, pem):
            log.info("created identity key %s (peer id %s)", p, peer_id_of_key(fresh))
            return fresh
        # Someone else created it meanwhile: theirs is the identity, read it below.
    return load(p)


def load(path: str | Path) -> RSAPrivateKey:
    """Read an RSA identity key; ValueError with the reason if the file is not one."""
    p = Path(path)
    key = load_private_key(p)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{p}: not an RSA private key (a peer identity key is RSA)")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{p}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed")
    # hivemind's RSAPrivateKey can only be built from its own pickled form (DER).
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    out = RSAPrivateKey.__new__(RSAPrivateKey)
    out.__setstate__({"_private_key": der})
    return out
