"""Who may take part in a run: the owner's key, run files, certificates, the policy.

A private run has an *owner*, an Ed25519 key pair. `diloco-grow run init` writes the run
file: the run's name, the owner's public key and the mode. The owner admits a volunteer by
signing (run, peer id, expiry) with `diloco-grow admit`; the volunteer's peer id is a hash of
its RSA identity key (identity.py), so the certificate is useless to anyone without that
key. Every peer carries its certificate in its heartbeat record, and every reader checks it
(`Admission.why_not`): records of peers that are not admitted are ignored (progress.py),
and their CURVE keys cannot open a connection to our data plane (transport.py).

`open` mode admits everyone (public runs; the other defences stay on). A run file says which
mode the run is in, so every peer of a run applies the same policy.

Errors: a file that cannot be parsed raises ValueError naming the file and the field; a
certificate that parses but does not admit raises NotAdmitted saying why (wrong run, wrong
peer, expired, not signed by this run's owner). Certificates read from the network go
through the same checks; nothing here trusts its input.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from peers.errors import Malformed
from peers.keyfile import load_private_key, write_secret
from peers.schema import canonical_bytes, req_hex, req_int, req_str

RUN_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # = peers.config.RUN_RE (config imports us)
PEER_ID_RE = re.compile(r"^[0-9a-f]{20}$")
OWNER_KEY_HEX = 64  # raw Ed25519 public key, hex
SIG_HEX = 128  # raw Ed25519 signature, hex
MODES = ("admitted", "open")
MAX_EXPIRES = 1 << 40  # unix seconds; far beyond any real expiry, small enough for msgpack
# What the owner signs: a fixed prefix, so a certificate can never be mistaken for another
# signed message, then the canonical msgpack of the three fields.
_DOMAIN = b"diloco-grow admission v1\x00"


class NotAdmitted(ValueError):
    """A well-formed certificate that does not admit this peer to this run (says why)."""


# ---- the owner's key ----------------------------------------------------------------------


def load_or_create_owner_key(path: str | Path) -> tuple[Ed25519PrivateKey, bool]:
    """The owner's Ed25519 key in `path` (created, 0600, if missing) and whether it is new."""
    p = Path(path)
    if not p.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if write_secret(p, pem):
            return key, True
    key = load_private_key(p)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{p}: not an Ed25519 private key (a run owner's key is Ed25519)")
    return key, False


def public_hex(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


# ---- the run file -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFile:
    """What every peer of a run shares: its name, its owner's public key, its mode."""

    run: str
    owner_key: str  # Ed25519 public key, hex
    mode: str = "admitted"  # "admitted": only certified peers; "open": everyone

    def __post_init__(self) -> None:
        if not RUN_RE.match(self.run):
            raise ValueError(f"run name {self.run!r} must match {RUN_RE.pattern}")
        owner_public_key(self.owner_key)
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} must be one of {MODES}")

    def to_json(self) -> str:
        return json.dumps({"diloco_grow_run": 1, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> RunFile:
        d = _read_json(path, "run file")
        if d.get("diloco_grow_run") != 1:
            raise ValueError(f"{path}: not a diloco-grow run file (write one with `run init`)")
        unknown = sorted(set(d) - {"diloco_grow_run", "run", "owner_key", "mode"})
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {unknown}")
        try:
            return cls(str(d.get("run")), str(d.get("owner_key")), str(d.get("mode")))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        _write_atomic(Path(path), self.to_json())

    def admission(self) -> Admission:
        return Admission(self.run, None if self.mode == "open" else self.owner_key)


# ---- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """The owner's signature admitting `peer_id` to `run` until `expires` (unix seconds)."""

    run: str
    peer_id: str
    expires: int
    sig: str  # Ed25519 signature over message(run, peer_id, expires), hex

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> Certificate:
        """Schema check only (types, sizes); `verify` decides whether it admits anyone."""
        if not isinstance(d, dict) or set(d) != {"run", "peer_id", "expires", "sig"}:
            raise Malformed("certificate: expected a map of run, peer_id, expires, sig")
        sig = req_hex(d, "sig", SIG_HEX)
        if len(sig) != SIG_HEX:
            raise Malformed(f"certificate: field 'sig' must be {SIG_HEX} hex digits")
        return cls(
            run=req_str(d, "run", 64, RUN_RE),
            peer_id=req_str(d, "peer_id", 20, PEER_ID_RE),
            expires=req_int(d, "expires", hi=MAX_EXPIRES),
            sig=sig,
        )

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        try:
            return cls.from_dict(_read_json(path, "certificate"))
        except Malformed as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        _write_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def expires_utc(self) -> str:
        return datetime.fromtimestamp(self.expires, UTC).strftime("%Y-%m-%d %H:%M UTC")


def message(run: str, peer_id: str, expires: int) -> bytes:
    return _DOMAIN + canonical_bytes({"run": run, "peer_id": peer_id, "expires": expires})


def sign(owner: Ed25519PrivateKey, run: str, peer_id: str, expires: int) -> Certificate:
    """Admit `peer_id` to `run` until `expires` (what `diloco-grow admit` writes)."""
    if not RUN_RE.match(run):
        raise ValueError(f"run name {run!r} must match {RUN_RE.pattern}")
    if not PEER_ID_RE.match(peer_id):
        raise ValueError(
            f"peer id {peer_id!r} must be 20 hex digits (what `diloco-grow keygen` prints)"
        )
    if not 0 <= expires <= MAX_EXPIRES:
        raise ValueError(f"expiry {expires} out of range")
    return Certificate(run, peer_id, expires, owner.sign(message(run, peer_id, expires)).hex())


def verify(cert: Certificate, owner_key: str, run: str, peer_id: str, now: float) -> None:
    """Raise NotAdmitted unless `cert` admits `peer_id` to `run` at time `now`."""
    if cert.run != run:
        raise NotAdmitted(f"certificate is for run {cert.run!r}, not {run!r}")
    if cert.peer_id != peer_id:
        raise NotAdmitted(f"certificate is for peer {cert.peer_id}, not {peer_id}")
    if not _signature_ok(owner_key, message(cert.run, cert.peer_id, cert.expires), cert.sig):
        raise NotAdmitted("certificate is not signed by this run's owner (bad signature)")
    if cert.expires <= now:
        raise NotAdmitted(f"certificate expired on {cert.expires_utc}")


@functools.lru_cache(maxsize=4096)
def _signature_ok(owner_key: str, msg: bytes, sig: str) -> bool:
    # Cached: every peer's record is re-read every heartbeat with the same certificate.
    try:
        owner_public_key(owner_key).verify(bytes.fromhex(sig), msg)
        return True
    except (InvalidSignature, ValueError):
        return False


# ---- the policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    """Which peers a reader takes into account. `owner_key` None: open mode (everyone)."""

    run: str
    owner_key: str | None = None

    def __post_init__(self) -> None:
        if self.owner_key is not None:
            owner_public_key(self.owner_key)

    @property
    def open(self) -> bool:
        return self.owner_key is None

    def why_not(self, peer_id: str, cert: Certificate | None, now: float | None = None) -> str:
        """The reason `peer_id` with `cert` is not admitted now; empty if it is."""
        if self.owner_key is None:
            return ""
        if cert is None:
            return "no certificate (not admitted by the run's owner)"
        try:
            verify(cert, self.owner_key, self.run, peer_id, time.time() if now is None else now)
        except NotAdmitted as e:
            return str(e)
        return ""

    def admits(self, peer_id: str, cert: Certificate | None, now: float | None = None) -> bool:
        return not self.why_not(peer_id, cert, now)

    def require(self, peer_id: str, cert: Certificate | None) -> None:
        """Refuse to start a peer that the others would ignore (NotAdmitted says what to do)."""
        why = self.why_not(peer_id, cert)
        if why:
            raise NotAdmitted(
                f"this peer ({peer_id}) is not admitted to run {self.run!r}: {why}. Send the "
                "peer id to the run's owner, who answers with `diloco-grow admit`; then pass "
                "--key (the same key file) and --cert"
            )


def peer_settings(
    run: str | None,
    run_file: str | None,
    key_file: str | None,
    cert_file: str | None,
    open_run: bool,
) -> dict:
    """SwarmConfig's run and admission fields for a peer, from the files a volunteer holds.

    Either a run file (from the run's owner; an admitted one also needs --key and --cert)
    or an explicitly open run. ValueError says what is missing and how to get it."""
    if run_file is None:
        if not open_run:
            raise ValueError(
                "a peer needs its run's file: pass --run-file RUN.json (from the run's owner; "
                "with --key and --cert for an admitted run), or --open to join a public run "
                "that admits everyone"
            )
        return {"run": run or "diloco", "identity_key": key_file}
    rf = RunFile.load(run_file)
    if run is not None and run != rf.run:
        raise ValueError(f"the run file {run_file} is for run {rf.run!r}, not {run!r}")
    if rf.mode == "open":
        return {"run": rf.run, "identity_key": key_file}
    if open_run:
        raise ValueError(
            f"--open contradicts the run file {run_file}, which admits only certified peers"
        )
    if key_file is None:
        raise ValueError(
            "an admitted run needs --key, this peer's identity key file: `diloco-grow keygen "
            "--key peer.key` creates it and prints the peer id to send to the run's owner"
        )
    from peers.identity import load_or_create, peer_id_of_key  # (imports hivemind)

    peer_id = peer_id_of_key(load_or_create(key_file))
    if cert_file is None:
        raise ValueError(
            f"an admitted run needs --cert: send this peer's id {peer_id} to the run's owner, "
            f"who runs `diloco-grow admit --peer-id {peer_id} ...` and sends back the file"
        )
    cert = Certificate.load(cert_file)
    try:
        rf.admission().require(peer_id, cert)
    except NotAdmitted as e:
        hint = " (is --key the key file the id was made from?)" if cert.peer_id != peer_id else ""
        raise NotAdmitted(f"{cert_file}: {e}{hint}") from None
    return {"run": rf.run, "identity_key": key_file, "owner_key": rf.owner_key, "cert": cert}


def owner_public_key(owner_key: str) -> Ed25519PublicKey:
    if (
        not isinstance(owner_key, str)
        or len(owner_key) != OWNER_KEY_HEX
        or not re.fullmatch(r"[0-9a-f]+", owner_key)
    ):
        raise ValueError(f"owner key must be {OWNER_KEY_HEX} lowercase hex digits (Ed25519)")
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(owner_key))


def _read_json(path: str | Path, what: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {what} {p}: {e.strerror}") from None
    if len(text) > 64 << 10:
        raise ValueError(f"{p}: too large for a {what}")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a {what} (invalid JSON: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: not a {what} (expected a JSON object)")
    return d


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` whole (public files: a run file, a certificate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
