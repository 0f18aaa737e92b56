"""A hostile peer: the real `diloco-grow peer`, with its network behaviour modified.

    python -m tests.adversarial.hostile_peer --attack poison@1,bad_reduce@1 [--fakes 6] \
        -- peer --run R --join MADDR ... (any `diloco-grow peer` arguments)

A modified client is exactly what an attacker runs: this process holds the swarm's real
θ_g, is counted in the records, announces, joins groups and leads them, and misbehaves only
where an attack says so. Each attack is a small function in attacks.py, named after the
item of issue #9 it reproduces; the classes below plug them into the app. `NAME@S` starts
it when our θ_g is at outer step S and keeps it up at every later step (a persistent
attacker); `NAME@S-T` stops after step T; a bare NAME means `@1`. One-shot attacks
(takeover, attempt_bomb, flood, none) fire once.

stdout carries one JSON line per event, for the tests:
    {"event": "ready", "peer_id": ..., "maddr": ...}
    {"event": "attack", "name": ..., "step": ..., "time": ..., ...}   # each time one fires
Everything else (the app's own lines, logs on stderr) is as `diloco-grow peer` prints it.
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import replace
from typing import Any

import torch

import diloco_grow.peer
import peers.rounds
import peers.swarm
from compression.codec import Encoded
from diloco_grow.train import InnerStats
from diloco_grow.worker import GlobalState
from peers.group import Group, RoundRequest
from peers.leader import Leader
from peers.membership import Matchmaker
from peers.messages import Member
from peers.records import Announcement
from peers.rounds import RoundRunner
from tests.adversarial import attacks as atk
from tests.adversarial.attacks import BOMB, GROWTH, HEAVY, PLAN, fired

# Where the attacks plug into the real peer: the classes the app builds, subclassed.


class HostileRunner(RoundRunner):
    def run(self, g: Group, local: Encoded, deadline: float) -> torch.Tensor:
        PLAN.step = g.step
        if PLAN.active("stall", g.step):
            atk.stall(self, g, local, deadline)
        if g.attempt == BOMB and "attempt_bomb" in PLAN.fired:
            atk.stall(self, g, local, deadline, mode="withhold")  # make attempt 2^20 fail
        if PLAN.active("poison", g.step):
            local = atk.poisoned(local)
            fired("poison", g.step, attempt=g.attempt, rid=g.rid)
        if PLAN.active("bad_reduce", g.step):
            fired("bad_reduce", g.step, attempt=g.attempt, rid=g.rid)
        return super().run(g, local, deadline)


class HostileLeader(Leader):
    def _tell(self, joined: dict[str, Announcement], kind: str, **body: object) -> None:
        step = self.mb.scope[1]
        if kind == "BEGIN" and PLAN.active("resync_all", step):
            atk.resync_all(self, joined, step)
        if kind == "BEGIN" and PLAN.active("split_votes", step):
            return atk.split_votes(self, joined, step, body)
        return super()._tell(joined, kind, **body)


class HostileMatchmaker(Matchmaker):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.leader = HostileLeader(
            self.cfg,
            self.mb,
            self.view,
            self.me,
            self.blame,
            self.vote_ok,
            self.announcements,
            self.check_state,
        )

    def form(self, req: RoundRequest, attempt: int, deadline: float, ready_at: float) -> Group:
        s = req.step
        if PLAN.active("heavy", s):  # item 1: the schema's cap on a weight
            req = replace(req, weight=HEAVY)
            fired("heavy", s, weight=HEAVY)
        if PLAN.active("fake_votes", s):
            req = replace(req, vote=GROWTH)  # we vote too: the fakes need one real vote less
        if PLAN.active("attempt_bomb", s) and attempt < BOMB:
            attempt = atk.attempt_bomb(s)
        elif PLAN.active("lead", s):
            attempt = atk.grind(self, req, attempt, lead=True)
        elif any(PLAN.active(n, s) for n in ("fake_votes", "evil_hash", "evict")):
            attempt = atk.grind(self, req, attempt, lead=False)  # the fakes JOIN an honest leader
        return super().form(req, attempt, deadline, ready_at)

    def _follow(
        self, req: RoundRequest, ann: Announcement, target: Member, deadline: float
    ) -> Group:
        s = req.step
        fakes: list[Any] = []
        if PLAN.active("fake_votes", s):
            fakes = atk.fake_votes(self, req, ann.attempt, target, deadline)
        elif PLAN.active("evil_hash", s):
            fakes = atk.evil_hash(self, req, ann.attempt, target, deadline)
        if PLAN.active("evict", s):
            atk.evict(self, req, ann.attempt, target)
        for f in fakes:
            f.joined.wait(2.0)
        if fakes or PLAN.active("evict", s):
            time.sleep(0.4)  # our own JOIN last: the leader is still collecting when theirs land
        return super()._follow(req, ann, target, deadline)


class HostileApp(diloco_grow.peer.PeerApp):
    forged: GlobalState | None = None
    idle = False

    def start(self) -> str:
        maddr = super().start()
        atk.emit("ready", peer_id=self.swarm.peer_id, maddr=maddr)
        return maddr

    def _inner_phase(self) -> InnerStats:
        s = self.g.step
        if PLAN.active("takeover", s) and atk.swarm_is_up(self):  # else: at a later step
            self.forged, self.idle = atk.takeover(self), True
        if PLAN.active("flood", s):
            PLAN.fired.add("flood")  # once: the thread reports when it starts
            threading.Thread(target=atk.flood, args=(self, s), name="flood", daemon=True).start()
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", required=True, help="NAME[@S[-T]][,...]; " + ", ".join(atk.ATTACKS))
    ap.add_argument("--fakes", type=int, default=6, help="invented members per attempt")
    ap.add_argument("--flood-count", type=int, default=40)
    ap.add_argument("--flood-mib", type=int, default=16)
    ap.add_argument("peer_args", nargs=argparse.REMAINDER, help="-- peer ...")
    a = ap.parse_args(argv)
    PLAN.steps = atk.parse_attacks(a.attack)
    PLAN.fakes, PLAN.flood_count, PLAN.flood_mib = a.fakes, a.flood_count, a.flood_mib
    # The modified client: the app's classes replaced where the app builds them.
    diloco_grow.peer.PeerApp = HostileApp
    peers.swarm.Matchmaker = HostileMatchmaker
    peers.swarm.RoundRunner = HostileRunner
    peers.rounds.get_codec = atk.get_codec
    from diloco_grow.cli import main as cli

    args = [x for x in a.peer_args if x != "--"]
    cli(args, prog_name="hostile-peer")


if __name__ == "__main__":
    main()
