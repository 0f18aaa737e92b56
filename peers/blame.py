"""Who misbehaved in our rounds: culprits sit out the retries of a step, repeat offenders
are banned for a while.

Every abort names its culprits where the evidence allows (rounds.py): a member whose PART
never reached us or failed validation, a reducer whose REDUCED never came or was insane, a
leader whose BEGIN contradicts the members' signed announcements, the reducer of a shard
whose bytes differ between members. Two kinds of evidence:

- *own*: we saw it ourselves on an authenticated channel (a frame signed by the culprit's
  CURVE key, or a missing one we were owed). It makes the culprit sit out the rest of the
  step and counts towards a ban.
- *hearsay*: another member's ABORT names the culprit. It only makes the culprit sit out
  the rest of this step: a lying member could otherwise get honest peers banned by
  accusing them, whereas a false accusation now costs the accused at most one step.

A culprit that sits out is not admitted to our groups (as leader we REJECT its JOIN, as
follower we abort a BEGIN that lists it) and cannot lead our retries, so one member cannot
stall a step forever. Bans are local (each peer judges on its own evidence) and expire
after `ban_steps` outer steps, so a flaky but honest peer is not shut out for good.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Offence:
    peer_id: str
    epoch: int
    step: int
    what: str
    own: bool  # our own evidence (True) or another member's word (False)
    ban: bool = False  # signed proof of malice no honest peer can produce: ban at once


class Blame:
    def __init__(self, ban_after: int = 3, ban_steps: int = 100) -> None:
        self.ban_after, self.ban_steps = ban_after, ban_steps
        self._sit_out: dict[tuple[int, int], set[str]] = defaultdict(set)
        self._strikes: dict[str, set[tuple[int, int]]] = defaultdict(set)  # own evidence
        self._banned_until: dict[str, int] = {}  # peer -> the outer step its ban ends at
        self._accused: dict[tuple[int, int], set[str]] = defaultdict(set)  # accusers
        self.log: list[Offence] = []
        self._lock = threading.Lock()  # the round thread writes, view readers read

    def offend(self, o: Offence) -> None:
        """Record an offence; the culprit sits out (o.epoch, o.step) from now on."""
        with self._lock:
            self._offend(o)

    def _offend(self, o: Offence) -> None:
        if o.ban and self._banned_until.get(o.peer_id, -1) > o.step:
            return  # banned already (the same signed record, read again)
        if o.peer_id in self._sit_out[(o.epoch, o.step)] and not o.own:
            return  # already sitting out; hearsay adds nothing
        self.log = [*self.log[-255:], o]
        self._sit_out[(o.epoch, o.step)].add(o.peer_id)
        log.warning(
            "blame peer=%s step=%d offence=%r evidence=%s",
            o.peer_id,
            o.step,
            o.what,
            "own" if o.own else "hearsay",
        )
        if not o.own:
            return
        if o.ban:
            self._banned_until[o.peer_id] = o.step + self.ban_steps
            log.warning("banned peer=%s until step %d", o.peer_id, o.step + self.ban_steps)
            return
        # Strikes count distinct steps: one bad round that aborts several times is one strike.
        self._strikes[o.peer_id].add((o.epoch, o.step))
        if len(self._strikes[o.peer_id]) >= self.ban_after:
            self._banned_until[o.peer_id] = o.step + self.ban_steps
            self._strikes[o.peer_id].clear()
            log.warning("banned peer=%s until step %d", o.peer_id, o.step + self.ban_steps)

    def accusation(
        self, accuser: str, culprits: list[str], epoch: int, step: int, what: str
    ) -> None:
        """An ABORT from `accuser` naming `culprits` (hearsay). Each member's word counts once
        per step: a member that aborts again, or names nobody, is the one that sits out, so
        neither silent aborts nor a string of false accusations can stall a step."""
        with self._lock:
            first = accuser not in self._accused[(epoch, step)]
            self._accused[(epoch, step)].add(accuser)
        if culprits and first:
            for c in culprits:
                self.offend(Offence(c, epoch, step, f"named by {accuser}: {what}", False))
        else:
            self.offend(Offence(accuser, epoch, step, f"aborted: {what}", False))

    def sitting_out(self, epoch: int, step: int) -> set[str]:
        """Peers we keep out of rounds for (epoch, step): this step's culprits and bans."""
        with self._lock:
            self._forget_before(step)
            out = set(self._sit_out.get((epoch, step), ()))
        return out | self.banned(step)

    def banned(self, step: int) -> set[str]:
        # Outer steps count on across growth epochs, so the step alone bounds the ban.
        with self._lock:
            return {p for p, until in self._banned_until.items() if step < until}

    def _forget_before(self, step: int) -> None:
        for d in (self._sit_out, self._accused):
            for k in [k for k in d if k[1] < step - 1]:
                del d[k]
