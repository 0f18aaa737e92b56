"""The leader's half of matchmaking: collect JOINs, freeze the group, agree on θ_g, BEGIN.

The leader (lowest `leader_rank` among the announcers of an attempt) waits for the announcers
it saw, for at most one more matchmaking grace. If someone is missing it looks at the DHT
again: a lower rank that appeared meanwhile takes over (REDIRECT), and a group already
averaging our step without us means we wait for its outcome instead of forming a rival group.
A JOIN with weight 0 (nothing trained) is rejected: a round never commits an empty mean. Joiners
whose θ_g hash is not the majority's get RESYNC; if the leader itself is in the minority it
tells everyone to RETRY without it and resyncs. Everyone else gets BEGIN with the member list
(endpoints, CURVE keys, weights and votes), which every member then uses verbatim.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

from peers.config import SwarmConfig
from peers.consensus import majority_state
from peers.errors import NeedResync, RoundAborted
from peers.group import Group, RoundRequest
from peers.mailbox import Mailbox
from peers.messages import Member, Msg
from peers.progress import SwarmView, at_step
from peers.records import Announcement

log = logging.getLogger(__name__)


class Leader:
    def __init__(self, cfg: SwarmConfig, mb: Mailbox, view: SwarmView, me: Member) -> None:
        self.cfg, self.mb, self.view, self.me = cfg, mb, view, me

    def lead(
        self,
        req: RoundRequest,
        ann: Announcement,
        anns: dict[str, Announcement],
        deadline: float,
        complete: bool,
        rank: Callable[[RoundRequest, int, str], bytes],
    ) -> Group | Member | None:
        """The frozen group; or a lower-rank leader to follow instead; or None if a group is
        already averaging our step without us (the caller then waits for its outcome)."""
        attempt = ann.attempt
        joined: dict[str, Announcement] = {self.me.peer_id: ann}
        grace = min(deadline, time.monotonic() + self.cfg.matchmaking_s)
        expected = {pid for pid, a in anns.items() if a.attempt == attempt}
        while not expected <= set(joined) and time.monotonic() < grace:
            msg = self.mb.get(
                min(grace, time.monotonic() + 0.2),
                lambda m: m.kind == "JOIN" and (m.epoch, m.step) == (req.epoch, req.step),
            )
            if msg is not None:
                self._on_join(msg, req, joined)
            else:  # announcements that became readable since: their JOINs are on the way
                fresh = self.view.announcements(req.epoch, req.step, ann)
                expected |= {pid for pid, a in fresh.items() if a.attempt == attempt}
        if not (complete and expected <= set(joined)):
            # Someone is missing: look again. A lower rank may have appeared (then it leads),
            # or a group may be averaging our step without us (then wait for its outcome).
            anns = self.view.announcements(req.epoch, req.step, ann)
            mine = rank(req, attempt, self.me.peer_id)
            ours = (pid for pid, a in anns.items() if a.attempt == attempt)
            ranks = {pid: rank(req, attempt, pid) for pid in ours}
            lower = sorted((pid for pid, r in ranks.items() if r < mine), key=ranks.__getitem__)
            if lower:
                a = anns[lower[0]]
                new = Member(a.peer_id, a.endpoint, a.curve_key, 0.0)
                self._tell(joined, "REDIRECT", leader=new.to_dict())
                return new
            if self.busy_without_us(req, attempt, set(joined)):
                self._tell(joined, "RETRY", attempt=attempt + 1)
                return None
        for pid in list(joined):  # a JOIN must not contradict its signed DHT announcement
            seen = anns.get(pid)
            if seen is not None and seen.curve_key != joined[pid].curve_key:
                log.warning("JOIN from %s does not match its DHT announcement; ignored", pid)
                del joined[pid]
        states = {pid: (a.params_hash, a.numel) for pid, a in joined.items()}
        majority = majority_state(states, self.me.peer_id)
        if states[self.me.peer_id] != majority:
            holder = min(pid for pid, s in states.items() if s == majority)
            self._tell(joined, "RETRY", attempt=attempt + 1)
            raise NeedResync(
                f"the majority of joiners hold θ_g {majority[0]}, not ours",
                self.view.public_of(holder),
            )
        for pid in [pid for pid, s in states.items() if s != majority]:
            self._reply_to(
                joined.pop(pid),
                "RESYNC",
                params_hash=majority[0],
                reason="θ_g hash differs from the group majority",
            )
        if len(joined) == 1 and self._others_ready(req, ann):
            # Alone, while another live peer is ready for this very step: two groups of one
            # would commit two θ_g. Only a peer alone in the swarm commits alone.
            raise RoundAborted(
                "alone in the group while other live peers are ready for this step",
                next_attempt=attempt + 1,
            )
        if len(joined) < self.cfg.min_peers:
            self._tell(joined, "RETRY", attempt=attempt + 1)
            raise RoundAborted(
                f"only {len(joined)} of min_peers={self.cfg.min_peers} joined",
                next_attempt=attempt + 1,
            )
        members = tuple(
            Member(a.peer_id, a.endpoint, a.curve_key, a.weight, a.vote)
            for _, a in sorted(joined.items())
        )
        rid = secrets.token_hex(8)
        self._tell(
            joined,
            "BEGIN",
            rid=rid,
            members=[m.to_dict() for m in members],
            params_hash=req.params_hash,
            numel=req.numel,
            codec=req.codec,
            block_size=req.block_size,
        )
        me = next(m for m in members if m.peer_id == self.me.peer_id)
        return Group(rid, req.epoch, req.step, attempt, me, members, req.params_hash)

    def _on_join(self, msg: Msg, req: RoundRequest, joined: dict[str, Announcement]) -> None:
        a: Announcement = msg.body["ann"]
        attempt = self.mb.scope[2]
        if msg.attempt < attempt:
            self.reply(msg, "RETRY", attempt=attempt)
        elif msg.attempt > attempt:
            self._tell(joined, "RETRY", attempt=msg.attempt)
            raise RoundAborted(f"{a.peer_id} is at attempt {msg.attempt}", next_attempt=msg.attempt)
        elif (a.codec, a.block_size) != (req.codec, req.block_size):
            self.reply(msg, "REJECT", reason=f"codec {req.codec}/{req.block_size} required")
        elif a.weight <= 0:
            self.reply(msg, "REJECT", reason="weight 0: train before joining a round")
        elif a.peer_id != self.me.peer_id:
            joined[a.peer_id] = a

    def _others_ready(self, req: RoundRequest, ann: Announcement) -> bool:
        anns = self.view.announcements(req.epoch, req.step, ann)
        others = at_step(self.view.live(fresh=True), self.me.peer_id, req.epoch, req.step)
        return any(r.ready or r.peer_id in anns for r in others)

    def busy_without_us(self, req: RoundRequest, attempt: int, joined: set[str]) -> bool:
        """Is a live peer outside `joined` in the data phase of our step, at our attempt or
        later? Earlier attempts are ignored: they belong to aborted rounds."""
        return any(
            r.round is not None
            and (r.round.epoch, r.round.step) == (req.epoch, req.step)
            and r.round.attempt >= attempt
            and r.round.phase in ("data", "voted", "stuck")
            and r.peer_id not in joined
            and r.peer_id != self.me.peer_id
            for r in self.view.live(fresh=True)
        )

    def reply(self, msg: Msg, kind: str, **body: object) -> None:
        """Answer a JOIN (the only message that carries an address to answer to)."""
        a = msg.body.get("ann")
        if a is not None:  # only JOINs carry an address we can answer to
            body.setdefault("attempt", msg.attempt)  # so the joiner knows it is current
            self._reply_to(a, kind, **body)

    def _reply_to(
        self, a: Announcement, kind: str, attempt: int | None = None, **body: object
    ) -> None:
        self.mb.send(a.endpoint, a.curve_key, kind, attempt=attempt, **body)

    def _tell(self, joined: dict[str, Announcement], kind: str, **body: object) -> None:
        for pid, a in joined.items():
            if pid != self.me.peer_id:
                self._reply_to(a, kind, **body)
