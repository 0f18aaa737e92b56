"""A hostile peer: the real `diloco-grow peer`, with its network behaviour modified.

    python -m tests.adversarial.hostile_peer --attack poison@1,bad_reduce@1 [--fakes 6] \
        -- peer --run R --join MADDR ... (any `diloco-grow peer` arguments)

A modified client is exactly what an attacker runs: this process holds the swarm's real
θ_g, is counted in the records, announces, joins groups and leads them, and misbehaves only
where an attack says so. Each attack is a small function below, named after the item of
issue #9 it reproduces. `NAME@S` starts it when our θ_g is at outer step S and keeps it up
at every later step (a persistent attacker); `NAME@S-T` stops after step T; a bare NAME
means `@1`. One-shot attacks (takeover, attempt_bomb, flood) fire once.

stdout carries one JSON line per event, for the tests:
    {"event": "ready", "peer_id": ..., "maddr": ...}
    {"event": "attack", "name": ..., "step": ..., "time": ..., ...}   # each time one fires
Everything else (the app's own lines, logs on stderr) is as `diloco-grow peer` prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

import numpy as np
import torch

import diloco_grow.peer
import peers.rounds
import peers.swarm
from compression.codec import LAYOUTS, Encoded, shard_bounds
from compression.codec import get_codec as real_get_codec
from compression.wire import pack
from diloco_grow.growth import GrowthEvent
from diloco_grow.train import InnerStats
from diloco_grow.worker import GlobalState
from peers.errors import RoundAborted
from peers.group import Group, RoundRequest
from peers.leader import Leader
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


# ---- item 1: poisoned mean ------------------------------------------------------------------


def poisoned(enc: Encoded) -> Encoded:
    """Issue #9 item 1: every code at -128 and the largest scale the wire allows. It passes
    `unpack` and `check_shard` (right codec, block, shape; finite, in-range scales) and
    decodes to -FLT_MAX everywhere."""
    lay = LAYOUTS[enc.codec]
    if not lay.scaled:
        raise ValueError(f"poison needs a scaled codec, not {enc.codec}")
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


# ---- item 8: a member that stalls every attempt ---------------------------------------------


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
    while True:  # ignore everything; _next raises on the others' ABORT (or aborts at `until`)
        r._next(g, until)


class HostileRunner(RoundRunner):
    def run(self, g: Group, local: Encoded, deadline: float) -> torch.Tensor:
        PLAN.step = g.step
        if PLAN.active("stall", g.step):
            stall(self, g, local, deadline)
        if g.attempt == BOMB and "attempt_bomb" in PLAN.fired:
            stall(self, g, local, deadline, mode="withhold")  # make attempt 2^20 fail
        if PLAN.active("poison", g.step):
            local = poisoned(local)
            fired("poison", g.step, attempt=g.attempt, rid=g.rid)
        if PLAN.active("bad_reduce", g.step):
            fired("bad_reduce", g.step, attempt=g.attempt, rid=g.rid)
        return super().run(g, local, deadline)


# ---- item 5: a lying leader -----------------------------------------------------------------


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


class HostileLeader(Leader):
    def _tell(self, joined: dict[str, Announcement], kind: str, **body: object) -> None:
        step = self.mb.scope[1]
        if kind == "BEGIN" and PLAN.active("resync_all", step):
            resync_all(self, joined, step)
        if kind == "BEGIN" and PLAN.active("split_votes", step):
            return split_votes(self, joined, step, body)
        return super()._tell(joined, kind, **body)


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


# ---- items 3 and 6: forged announcements and JOINs ------------------------------------------


class HostileMatchmaker(Matchmaker):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.leader = HostileLeader(self.cfg, self.mb, self.view, self.me)

    def form(self, req: RoundRequest, attempt: int, deadline: float, ready_at: float) -> Group:
        s = req.step
        if PLAN.active("heavy", s):  # item 1: the schema's cap on a weight
            req = replace(req, weight=HEAVY)
            fired("heavy", s, weight=HEAVY)
        if PLAN.active("fake_votes", s):
            req = replace(req, vote=GROWTH)  # we vote too: the fakes need one real vote less
        if PLAN.active("attempt_bomb", s) and attempt < BOMB:
            attempt = attempt_bomb(s)
        elif PLAN.active("lead", s):
            attempt = grind(self, req, attempt, lead=True)
        elif any(PLAN.active(n, s) for n in ("fake_votes", "evil_hash", "evict")):
            attempt = grind(self, req, attempt, lead=False)  # the fakes JOIN an honest leader
        return super().form(req, attempt, deadline, ready_at)

    def _follow(
        self, req: RoundRequest, ann: Announcement, target: Member, deadline: float
    ) -> Group:
        s = req.step
        fakes: list[sybils.FakeMember] = []
        if PLAN.active("fake_votes", s):
            fakes = fake_votes(self, req, ann.attempt, target, deadline)
        elif PLAN.active("evil_hash", s):
            fakes = evil_hash(self, req, ann.attempt, target, deadline)
        if PLAN.active("evict", s):
            evict(self, req, ann.attempt, target)
        for f in fakes:
            f.joined.wait(2.0)
        if fakes or PLAN.active("evict", s):
            time.sleep(0.4)  # our own JOIN last: the leader is still collecting when theirs land
        return super()._follow(req, ann, target, deadline)


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


# ---- items 2 and 7: at a round boundary, from the app -----------------------------------------


class HostileApp(diloco_grow.peer.PeerApp):
    forged: GlobalState | None = None
    idle = False

    def start(self) -> str:
        maddr = super().start()
        emit("ready", peer_id=self.swarm.peer_id, maddr=maddr)
        return maddr

    def _inner_phase(self) -> InnerStats:
        s = self.g.step
        if PLAN.active("takeover", s):
            takeover(self)
        if PLAN.active("flood", s):
            PLAN.fired.add("flood")  # once: the thread reports when it starts
            threading.Thread(target=flood, args=(self, s), name="flood", daemon=True).start()
        if PLAN.active("none", s):
            fired("none", s)
        if self.idle:  # after a takeover: keep heartbeating and serving, never train again
            self.stopping.wait()
            return InnerStats(0.0, 0.0, 0, 0)
        return super()._inner_phase()

    def _provide_state(self) -> tuple[dict, bytes]:
        if self.forged is None:
            return super()._provide_state()
        from diloco_grow import checkpoint as ckpt

        g = self.forged
        tensors, meta = ckpt.global_tensors_meta(g)
        info = {"step": g.step, "arch_epoch": g.arch_epoch, "params_hash": g.hash()}
        return info, ckpt.pack_state(tensors, meta)


def takeover(app: HostileApp) -> None:
    """Issue #9 item 2: claim step 10^15 on the swarm's own line (our lineage is honest up
    to now, so every record is merely "behind" us) with 1000 members, and serve a θ_g of
    zeros at that step. Every honest round raises NeedResync, the resync downloads from
    the peer advertising the claim, and the only check is the sha256 we ourselves claim."""
    g = app.g
    forged = GlobalState(
        g.model_cfg,
        torch.zeros_like(g.theta),
        copy.deepcopy(g.outer),
        step=TAKEOVER_STEP,
        arch_epoch=g.arch_epoch,
        history=list(g.history),
    )
    app.forged, app.idle = forged, True
    lineage = list(app.swarm._lineage)  # the honest line we are on, so we stay compatible
    app.swarm.set_state(forged.arch_epoch, forged.step, forged.hash(), 1000, lineage)
    fired("takeover", g.step, claimed_step=TAKEOVER_STEP, params_hash=forged.hash())


def flood(app: HostileApp, step: int) -> None:
    """Issue #9 item 7: any CURVE key may connect, zmq queues 1000 messages per connection
    and there is no byte limit: PLAN.flood_count × PLAN.flood_mib MiB land in an honest
    peer's memory while it trains."""
    me = app.swarm.peer_id
    live = [r for r in app.swarm.view.live(fresh=True) if r.peer_id != me and r.lineage]
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", required=True, help="NAME[@S[-T]][,...]; " + ", ".join(ATTACKS))
    ap.add_argument("--fakes", type=int, default=6, help="invented members per attempt")
    ap.add_argument("--flood-count", type=int, default=40)
    ap.add_argument("--flood-mib", type=int, default=16)
    ap.add_argument("peer_args", nargs=argparse.REMAINDER, help="-- peer ...")
    a = ap.parse_args(argv)
    PLAN.steps = parse_attacks(a.attack)
    PLAN.fakes, PLAN.flood_count, PLAN.flood_mib = a.fakes, a.flood_count, a.flood_mib
    # The modified client: the app's classes replaced where the app builds them.
    diloco_grow.peer.PeerApp = HostileApp
    peers.swarm.Matchmaker = HostileMatchmaker
    peers.swarm.RoundRunner = HostileRunner
    peers.rounds.get_codec = get_codec
    from diloco_grow.cli import main as cli

    args = [x for x in a.peer_args if x != "--"]
    cli(args, prog_name="hostile-peer")


if __name__ == "__main__":
    main()
