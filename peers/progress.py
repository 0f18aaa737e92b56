"""Progress heartbeats, seen from one peer: who is live, at which step, how far along.

Every peer republishes its `PeerRecord` every `heartbeat_s` (swarm.py) with the tokens it
trained this round, its speed and its ETA to ready. This module holds the latest records
(refreshed by the heartbeat thread, so reading them costs nothing in the training loop)
and the timing rules built on them (DESIGN.md, "The round protocol", rules 1-2):

- a peer whose record is older than `dead_after_s` is dead: nobody waits for it;
- a ready peer waits for a live peer of its step that is still training until that peer's
  own reported ETA plus slack (`wait_deadline`), never longer than `max_wait_s`;
- a *late* peer (one that started the round from downloaded state) reports a short ETA
  and stops training as soon as every other live peer of its step is ready.

All of it may be stale by a heartbeat; it decides whom to wait for, never whether a
round committed (that comes from the data plane, or outcome.py for a stuck member).

Admission (admission.py): in an admitted run the view keeps only records whose certificate
admits their peer id, and only announcements and growth-history entries of admitted peers.
So everything built on it (waiting, leader choice, the majority line, state sources) only
ever sees admitted peers, and the data plane's allowlist is fed from the same records.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from peers.config import SwarmConfig
from peers.dht import SwarmDHT
from peers.records import Announcement, HistoryEntry, PeerRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """What the app reports about its inner phase (published with the next heartbeat)."""

    tokens: int = 0  # trained since the last sync: the weight this peer would bring
    tokens_per_s: float = 0.0
    eta_s: float = 0.0  # seconds until ready; a late peer reports about one inner step
    ready: bool = False
    late: bool = False


def is_live(r: PeerRecord, cfg: SwarmConfig, now: float) -> bool:
    return now - r.time <= cfg.dead_after_s


def wait_deadline(r: PeerRecord, cfg: SwarmConfig) -> float:
    """Wall-clock time until which ready peers wait for `r` to announce.

    Its own ETA from its latest heartbeat, plus two heartbeats (it notices the others are
    ready, and its announcement propagates) and the matchmaking grace. A live peer keeps
    pushing this forward with every heartbeat, so `max_wait_s` caps the total."""
    return r.time + r.eta_s + 2 * cfg.heartbeat_s + cfg.matchmaking_s


def at_step(records: list[PeerRecord], me: str, epoch: int, step: int) -> list[PeerRecord]:
    """Other peers whose θ_g is at (epoch, step), i.e. who train for the same round."""
    return [
        r
        for r in records
        if r.peer_id != me and r.lineage and (r.arch_epoch, r.step) == (epoch, step)
    ]


def finishing(records: list[PeerRecord], me: str, epoch: int, step: int) -> list[PeerRecord]:
    """Other peers still inside round step-1 (typically: applying the round we just
    committed with them); they will be at our step within a phase timeout. (A growth
    event at step-1 moves the epoch on, hence epoch-1 too.)"""
    return [
        r
        for r in records
        if r.peer_id != me
        and r.lineage
        and r.step == step - 1
        and r.arch_epoch in (epoch, epoch - 1)
        and r.round is not None
        and r.round.step == step - 1
        and r.round.phase != "aborted"
    ]


def finishing_deadline(r: PeerRecord, cfg: SwarmConfig) -> float:
    return r.time + cfg.phase_timeout_s + 2 * cfg.heartbeat_s


class SwarmView:
    """The latest heartbeat records of the admitted peers, refreshed in the background.

    `on_refresh` gets the admitted records after every read (the swarm feeds their CURVE
    keys to the data plane's allowlist)."""

    def __init__(
        self,
        dht: SwarmDHT,
        me: str,
        cfg: SwarmConfig,
        on_refresh: Callable[[list[PeerRecord]], None] | None = None,
        hidden: Callable[[], set[str]] = set,
    ) -> None:
        self.dht, self.me, self.cfg = dht, me, cfg
        self.policy = cfg.admission
        self.on_refresh = on_refresh
        self.hidden = hidden  # peers we ignore (banned: blame.py)
        self._records: list[PeerRecord] = []
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    def refresh(self) -> list[PeerRecord]:
        """Read every peer's record from the DHT now (blocking, bounded by the DHT timeout)."""
        recs = self.dht.fetch(self.dht.key("peers"), PeerRecord.from_dict, named=True)
        recs = self._admitted(recs)
        with self._lock:
            self._records = recs
        if self.on_refresh is not None:
            self.on_refresh(recs)
        return recs

    def _admitted(self, recs: list[PeerRecord]) -> list[PeerRecord]:
        if self.policy.open:
            return recs
        now, out = time.time(), []
        for r in recs:
            why = self.policy.why_not(r.peer_id, r.cert, now)
            if not why:
                out.append(r)
            elif (r.peer_id, why) not in self._warned:  # one line per peer and reason
                if len(self._warned) > 10_000:  # a stranger minting ids must not grow it
                    self._warned.clear()
                self._warned.add((r.peer_id, why))
                who = "our own record" if r.peer_id == self.me else f"peer {r.peer_id}"
                log.warning("ignoring %s: %s", who, why)
        return out

    def records(self) -> list[PeerRecord]:
        with self._lock:
            return list(self._records)

    def live(self, fresh: bool = False) -> list[PeerRecord]:
        """Live peers (ourselves included once our record is out), newest view."""
        recs = self.refresh() if fresh else self.records()
        now, hidden = time.time(), self.hidden()
        return [r for r in recs if is_live(r, self.cfg, now) and r.peer_id not in hidden]

    def public_of(self, peer_id: str) -> dict | None:
        """A peer's latest record as a plain dict (what NeedResync carries), or None."""
        r = next((r for r in self.records() if r.peer_id == peer_id), None)
        return None if r is None else r.public()

    def announce_key(self, epoch: int, step: int) -> str:
        return self.dht.key("round", epoch, step)

    def announcements(
        self, epoch: int, step: int, mine: Announcement | None = None
    ) -> dict[str, Announcement]:
        found = self.dht.fetch(self.announce_key(epoch, step), Announcement.from_dict, named=True)
        if not self.policy.open:  # a peer we do not admit is not in any round of ours
            ids = {r.peer_id for r in self.records()}
            found = [a for a in found if a.peer_id in ids]
        hidden = self.hidden()
        anns = {a.peer_id: a for a in found if a.peer_id not in hidden}
        if mine is not None:
            anns[mine.peer_id] = mine  # our own write may not be readable yet
        return anns

    def history(self) -> list[HistoryEntry]:
        """Committed growth events in the DHT, written by admitted peers. An entry carries
        its writer's certificate: it stays valid after the writer's record is gone."""
        found = self.dht.fetch(self.dht.key("history"), HistoryEntry.from_dict)
        now = time.time()
        return [e for e in found if self.policy.admits(e.peer_id, e.cert, now)]
