"""Matchmaking: from "I am ready for step s" to a frozen group that every member agrees on.

One attempt (see docs/design.md, "The round protocol"):
1. Announce (epoch, step, attempt, endpoint, keys, weight, params_hash, vote) in the DHT.
2. Wait until every live peer of our step has announced: peers still training are waited
   for until their own reported ETA (progress.wait_deadline), dead ones (stale heartbeat)
   not at all. Meanwhile, if the swarm's majority line moves past our state, stop
   (NeedResync: we missed a round or diverged).
3. Read the announcements. If anyone is at a higher attempt, move there. The leader is the
   announcer of our attempt with the lowest `leader_rank` (a hash, not an id). Followers
   JOIN it; a non-leader that gets a JOIN answers REDIRECT, strictly towards lower ranks, so
   redirects terminate.
4. The leader (leader.py) waits for the announcers it saw (up to `matchmaking_s`), freezes
   the group, sends RESYNC to members whose θ_g hash is not the majority's and BEGIN to the
   rest. A follower accepts exactly one BEGIN: from the leader it joined, for its attempt.

Anything unexpected ends the attempt with RoundAborted(next_attempt); the Swarm retries
until its deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NoReturn

from peers.blame import Blame, Offence
from peers.config import SwarmConfig
from peers.consensus import (
    BOMB_MARGIN,
    MAX_ATTEMPT_LEAP,
    attempt_ceiling,
    leader_rank,
    vote_hash,
)
from peers.dht import SwarmDHT
from peers.errors import RoundAborted, RoundFailed
from peers.group import Group, RoundRequest
from peers.leader import Leader
from peers.mailbox import Mailbox
from peers.messages import MAX_CULPRITS, Member, Msg
from peers.progress import SwarmView, at_step, finishing, finishing_deadline, wait_deadline
from peers.records import Announcement

log = logging.getLogger(__name__)
REPLY_KINDS = frozenset({"BEGIN", "REDIRECT", "RETRY", "RESYNC", "REJECT", "FORMED"})


class Matchmaker:
    def __init__(
        self,
        cfg: SwarmConfig,
        dht: SwarmDHT,
        mb: Mailbox,
        me: Member,
        view: SwarmView,
        check_state: Callable[[bool], None],
        blame: Blame,
        vote_ok: Callable[[dict | None], bool],
    ) -> None:
        self.cfg, self.dht, self.mb, self.me, self.view = cfg, dht, mb, me, view
        # check_state(fresh) raises NeedResync when the majority line has left our state.
        self.check_state = check_state
        self.blame, self.vote_ok = blame, vote_ok
        self.leader = Leader(cfg, mb, view, me, blame, vote_ok, self.announcements, check_state)

    def announcements(
        self, req: RoundRequest, mine: Announcement | None = None, bounded: bool = True
    ) -> dict[str, Announcement]:
        """The announcements that count for our step: not from peers sitting it out
        (blame.py), not at an attempt far beyond ours or the swarm's (an attempt bomb; with
        bounded=False those are kept: such a peer did announce, we just do not follow it)."""
        anns = self.view.announcements(req.epoch, req.step, mine)
        out = self.blame.sitting_out(req.epoch, req.step)
        anns = {pid: a for pid, a in anns.items() if pid not in out}
        return anns if not bounded else self._below_ceiling(anns)

    def _below_ceiling(self, anns: dict[str, Announcement]) -> dict[str, Announcement]:
        ceiling = attempt_ceiling(self.mb.scope[2], [a.attempt for a in anns.values()])
        epoch, step, _ = self.mb.scope
        for pid, a in anns.items():
            if a.attempt > ceiling + BOMB_MARGIN:
                what = f"announced attempt {a.attempt}, the swarm is below {ceiling}"
                self.blame.offend(Offence(pid, epoch, step, what, own=True, ban=True))
        return {pid: a for pid, a in anns.items() if a.attempt <= ceiling}

    def rank(self, req: RoundRequest, attempt: int, peer_id: str) -> bytes:
        return leader_rank(self.cfg.run, req.epoch, req.step, attempt, peer_id)

    def form(self, req: RoundRequest, attempt: int, deadline: float, ready_at: float) -> Group:
        """One matchmaking attempt; returns the group or raises NeedResync / RoundAborted.

        `ready_at` (wall clock) is when we became ready: the wait for stragglers is capped
        at `max_wait_s` from then."""
        self.mb.set_scope(req.epoch, req.step, attempt)
        self.check_state(True)
        ann = Announcement(
            self.me.peer_id,
            self.me.endpoint,
            self.me.curve_key,
            attempt,
            req.weight,
            params_hash=req.params_hash,
            numel=req.numel,
            codec=req.codec,
            block_size=req.block_size,
            vote=req.vote,
        )
        ttl = self.cfg.round_timeout_s + self.cfg.max_wait_s
        # Not awaited: others poll for it, and our own reads add it (progress.announcements).
        self.dht.store(
            self.view.announce_key(req.epoch, req.step),
            self.me.peer_id,
            ann.to_dict(),
            ttl,
            wait=False,
        )
        anns, complete = self._gather(req, ann, deadline, ready_at)
        top = max(a.attempt for a in anns.values())  # bounded by announcements()
        if top > attempt:
            raise RoundAborted(f"others are at attempt {top}", next_attempt=top)
        ours = [pid for pid, a in anns.items() if a.attempt == attempt]
        leader = min(ours, key=lambda pid: self.rank(req, attempt, pid))
        if leader == self.me.peer_id:
            led = self.leader.lead(req, ann, anns, deadline, complete, self.rank)
            if led is None:  # a group averages our step without us: wait for its outcome
                self.await_outcome(req, attempt, deadline)
            if isinstance(led, Member):  # a lower rank appeared: it leads, we follow
                return self._follow(req, ann, led, deadline)
            return led
        a = anns[leader]
        return self._follow(req, ann, Member(a.peer_id, a.endpoint, a.curve_key, 0.0), deadline)

    def _gather(
        self, req: RoundRequest, ann: Announcement, deadline: float, ready_at: float
    ) -> tuple[dict[str, Announcement], bool]:
        """Announcements for our step once no live peer of our step is worth waiting for.

        Returns them and whether every live peer of our step announced (`complete`)."""
        poll = min(0.1, self.cfg.heartbeat_s / 4)
        while True:
            every = self.announcements(req, ann, bounded=False)
            anns = self._below_ceiling(every)
            # An attempt bomber did announce: it is not waited for, only not followed.
            present = {pid for pid, a in every.items() if a.attempt >= ann.attempt}
            now = time.time()
            # Peers that sit this step out (blame.py) are not waited for: they announce in
            # vain, and a culprit's heartbeat must not hold the step back.
            out = self.blame.sitting_out(req.epoch, req.step)
            live = [r for r in self.view.live(fresh=True) if r.peer_id not in out]
            peers = at_step(live, self.me.peer_id, req.epoch, req.step)
            missing = [r for r in peers if r.peer_id not in present]
            cap = ready_at + self.cfg.max_wait_s
            waiting = [r for r in missing if now < min(wait_deadline(r, self.cfg), cap)]
            late = finishing(live, self.me.peer_id, req.epoch, req.step)
            waiting += [r for r in late if now < min(finishing_deadline(r, self.cfg), cap)]
            enough = len(present) >= self.cfg.min_peers
            if (not waiting and enough) or time.monotonic() >= deadline:
                missing += late
                if missing:
                    log.info(
                        "step %d: not waiting any longer for %s (past their ETA or the cap)",
                        req.step,
                        [r.peer_id for r in missing],
                    )
                return anns, not missing
            self.check_state(False)
            self.mb.pump(min(deadline, time.monotonic() + poll))

    # ---- follower -------------------------------------------------------------------------

    def _follow(
        self, req: RoundRequest, ann: Announcement, target: Member, deadline: float
    ) -> Group:
        attempt = ann.attempt
        for _ in range(8):  # redirects strictly lower the leader's rank: a safety cap
            self._send_join(target, ann)
            msg = self._await_reply(req, target, deadline)
            if msg.kind == "BEGIN":
                try:
                    return self._accept_begin(msg, req, ann, target)
                except RoundAborted as e:
                    # Tell the members at once, so they do not wait a phase timeout for our
                    # PART (and blame us for withholding it).
                    for m in msg.body["members"]:
                        if m.peer_id != self.me.peer_id:
                            self.mb.send(
                                m.endpoint,
                                m.curve_key,
                                "ABORT",
                                rid=msg.body["rid"],
                                reason=f"refused BEGIN: {e}"[:500],
                                culprits=list(e.culprits),
                            )
                    raise
            if msg.kind == "REDIRECT":
                new = msg.body["leader"]
                if self.rank(req, attempt, new.peer_id) >= self.rank(req, attempt, target.peer_id):
                    raise RoundAborted("redirect loop", next_attempt=attempt + 1)
                # Only to a peer that announced this attempt, at its announced address.
                a = self.announcements(req, ann).get(new.peer_id)
                if a is None or (a.attempt, a.endpoint, a.curve_key) != (
                    attempt,
                    new.endpoint,
                    new.curve_key,
                ):
                    raise RoundAborted(
                        f"redirected to {new.peer_id}, who did not announce this attempt",
                        next_attempt=attempt + 1,
                    )
                target = new
                continue
            if msg.kind == "RETRY":
                raise RoundAborted(
                    "leader asked to retry", next_attempt=max(msg.attempt, attempt + 1)
                )
            if msg.kind == "RESYNC":
                self._doubt(req, target, f"RESYNC to θ_g {msg.body['params_hash']}")
            if msg.kind == "REJECT":
                raise RoundFailed(f"leader {target.peer_id} rejected us: {msg.body['reason']}")
            self.await_outcome(req, attempt, deadline)  # FORMED: a round runs without us
        raise RoundAborted("too many redirects", next_attempt=attempt + 1)

    def _await_reply(self, req: RoundRequest, target: Member, deadline: float) -> Msg:
        """The leader's answer to our JOIN. It may legitimately take a grace period; meanwhile
        answer stray JOINs and notice a round that committed without us."""
        until = min(
            deadline, time.monotonic() + 2 * self.cfg.matchmaking_s + self.cfg.phase_timeout_s
        )
        while True:
            msg = self.mb.get(
                min(until, time.monotonic() + 1.0),
                lambda m: (
                    self._is_reply(m, target, req)
                    or (m.kind == "JOIN" and (m.epoch, m.step) == (req.epoch, req.step))
                ),
            )
            if msg is None:
                if time.monotonic() >= until:
                    raise RoundAborted(
                        f"leader {target.peer_id} did not answer", next_attempt=self.mb.scope[2] + 1
                    )
                self.check_state(False)
            elif msg.kind == "JOIN":  # someone thinks we lead: point it at our leader
                self.leader.reply(msg, "REDIRECT", leader=target.to_dict())
            else:
                return msg

    def _is_reply(self, m: Msg, target: Member, req: RoundRequest) -> bool:
        # Replies echo our attempt; a RETRY names a later one (but not an attempt bomb).
        mine = self.mb.scope[2]
        return (
            m.kind in REPLY_KINDS
            and m.sender_key == target.curve_key
            and (m.epoch, m.step) == (req.epoch, req.step)
            and (
                mine < m.attempt <= mine + MAX_ATTEMPT_LEAP
                if m.kind == "RETRY"
                else m.attempt == mine
            )
        )

    def _doubt(self, req: RoundRequest, leader: Member, what: str) -> NoReturn:
        """The leader says our θ_g is not the group's. If the swarm's majority line (our
        own reading of the signed records) agrees, resync (check_state raises); if not, the
        leader is wrong or lying: it sits out this step and we retry without it."""
        self.check_state(True)
        self.blame.offend(
            Offence(
                leader.peer_id,
                req.epoch,
                req.step,
                f"{what} while we hold the majority line",
                False,
            )
        )
        raise RoundAborted(
            f"leader {leader.peer_id} said {what}, but we hold the majority line's state",
            next_attempt=self.mb.scope[2] + 1,
            culprits=(leader.peer_id,),
        )

    def _accept_begin(
        self, msg: Msg, req: RoundRequest, ann: Announcement, leader: Member
    ) -> Group:
        """Accept the leader's BEGIN only if every entry is a live peer's signed record (and
        its announcement, where readable): a leader cannot invent members or change our
        weight or vote, and describing the group differently to different members gets it
        no commit (the DONE ballot covers the whole list)."""
        b = msg.body
        attempt = ann.attempt
        if (b["numel"], b["codec"], b["block_size"]) != (req.numel, req.codec, req.block_size):
            raise RoundAborted("BEGIN for another tensor layout", next_attempt=attempt + 1)
        if b["params_hash"] != req.params_hash:
            self._doubt(req, leader, f"BEGIN with θ_g {b['params_hash']}")
        lead = [m for m in b["members"] if m.peer_id == leader.peer_id]
        if not lead or not any(m.peer_id == self.me.peer_id for m in b["members"]):
            self._blame_leader(req, leader, "BEGIN without its leader or without us")
        out = self.blame.sitting_out(req.epoch, req.step) & {m.peer_id for m in b["members"]}
        if out:
            # Our evidence against them is newer than the leader's view: retry without them.
            raise RoundAborted(
                f"BEGIN lists {sorted(out)}, who sit out",
                next_attempt=attempt + 1,
                culprits=tuple(sorted(out))[:MAX_CULPRITS],
            )
        mine = next(m for m in b["members"] if m.peer_id == self.me.peer_id)
        if (mine.endpoint, mine.curve_key, mine.weight, _vote_id(mine.vote)) != (
            self.me.endpoint,
            self.me.curve_key,
            ann.weight,
            _vote_id(ann.vote),
        ):
            self._blame_leader(req, leader, "BEGIN lists us wrongly")
        # Every other member must be a peer with that endpoint and key in its signed
        # record (no invented members), and, where its announcement is readable already,
        # with the weight and vote it announced. The DONE ballot covers the whole list, so
        # a leader that describes the group differently to different members gets no commit.
        # Liveness is not the question here (a record a beat stale under load still proves
        # who the member is): the records as last read, then a fresh read for newcomers.
        recs = {r.peer_id: r for r in self.view.records()}
        if any(m.peer_id not in recs for m in b["members"]):
            recs = {r.peer_id: r for r in self.view.refresh()}
        anns = self.announcements(req, ann)
        for m in b["members"]:
            r, a = recs.get(m.peer_id), anns.get(m.peer_id)
            if r is None or (r.endpoint, r.curve_key) != (m.endpoint, m.curve_key):
                self._blame_leader(req, leader, f"BEGIN lists {m.peer_id}, who has no such record")
            if (
                a is not None
                and a.attempt == attempt
                and (a.weight, _vote_id(a.vote))
                != (
                    m.weight,
                    _vote_id(m.vote),
                )
            ):
                self._blame_leader(
                    req, leader, f"BEGIN's entry for {m.peer_id} differs from its announcement"
                )
        if sum(m.weight for m in b["members"]) <= 0:
            raise RoundAborted("BEGIN with total weight 0", next_attempt=attempt + 1)
        return Group(
            b["rid"],
            req.epoch,
            req.step,
            attempt,
            lead[0],
            tuple(b["members"]),
            b["params_hash"],
        )

    def _blame_leader(self, req: RoundRequest, leader: Member, what: str) -> NoReturn:
        # Checked against records it signed itself: our own evidence.
        self.blame.offend(Offence(leader.peer_id, req.epoch, req.step, what, True))
        raise RoundAborted(
            f"leader {leader.peer_id}: {what}",
            next_attempt=self.mb.scope[2] + 1,
            culprits=(leader.peer_id,),
        )

    def await_outcome(self, req: RoundRequest, attempt: int, deadline: float) -> NoReturn:
        """A round for our step runs without us: wait until it commits (the majority line
        moves past us -> NeedResync) or its members come back at a higher attempt."""
        # Its phase flags may not be visible yet, so "nobody busy" only counts once a whole
        # phase timeout has passed (by then that round has ended, one way or another).
        settle = time.monotonic() + self.cfg.phase_timeout_s
        # A real round ends within round_timeout_s; records that claim a round runs for
        # longer (a peer faking "data" phases to stall us) are not waited for past that.
        give_up = min(deadline, time.monotonic() + self.cfg.round_timeout_s)
        while time.monotonic() < give_up:
            self.mb.pump(min(give_up, time.monotonic() + self.cfg.heartbeat_s / 2))
            self.check_state(True)
            top = max((a.attempt for a in self.announcements(req).values()), default=0)
            idle = time.monotonic() > settle and not self.leader.busy_without_us(
                req, attempt, set()
            )
            if top > attempt or idle:
                raise RoundAborted(
                    "the other group finished or gave up", next_attempt=max(top, attempt + 1)
                )
        if time.monotonic() < deadline:
            raise RoundAborted(
                f"the round for our step without us did not end in {self.cfg.round_timeout_s}s",
                next_attempt=attempt + 1,
            )
        raise RoundFailed("a round for our step ran without us until the deadline")

    def _send_join(self, target: Member, ann: Announcement) -> None:
        body = {k: v for k, v in ann.to_dict().items() if k not in ("peer_id", "attempt")}
        self.mb.send(target.endpoint, target.curve_key, "JOIN", **body)


def _vote_id(vote: dict | None) -> str | None:
    return None if vote is None else vote_hash(vote)
