"""Data-plane messages: what each kind carries, and validation of incoming headers.

Every zmq message is [header] or [header, payload]: the header is a small msgpack map made by
`compression.wire.pack_message`; the payload, for PART/REDUCED only, is one encoded shard made
by `compression.wire.pack`. `parse` turns an untrusted header into a `Msg` or raises
`Malformed`; whether the sender may say it (membership, round id) is checked by the caller,
which knows the group. The sender's CURVE key comes from the transport (zmq's ZAP User-Id),
not from the header, so it cannot be forged without the sender's secret key.

Matchmaking: JOIN (member -> leader), REDIRECT / RETRY / RESYNC / REJECT / FORMED (leader ->
joiner), BEGIN (leader -> members). Round: PART (contribution to a shard's reducer), REDUCED
(reducer -> all, naming the contributions it rejected), DONE (member -> all, with a digest
of the group as BEGIN described it and of every reduced shard: the vote that commits the
round once every member cast it), ABORT (anyone -> all, before voting, naming culprits).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from compression.codec import Encoded
from compression.wire import WireError, WireLimits, unpack
from peers.errors import Malformed
from peers.records import MAX_MEMBERS, Announcement
from peers.schema import (
    opt_vote,
    req_curve_key,
    req_endpoint,
    req_float,
    req_hex,
    req_int,
    req_str,
)

MATCH_KINDS = frozenset({"JOIN", "REDIRECT", "RETRY", "RESYNC", "REJECT", "FORMED", "BEGIN"})
ROUND_KINDS = frozenset({"PART", "REDUCED", "DONE", "ABORT"})
PAYLOAD_KINDS = frozenset({"PART", "REDUCED"})
MAX_CULPRITS = 16


@dataclass(frozen=True)
class Member:
    peer_id: str
    endpoint: str
    curve_key: str
    weight: float
    vote: dict | None = None

    def to_dict(self) -> dict:
        return {
            "peer_id": self.peer_id,
            "endpoint": self.endpoint,
            "curve_key": self.curve_key,
            "weight": self.weight,
            "vote": self.vote,
        }

    @classmethod
    def from_dict(cls, d: object) -> Member:
        if not isinstance(d, dict):
            raise Malformed("member entry: expected a map")
        return cls(
            req_hex(d, "peer_id", 64),
            req_endpoint(d, "endpoint"),
            req_curve_key(d, "curve_key"),
            req_float(d, "weight"),
            opt_vote(d),
        )


@dataclass(frozen=True)
class Msg:
    kind: str
    epoch: int
    step: int
    attempt: int
    sender: str  # claimed peer id; callers compare sender_key with that peer's known key
    sender_key: str  # CURVE public key the transport authenticated
    body: dict = field(default_factory=dict)  # validated, kind-specific fields
    payload: bytes | memoryview | None = None  # raw shard frame (REDUCED bytes are hashed)
    nbytes: int = 0
    enc: Encoded | None = None  # the shard, parsed and validated by compression.wire

    @property
    def rid(self) -> str | None:
        return self.body.get("rid")


def header(
    kind: str, run: str, epoch: int, step: int, attempt: int, sender: str, **body: object
) -> dict:
    return {
        "t": kind,
        "run": run,
        "epoch": epoch,
        "step": step,
        "attempt": attempt,
        "from": sender,
        **body,
    }


def parse(
    h: dict,
    run: str,
    sender_key: str,
    payload: bytes | memoryview | None,
    nbytes: int,
    limits: WireLimits,
) -> Msg:
    """Validate an untrusted message; raises Malformed (with the reason) on anything odd.

    Shard frames are unpacked here, on arrival, so a truncated or NaN-scaled frame is
    rejected with a log line even if it is for a round we never take part in.
    """
    kind = req_str(h, "t", 16)
    if kind not in MATCH_KINDS and kind not in ROUND_KINDS:
        raise Malformed(f"unknown message kind {kind!r}")
    if req_str(h, "run", 128) != run:
        raise Malformed(f"{kind} for another run {h.get('run')!r}")
    if (payload is not None) != (kind in PAYLOAD_KINDS):
        raise Malformed(f"{kind} with{'out' if payload is None else ''} a payload frame")
    body = _BODY[kind](h)
    if kind == "JOIN" and body["ann"].curve_key != sender_key:
        raise Malformed("JOIN's curve_key differs from the key that authenticated the sender")
    msg = Msg(
        kind,
        req_int(h, "epoch"),
        req_int(h, "step"),
        req_int(h, "attempt", hi=1 << 20),
        req_hex(h, "from", 64),
        sender_key,
        body,
        payload,
        nbytes,
    )
    if payload is None:
        return msg
    try:
        enc = unpack(payload, limits)
    except WireError as e:
        raise Malformed(f"{kind} shard frame: {e}") from None
    if len(enc.shape) != 1:
        raise Malformed(f"{kind} shard must be 1-D, got shape {enc.shape}")
    return replace(msg, enc=enc)


def _join(h: dict) -> dict:
    return {"ann": Announcement.from_dict({**h, "peer_id": h.get("from")})}


def _redirect(h: dict) -> dict:
    return {"leader": Member.from_dict({**(h.get("leader") or {}), "weight": 0.0})}


def _reason(h: dict) -> dict:
    return {"reason": req_str(h, "reason", 512)}


def _resync(h: dict) -> dict:
    return {"params_hash": req_str(h, "params_hash", 128), **_reason(h)}


def _begin(h: dict) -> dict:
    raw = h.get("members")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_MEMBERS:
        raise Malformed("BEGIN: members must be a non-empty list")
    members = [Member.from_dict(m) for m in raw]
    ids = [m.peer_id for m in members]
    if ids != sorted(set(ids)):
        raise Malformed("BEGIN: members must be sorted by peer_id without duplicates")
    if len({m.curve_key for m in members}) != len(members):
        raise Malformed("BEGIN: two members share a curve key")
    return {
        "rid": req_hex(h, "rid", 32),
        "members": members,
        "params_hash": req_str(h, "params_hash", 128),
        "numel": req_int(h, "numel", hi=1 << 40),
        "codec": req_str(h, "codec", 16),
        "block_size": req_int(h, "block_size", 1, 1 << 20),
    }


def _shard(h: dict) -> dict:
    return {"rid": req_hex(h, "rid", 32), "shard": req_int(h, "shard", hi=MAX_MEMBERS)}


def _reduced(h: dict) -> dict:
    # The reducer names the contributions it rejected (robust.py): everyone learns who
    # was left out, and the DONE digest covers it, so members agree on it too.
    return {**_shard(h), "rejected": _int_list(h, "rejected", MAX_MEMBERS)}


def _digest(h: dict) -> dict:
    shards = h.get("shards")
    if not isinstance(shards, list) or not 0 < len(shards) <= MAX_MEMBERS:
        raise Malformed("DONE: shards must be a non-empty list of digests")
    return {
        "rid": req_hex(h, "rid", 32),
        "digest": req_hex(h, "digest", 64),
        # Which part differs when two votes differ: the group the leader described, or
        # the bytes of one reducer's shard. That names the culprit (blame.py).
        "group": req_hex(h, "group", 64),
        "shards": [req_hex({"s": s}, "s", 64) for s in shards],
    }


def _abort(h: dict) -> dict:
    culprits = h.get("culprits", [])
    if not isinstance(culprits, list) or len(culprits) > MAX_CULPRITS:
        raise Malformed(f"ABORT: culprits must be a list of <= {MAX_CULPRITS} peer ids")
    return {
        "rid": req_hex(h, "rid", 32),
        **_reason(h),
        "culprits": [req_hex({"c": c}, "c", 64) for c in culprits],
    }


def _int_list(h: dict, key: str, max_len: int) -> list[int]:
    v = h.get(key, [])
    if not isinstance(v, list) or len(v) > max_len:
        raise Malformed(f"field {key!r}: expected a list of <= {max_len} ints")
    return [req_int({"i": x}, "i", hi=MAX_MEMBERS) for x in v]


_BODY = {
    "JOIN": _join,
    "REDIRECT": _redirect,
    "RETRY": lambda h: {},
    "RESYNC": _resync,
    "REJECT": _reason,
    "FORMED": lambda h: {},
    "BEGIN": _begin,
    "PART": _shard,
    "REDUCED": _reduced,
    "DONE": _digest,
    "ABORT": _abort,
}
