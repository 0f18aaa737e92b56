"""The leader's half of matchmaking: collect JOINs, freeze the group, agree on θ_g, BEGIN.

The leader (lowest `leader_rank` among the announcers of an attempt) waits for the announcers
it saw, for at most one more matchmaking grace. If someone is missing it looks at the DHT
again: a lower rank that appeared meanwhile takes over (REDIRECT), and a group already
averaging our step without us means we wait for its outcome instead of forming a rival group.
A JOIN counts only from a live peer whose signed heartbeat record has the JOIN's endpoint
and CURVE key, so nobody can join under an id it does not run, or reuse another peer's id.
A JOIN with weight 0 (nothing trained), an invalid growth vote, or from a peer that sits out
this step (blame.py) is rejected. Joiners whose θ_g hash is not the majority's get RESYNC;
if the leader itself is in the minority it tells everyone to RETRY without it and resyncs.
Everyone else gets BEGIN with the member list (endpoints, CURVE keys, weights and votes);
every member checks each entry against the announcements before using it (membership.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable

from peers.blame import Blame
from peers.config import SwarmConfig
from peers.consensus import majority_state
from peers.errors import RoundAborted
from peers.group import Group, RoundRequest
from peers.mailbox import Mailbox
from peers.messages import Member, Msg
from peers.progress import SwarmView, at_step
from peers.records import Announcement, PeerRecord

log = logging.getLogger(__name__)


class Leader:
    def __init__(
        self,
        cfg: SwarmConfig,
        mb: Mailbox,
        view: SwarmView,
        me: Member,
        blame: Blame,
        vote_ok: Callable[[dict | None], bool],
        announcements: Callable[..., dict[str, Announcement]],
        check_state: Callable[[bool], None],
    ) -> None:
        self.cfg, self.mb, self.view, self.me = cfg, mb, view, me
        self.check_state = check_state
        # announcements(req, mine): the signed announcements that count for our step
        # (Matchmaker.announcements: no sit-outs, no attempt bombs).
        self.blame, self.vote_ok, self.announcements = blame, vote_ok, announcements

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
        # A JOIN counts only from a peer whose signed heartbeat record names the same
        # endpoint and CURVE key (zmq authenticated that key; a record a beat stale under
        # load still proves who it is): ids nobody runs, or a JOIN
        # reusing another peer's id, never get into the group. Its weight and vote are its
        # own word, as in its announcement; every member checks its own entry in BEGIN.
        asked: dict[tuple[str, str], Announcement] = {}  # (id, CURVE key) -> its JOIN
        joined: dict[str, Announcement] = {self.me.peer_id: ann}
        grace = min(deadline, time.monotonic() + self.cfg.matchmaking_s)
        expected = {pid for pid, a in anns.items() if a.attempt == attempt}
        while not expected <= set(joined) and time.monotonic() < grace:
            msg = self.mb.get(
                min(grace, time.monotonic() + 0.2),
                lambda m: m.kind == "JOIN" and (m.epoch, m.step) == (req.epoch, req.step),
            )
            if msg is not None:
                self._on_join(msg, req, asked, joined)
                joined.update(_known(asked, self.view.records()))
            else:  # announcements that became readable since: their JOINs are on the way
                anns = self.announcements(req, ann)
                expected |= {pid for pid, a in anns.items() if a.attempt == attempt}
        if {pid for pid, _ in asked} - set(joined):
            joined.update(_known(asked, self.view.refresh()))  # a newcomer's record
            for pid in sorted({pid for pid, _ in asked} - set(joined)):
                log.warning("JOIN from %s: no live signed record with its key; ignored", pid)
        for pid in list(joined):  # nor may it contradict its signed announcement
            seen = anns.get(pid)
            if seen is not None and seen.curve_key != joined[pid].curve_key:
                log.warning("JOIN from %s does not match its DHT announcement; ignored", pid)
                del joined[pid]
        if not (complete and expected <= set(joined)):
            # Someone is missing: look again. A lower rank may have appeared (then it leads),
            # or a group may be averaging our step without us (then wait for its outcome).
            anns = self.announcements(req, ann)
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
        if len(joined) > self.cfg.max_group:
            # The largest group we run: the data plane keeps one connection per member.
            keep = sorted(joined, key=lambda pid: rank(req, attempt, pid))[: self.cfg.max_group]
            keep = {self.me.peer_id, *keep[: self.cfg.max_group - 1]}
            for pid in [pid for pid in joined if pid not in keep]:
                self._reply_to(joined.pop(pid), "RETRY", attempt=attempt + 1)
        states = {pid: (a.params_hash, a.numel) for pid, a in joined.items()}
        majority = majority_state(states, self.me.peer_id)
        if states[self.me.peer_id] != majority:
            self._tell(joined, "RETRY", attempt=attempt + 1)
            # The joiners are not the swarm: resync only if the majority line of the
            # signed records says so too (check_state raises NeedResync with its source).
            self.check_state(True)
            raise RoundAborted(
                f"the joiners' majority holds θ_g {majority[0]}, not the swarm's line",
                next_attempt=attempt + 1,
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

    def _on_join(
        self,
        msg: Msg,
        req: RoundRequest,
        asked: dict[tuple[str, str], Announcement],
        joined: dict[str, Announcement],
    ) -> None:
        a: Announcement = msg.body["ann"]
        attempt = self.mb.scope[2]
        if a.peer_id in self.blame.sitting_out(req.epoch, req.step):
            self.reply(msg, "REJECT", reason="you sit out this step (blamed for an abort)")
        elif msg.attempt < attempt:
            self.reply(msg, "RETRY", attempt=attempt)
        elif msg.attempt > attempt:
            # The mailbox already dropped attempt bombs; a modest lead is honest (it
            # retried while we were training), if it comes from a live peer.
            if _known({(a.peer_id, a.curve_key): a}, self.view.records()):
                self._tell(joined, "RETRY", attempt=msg.attempt)
                raise RoundAborted(
                    f"{a.peer_id} is at attempt {msg.attempt}", next_attempt=msg.attempt
                )
        elif (a.codec, a.block_size) != (req.codec, req.block_size):
            self.reply(msg, "REJECT", reason=f"codec {req.codec}/{req.block_size} required")
        elif a.weight <= 0:
            self.reply(msg, "REJECT", reason="weight 0: train before joining a round")
        elif not self.vote_ok(a.vote):
            self.reply(msg, "REJECT", reason="invalid growth vote")
        elif a.peer_id != self.me.peer_id:
            # Keyed by id *and* key: a JOIN reusing an honest peer's id must not replace
            # the honest JOIN (only the one whose key matches the id's record counts).
            asked[(a.peer_id, a.curve_key)] = a

    def _others_ready(self, req: RoundRequest, ann: Announcement) -> bool:
        anns = self.announcements(req, ann)
        out = self.blame.sitting_out(req.epoch, req.step)
        others = at_step(self.view.live(fresh=True), self.me.peer_id, req.epoch, req.step)
        return any((r.ready or r.peer_id in anns) and r.peer_id not in out for r in others)

    def busy_without_us(self, req: RoundRequest, attempt: int, joined: set[str]) -> bool:
        """Are two live peers outside `joined` in the data phase of one round of our step,
        at our attempt or later? Earlier attempts are ignored: they belong to aborted
        rounds. Two, because a group of one never forms while we are ready, and one record
        claiming a round must not hold the swarm back."""
        skip = joined | {self.me.peer_id} | self.blame.sitting_out(req.epoch, req.step)
        rids = Counter(
            r.round.rid
            for r in self.view.live(fresh=True)
            if r.round is not None
            and (r.round.epoch, r.round.step) == (req.epoch, req.step)
            and r.round.attempt >= attempt
            and r.round.phase in ("data", "voted", "stuck")
            and r.peer_id not in skip
        )
        return any(n >= 2 for n in rids.values())

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


def _known(asked: dict[tuple[str, str], Announcement], records: list[PeerRecord]) -> dict:
    """The JOINs whose sender has a signed record with the same endpoint and key."""
    recs = {r.peer_id: r for r in records}
    return {
        pid: a
        for (pid, _), a in asked.items()
        if pid in recs and (recs[pid].endpoint, recs[pid].curve_key) == (a.endpoint, a.curve_key)
    }
