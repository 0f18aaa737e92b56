"""The attacks of the hostile peer (hostile_peer.py), one small function per item of issue #9.

Each takes the real object it subverts (the round runner, the leader, the matchmaker, the
app) and reports itself with `fired`, which prints the JSON line the tests wait for. Which
attacks run at which outer steps is in `PLAN`, set once by hostile_peer.main.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch

from compression.codec import LAYOUTS, Encoded, shard_bounds
from compression.codec import get_codec as real_get_codec
from compression.wire import pack
from diloco_grow.growth import GrowthEvent
from diloco_grow.peer import PeerApp
from diloco_grow.worker import GlobalState
from peers.errors import RoundAborted
from peers.group import Group, RoundRequest
from peers.leader import Leader
from peers.lineage import members_at
from peers.membership import Matchmaker
from peers.messages import Member
from peers.records import Announcement
from peers.rounds import RoundRunner
from tests.adversarial import sybils

# name -> the item of issue #9 it reproduces ("none" is the control: it only reports)
ATTACKS = {
    "poison": 1,
    "heavy": 1,
    "bad_reduce": 1,
    "takeover": 2,
    "fake_votes": 3,
    "evil_hash": 3,
    "evict": 3,
    "lead": 5,
    "split_votes": 5,
    "resync_all": 5,
    "attempt_bomb": 6,
    "flood": 7,
    "stall": 8,
    "none": 0,
}
ONE_SHOT = frozenset({"takeover", "attempt_bomb", "flood", "none"})
FLT_MAX = float(np.finfo(np.float32).max)
HEAVY = 1e30  # the largest weight the announcement schema accepts
BOMB = 1 << 20  # the largest attempt the schemas accept; the next one is unreadable
TAKEOVER_STEP = 10**15
# Growth nobody honest voted for. The fakes voted experts x1000000, which would
# make every peer on this shared test machine try to allocate hundreds of GiB; x2 shows
# the same thing (an architecture change the honest peers never asked for) safely.
GROWTH = GrowthEvent("experts", 2).to_dict()


@dataclass
class Plan:
    """Which attacks run at which outer steps, and what has fired (shared by the patches)."""

    steps: dict[str, tuple[int, int]]
    fakes: int = 6
    flood_count: int = 40
    flood_mib: int = 16
    fired: set[str] = field(default_factory=set)
    step: int = -1  # θ_g step of the round in progress (for the codec patch)

    def active(self, name: str, step: int) -> bool:
        lo, hi = self.steps.get(name, (1, -1))
        return lo <= step <= hi and not (name in ONE_SHOT and name in self.fired)


PLAN = Plan({})


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields, "time": time.time()}), flush=True)


def fired(name: str, step: int, **fields: object) -> None:
    PLAN.fired.add(name)
    emit("attack", name=name, step=step, **fields)


def parse_attacks(spec: str) -> dict[str, tuple[int, int]]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, at = item.partition("@")
        if name not in ATTACKS:
            raise SystemExit(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
        lo, _, hi = (at or "1").partition("-")
        out[name] = (int(lo), int(hi) if hi else 1 << 62)
    return out


# ---- item 1: poisoned mean ----------------------------------------------------------


def poisoned(enc: Encoded) -> Encoded:
    """Issue #9 item 1: every code at -128 and the largest scale the wire allows. It passes
    `unpack` and `check_shard` (right codec, block, shape; finite, in-range scales) and
    decodes to -FLT_MAX everywhere."""
    lay = LAYOUTS[enc.codec]
    if not lay.scaled:
        raise ValueError(f"poison needs a scaled codec, not {enc.codec}")
    if enc.codec.startswith("topk"):  # 0x80 bytes repeat a position with two codes: refused
        worst = real_get_codec(enc.codec, enc.block_size).encode(
            torch.full((enc.numel,), -FLT_MAX)
        )
        return Encoded(enc.codec, enc.shape, enc.dtype, enc.block_size, worst.payload,
                       worst.scales)
    payload = torch.full_like(enc.payload, 0x80)
    scales = torch.full_like(enc.scales, FLT_MAX / lay.code_max)
    return Encoded(enc.codec, enc.shape, enc.dtype, enc.block_size, payload, scales)


class LyingCodec:
    """Issue #9 item 1, the reducer's half: a reducer encodes the mean of its shard once and
    everyone adopts those bytes, so it fully controls the values of its own shard."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def encode(self, x: torch.Tensor) -> Encoded:
        return poisoned(self.real.encode(x))

    def decode(self, enc: Encoded, device: Any = "cpu") -> torch.Tensor:
        return self.real.decode(enc, device)


def get_codec(name: str, block_size: int | None = None) -> Any:
    # rounds.py calls encode exactly once per round: for the shard it reduces.
    real = real_get_codec(name, block_size)
    return LyingCodec(real) if PLAN.active("bad_reduce", PLAN.step) else real


# ---- item 8: a member that stalls every attempt -------------------------------------


def stall(r: RoundRunner, g: Group, local: Encoded, deadline: float, mode: str = "") -> NoReturn:
    """Issue #9 item 8: withhold our PARTs, ABORT at once, or send a shard of the wrong
    size, in turn by attempt. The members abort and retry, and the retry waits for us and
    admits us again, so one member can stall a step until the round deadline."""
    mode = mode or ("withhold", "abort", "bad_shard")[g.attempt % 3]
    r.mb.set_scope(g.epoch, g.step, g.attempt)
    r.on_phase(g, "data")
    fired("stall", g.step, mode=mode, attempt=g.attempt, rid=g.rid)
    if mode == "abort":
        r._abort(g, "hostile: aborting every attempt")
    if mode == "bad_shard":
        ids = [m.peer_id for m in g.members]
        bounds = shard_bounds(local.numel, local.align, len(ids))
        for k, m in enumerate(g.members):
            lo, hi = bounds[k]
            if m.peer_id != r.me and hi - lo > local.align:  # one block short: wrong shape
                r._send(m, "PART", g, payload=pack(local.slice(lo, hi - local.align)), shard=k)
    until = min(deadline, time.monotonic() + 3 * r.phase_timeout_s)
    while True:  # ignore everything; _next raises on the others' ABORT
        msg, _ = r._next(g, until)
        if msg is None:
            r._abort(g, "hostile: gave up")


# ---- item 5: a lying leader ---------------------------------------------------------


def grind(mm: Matchmaker, req: RoundRequest, attempt: int, lead: bool) -> int:
    """The leader of an attempt is a hash of (run, epoch, step, attempt, id), and a higher
    announced attempt pulls every peer of the step to it (F3). So a peer picks the attempts
    it leads (or never leads) by announcing the right one."""
    me = mm.me.peer_id
    live = mm.view.live(fresh=True)
    ids = {r.peer_id for r in live if r.lineage and req.step - 1 <= r.step <= req.step} | {me}
    for a in range(attempt, attempt + 256):
        leader = min(ids, key=lambda pid: mm.rank(req, a, pid))
        if (leader == me) == lead:
            return a
    return attempt


def split_votes(ld: Leader, joined: dict[str, Announcement], step: int, body: dict) -> None:
    """Issue #9 item 5: followers check only their own entry of BEGIN, and DONE digests
    cover only the reduced bytes. So every other follower gets a member list in which all
    the others voted for growth: they grow, the rest do not, and the round still commits."""
    followers = sorted(pid for pid in joined if pid != ld.me.peer_id)
    lied_to = followers[::2]
    for pid in followers:
        members = body["members"]
        if pid in lied_to:
            members = [m if m["peer_id"] == pid else {**m, "vote": GROWTH} for m in members]
        ld._reply_to(joined[pid], "BEGIN", **{**body, "members": members})
    fired("split_votes", step, lied_to=lied_to, told_truth=followers[1::2])


def resync_all(ld: Leader, joined: dict[str, Announcement], step: int) -> NoReturn:
    """Issue #9 item 5: a leader may send RESYNC to anyone; the follower then downloads
    state from the leader. Leading every attempt (grind), it stalls the step for good."""
    victims = sorted(pid for pid in joined if pid != ld.me.peer_id)
    for pid in victims:
        ld._reply_to(
            joined[pid], "RESYNC", params_hash="0" * 16, reason="θ_g hash differs (hostile)"
        )
    fired("resync_all", step, victims=victims, attempt=ld.mb.scope[2])
    raise RoundAborted("hostile leader told everyone to resync", next_attempt=ld.mb.scope[2] + 1)


# ---- items 3 and 6: forged announcements and JOINs ----------------------------------


def attempt_bomb(step: int) -> int:
    """Issue #9 item 6: announce attempt 2^20, the largest the schemas accept; every peer of
    the step moves to it (F3). We then make that attempt fail (withhold our part), and
    attempt 2^20 + 1 is unreadable everywhere: announcements are dropped as invalid, JOINs
    as malformed, and each peer sees only itself."""
    fired("attempt_bomb", step, attempt=BOMB)
    return BOMB


def fake_votes(
    mm: Matchmaker, req: RoundRequest, attempt: int, leader: Member, deadline: float
) -> list[sybils.FakeMember]:
    """Issue #9 item 3: JOINs from invented ids, each with its own CURVE key, are admitted
    when the leader saw no announcement for that id. With our vote, PLAN.fakes of them
    carry a growth nobody honest voted for through the 2/3 quorum, and they average a zero
    Δ so the round commits."""
    plan = sybils.FakeJoin(req, attempt, leader, GROWTH, req.params_hash, take_part=True)
    fakes = [sybils.FakeMember(mm.cfg, plan, deadline) for _ in range(PLAN.fakes)]
    for f in fakes:
        f.start()
    fired(
        "fake_votes",
        req.step,
        attempt=attempt,
        leader=leader.peer_id,
        fakes=[f.peer_id for f in fakes],
    )
    return fakes


def evil_hash(
    mm: Matchmaker, req: RoundRequest, attempt: int, leader: Member, deadline: float
) -> list[sybils.FakeMember]:
    """Issue #9 item 3: fakes claiming θ_g hash "EVIL" outnumber the real joiners, so the
    honest leader finds itself in the minority, tells everyone to RETRY and resyncs. Done
    at every attempt, the step never commits."""
    plan = sybils.FakeJoin(req, attempt, leader, None, "EVIL", take_part=False)
    fakes = [sybils.FakeMember(mm.cfg, plan, deadline) for _ in range(PLAN.fakes)]
    for f in fakes:
        f.start()
    fired("evil_hash", req.step, attempt=attempt, leader=leader.peer_id, fakes=len(fakes))
    return fakes


def evict(mm: Matchmaker, req: RoundRequest, attempt: int, leader: Member) -> None:
    """Issue #9 item 3: a JOIN that reuses an honest peer's id replaces its JOIN at the
    leader, which then drops the id for not matching its announcement: the honest peer is
    evicted from the round."""
    anns = mm.view.announcements(req.epoch, req.step)
    me = mm.me.peer_id
    victims = sorted(
        p for p, a in anns.items() if a.attempt == attempt and p not in (me, leader.peer_id)
    )
    if victims:
        sybils.impersonate(mm.cfg, req, attempt, leader, victims, delays=(0.05, 0.2, 0.35))
        fired("evict", req.step, attempt=attempt, leader=leader.peer_id, victims=victims)


# ---- items 2 and 7: at a round boundary, from the app -------------------------------


def swarm_is_up(app: PeerApp, honest: int = 3) -> bool:
    """Do `honest` other live peers hold a state some round produced? The takeover is an
    attack on a swarm of three honest peers. On a loaded machine two of them may still be
    starting when our θ_g reaches the attack's step, and in a swarm of two (one honest
    peer and us) the records cannot tell a forger from an honest peer that is ahead
    (docs/design.md, "The majority line"): we would be half the swarm. So the attack waits
    for the swarm it attacks, until every honest peer has committed or adopted a round's
    state: their records have then been out for a while, also in the others' views."""
    me = app.swarm.peer_id
    others = [
        r
        for r in app.swarm.view.live(fresh=True)
        if r.peer_id != me and members_at(r.lineage, r.step) > 0
    ]
    return len(others) >= honest


def takeover(app: PeerApp) -> GlobalState:
    """Issue #9 item 2: claim step 10^15 on the swarm's own line (our lineage is honest up
    to now, so every record is merely "behind" us) with 1000 members, and serve a θ_g of
    zeros at that step (returned: the app serves it from now on). Every honest round raises
    NeedResync, the resync downloads from the peer advertising the claim, and the only
    check is the sha256 we ourselves claim."""
    g = app.g
    forged = GlobalState(
        g.model_cfg,
        torch.zeros_like(g.theta),
        copy.deepcopy(g.outer),
        step=TAKEOVER_STEP,
        arch_epoch=g.arch_epoch,
        history=list(g.history),
    )
    lineage = list(app.swarm._lineage)  # the honest line we are on, so we stay compatible
    app.swarm.set_state(forged.arch_epoch, forged.step, forged.hash(), 1000, lineage)
    fired("takeover", g.step, claimed_step=TAKEOVER_STEP, params_hash=forged.hash())
    return forged


def flood(app: PeerApp, step: int) -> None:
    """Issue #9 item 7: any CURVE key may connect, zmq queues 1000 messages per connection
    and there is no byte limit: PLAN.flood_count × PLAN.flood_mib MiB land in an honest
    peer's memory while it trains."""
    me = app.swarm.peer_id
    live: list = []
    until = time.monotonic() + 60  # a busy machine's DHT read may come back empty at first
    while not live and time.monotonic() < until:
        live = [r for r in app.swarm.view.live(fresh=True) if r.peer_id != me and r.lineage]
        if not live:
            time.sleep(0.5)
    if not live:
        emit("flood_sent", target=None, seconds=0.0)
        return
    target = min(live, key=lambda r: r.peer_id)
    fired("flood", step, target=target.peer_id, count=PLAN.flood_count, mib=PLAN.flood_mib)
    seconds = sybils.flood(
        app.cfg.swarm.run,
        app.g.arch_epoch,
        step,
        target.endpoint,
        target.curve_key,
        PLAN.flood_count,
        PLAN.flood_mib,
    )
    emit("flood_sent", target=target.peer_id, seconds=round(seconds, 2))
