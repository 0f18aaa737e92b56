"""The three kinds of DHT record a peer writes, as validated schemas.

- `PeerRecord`  (key `<run>/peers`): liveness and progress, refreshed while the peer lives.
  `last_round` is the last outer step this peer *committed*; `in_round` says it is inside
  the data phase of (epoch, step, attempt) right now. Others use both to notice that a
  round happened without them (-> NeedResync) or is happening without them (-> wait).
- `Announcement` (key `<run>/round/<epoch>/<step>`): "I want to average step s at attempt a",
  with everything a leader needs to admit the peer.
- `HistoryEntry` (key `<run>/history`): a committed growth event, for joiners and laggards.

Records are signed by hivemind (the subkey carries the owner's RSA key) and the `peer_id` in
the value must equal `peer_id_of(owner key)`; dht.py checks that binding before from_dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from peers.errors import Malformed
from peers.schema import (
    opt_info,
    opt_vote,
    req_curve_key,
    req_endpoint,
    req_float,
    req_hex,
    req_int,
    req_str,
)

MAX_MEMBERS = 1024


def _opt(d: dict, key: str, reader: Any) -> Any:
    return None if d.get(key) is None else reader(d, key)


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    endpoint: str
    curve_key: str
    arch_epoch: int
    last_round: int  # last committed outer step, -1 before the first one
    in_round: tuple[int, int, int] | None  # (epoch, step, attempt) while in a data phase
    time: float
    state_endpoint: str | None = None
    state_curve_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["in_round"] = list(self.in_round) if self.in_round is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PeerRecord:
        ir = d.get("in_round")
        if ir is not None:
            if not isinstance(ir, (list, tuple)) or len(ir) != 3:
                raise Malformed("field 'in_round': expected [epoch, step, attempt] or None")
            ir = tuple(req_int({"v": x}, "v") for x in ir)
        return cls(
            peer_id=req_hex(d, "peer_id", 64),
            endpoint=req_endpoint(d, "endpoint"),
            curve_key=req_curve_key(d, "curve_key"),
            arch_epoch=req_int(d, "arch_epoch"),
            last_round=req_int(d, "last_round", lo=-1),
            in_round=ir,
            time=req_float(d, "time"),
            state_endpoint=_opt(d, "state_endpoint", req_endpoint),
            state_curve_key=_opt(d, "state_curve_key", req_curve_key),
            info=opt_info(d),
        )

    def public(self) -> dict:
        """What list_peers() shows: the app's info, overridden by the fields the swarm owns."""
        d = dict(self.info)
        d.update(self.to_dict())
        d.pop("info")
        return d


@dataclass(frozen=True)
class Announcement:
    peer_id: str
    endpoint: str
    curve_key: str
    attempt: int
    weight: float
    params_hash: str
    numel: int
    codec: str
    block_size: int
    vote: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Announcement:
        return cls(
            peer_id=req_hex(d, "peer_id", 64),
            endpoint=req_endpoint(d, "endpoint"),
            curve_key=req_curve_key(d, "curve_key"),
            attempt=req_int(d, "attempt", hi=1 << 20),
            weight=req_float(d, "weight"),
            params_hash=req_str(d, "params_hash", 128),
            numel=req_int(d, "numel", hi=1 << 40),
            codec=req_str(d, "codec", 16),
            block_size=req_int(d, "block_size", lo=1, hi=1 << 20),
            vote=opt_vote(d),
        )


@dataclass(frozen=True)
class HistoryEntry:
    arch_epoch: int  # the epoch the event was committed in; peers then move to arch_epoch + 1
    step: int
    vote: dict
    vote_hash: str
    members: tuple[str, ...]
    peer_id: str  # who wrote it (the round leader)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"] = list(self.members)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HistoryEntry:
        members = d.get("members")
        if not isinstance(members, list) or not 0 < len(members) <= MAX_MEMBERS:
            raise Malformed("field 'members': expected a non-empty list")
        vote = opt_vote(d)
        if vote is None:
            raise Malformed("field 'vote': a history entry needs a vote")
        return cls(
            arch_epoch=req_int(d, "arch_epoch"),
            step=req_int(d, "step"),
            vote=vote,
            vote_hash=req_hex(d, "vote_hash", 64),
            members=tuple(req_hex({"m": m}, "m", 64) for m in members),
            peer_id=req_hex(d, "peer_id", 64),
        )
