"""The three kinds of DHT record a peer writes, as validated schemas.

- `PeerRecord`  (key `<run>/peers`): the progress heartbeat, republished every
  `heartbeat_s`: the state the peer holds (epoch, step, θ_g hash, recent lineage), its
  progress in the current round (tokens, tokens/s, ETA, ready) and its round-machine phase.
  Others use it to decide whom to wait for, who is dead, whose θ_g the majority holds, and
  how an interrupted round ended.
- `Announcement` (key `<run>/round/<epoch>/<step>`): "I want to average step s at attempt a",
  with everything a leader needs to admit the peer.
- `HistoryEntry` (key `<run>/history`): a committed growth event, for joiners and laggards.

Records are signed by hivemind (the subkey carries the owner's RSA key) and the `peer_id` in
the value must equal `peer_id_of(owner key)`; dht.py checks that binding before from_dict.
In an admitted run, `PeerRecord.cert` and `HistoryEntry.cert` carry the run owner's
certificate for that peer id (admission.py); readers check it (progress.py). Since the RSA
signature covers the whole record, the CURVE keys in it are bound to the admitted id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from peers.admission import Certificate
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


ROUND_PHASES = ("forming", "data", "voted", "stuck", "committed", "aborted")
MAX_LINEAGE = 16
MAX_COMMITS = 4


@dataclass(frozen=True)
class RoundState:
    """Where a peer is in the round state machine (rounds.py) for one attempt."""

    epoch: int
    step: int
    attempt: int
    rid: str  # "" while forming: the group id comes with BEGIN
    phase: str  # one of ROUND_PHASES

    def to_list(self) -> list:
        return [self.epoch, self.step, self.attempt, self.rid, self.phase]

    @classmethod
    def from_list(cls, v: object) -> RoundState:
        if not isinstance(v, (list, tuple)) or len(v) != 5:
            raise Malformed("field 'round': expected [epoch, step, attempt, rid, phase]")
        d = dict(zip(("epoch", "step", "attempt", "rid", "phase"), v, strict=True))
        phase = req_str(d, "phase", 16)
        if phase not in ROUND_PHASES:
            raise Malformed(f"field 'round': unknown phase {phase!r}")
        rid = req_str(d, "rid", 32)
        if rid:
            req_hex(d, "rid", 32)
        return cls(req_int(d, "epoch"), req_int(d, "step"), req_int(d, "attempt"), rid, phase)


@dataclass(frozen=True)
class PeerRecord:
    """A peer's heartbeat: liveness, progress and the state it holds (see progress.py).

    `step` is the number of outer steps in the peer's θ_g, i.e. the round it trains for;
    `lineage` lists its recent committed states as (step, params_hash, members of the round
    that produced it), newest last, so two peers can tell "behind" from "diverged". An
    empty lineage means the peer is still starting and holds no state yet."""

    peer_id: str
    endpoint: str
    curve_key: str
    arch_epoch: int
    step: int
    params_hash: str
    lineage: tuple[tuple[int, str, int], ...]
    tokens: int  # trained since this peer's last sync, i.e. its weight if the round ran now
    tokens_per_s: float
    eta_s: float  # until this peer is ready for the round (0 once it is)
    ready: bool
    late: bool  # started this round from downloaded state: stops when the others are ready
    round: RoundState | None  # the latest round attempt this peer took part in
    commits: tuple[str, ...]  # rids of the last few rounds this peer committed, newest last
    time: float  # wall clock of the heartbeat; stale records mean a dead peer
    state_endpoint: str | None = None
    state_curve_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    cert: Certificate | None = None  # the run owner's admission of peer_id (None: open run)

    def to_dict(self) -> dict:
        d = asdict(self)  # (turns cert into its dict too)
        d["lineage"] = [list(x) for x in self.lineage]
        d["round"] = self.round.to_list() if self.round is not None else None
        d["commits"] = list(self.commits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PeerRecord:
        raw = d.get("lineage")
        if not isinstance(raw, list) or len(raw) > MAX_LINEAGE:
            raise Malformed(f"field 'lineage': expected a list of <= {MAX_LINEAGE} entries")
        lineage = []
        for x in raw:
            if not isinstance(x, (list, tuple)) or len(x) != 3:
                raise Malformed("field 'lineage': entries are [step, params_hash, members]")
            e = {"s": x[0], "h": x[1], "m": x[2]}
            lineage.append((req_int(e, "s"), req_str(e, "h", 128), req_int(e, "m", hi=MAX_MEMBERS)))
        rnd = d.get("round")
        if not isinstance(d.get("ready"), bool) or not isinstance(d.get("late"), bool):
            raise Malformed("fields 'ready' and 'late' must be booleans")
        commits = d.get("commits")
        if not isinstance(commits, list) or len(commits) > MAX_COMMITS:
            raise Malformed(f"field 'commits': expected a list of <= {MAX_COMMITS} round ids")
        return cls(
            peer_id=req_hex(d, "peer_id", 64),
            endpoint=req_endpoint(d, "endpoint"),
            curve_key=req_curve_key(d, "curve_key"),
            arch_epoch=req_int(d, "arch_epoch"),
            step=req_int(d, "step"),
            params_hash=req_str(d, "params_hash", 128),
            lineage=tuple(lineage),
            tokens=req_int(d, "tokens"),
            tokens_per_s=req_float(d, "tokens_per_s"),
            eta_s=req_float(d, "eta_s"),
            ready=d["ready"],
            late=d["late"],
            round=None if rnd is None else RoundState.from_list(rnd),
            commits=tuple(req_hex({"c": c}, "c", 32) for c in commits),
            time=req_float(d, "time", hi=1e12),
            state_endpoint=_opt(d, "state_endpoint", req_endpoint),
            state_curve_key=_opt(d, "state_curve_key", req_curve_key),
            info=opt_info(d),
            cert=_opt_cert(d),
        )

    @property
    def claim(self) -> tuple[int, int, str]:
        """The state this peer holds: (arch epoch, step, θ_g hash)."""
        return (self.arch_epoch, self.step, self.params_hash)

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
    cert: Certificate | None = None  # its admission: the entry outlives its writer's record

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
            cert=_opt_cert(d),
        )


def _opt_cert(d: dict) -> Certificate | None:
    return None if d.get("cert") is None else Certificate.from_dict(d["cert"])
