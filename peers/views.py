"""What the DHT says about the swarm, seen from one peer: who is live, who announced, who
already committed. All of it may be stale by seconds; matchmaking uses it to decide whom to
wait for and when to give up, never as proof that a round did or did not commit.
"""

from __future__ import annotations

from peers.dht import SwarmDHT
from peers.errors import NeedResync
from peers.records import Announcement, PeerRecord


class SwarmView:
    def __init__(self, dht: SwarmDHT, me: str) -> None:
        self.dht, self.me = dht, me

    def peers(self) -> list[PeerRecord]:
        """Live peers' liveness/progress records (expired ones are gone from the DHT)."""
        return self.dht.fetch(self.dht.key("peers"), PeerRecord.from_dict)

    def record_of(self, peer_id: str) -> dict | None:
        return next((r.public() for r in self.peers() if r.peer_id == peer_id), None)

    @staticmethod
    def live_in_epoch(recs: list[PeerRecord], epoch: int) -> set[str]:
        return {r.peer_id for r in recs if r.arch_epoch == epoch}

    def announce_key(self, epoch: int, step: int) -> str:
        return self.dht.key("round", epoch, step)

    def announcements(
        self, epoch: int, step: int, mine: Announcement | None = None
    ) -> dict[str, Announcement]:
        anns = {
            a.peer_id: a
            for a in self.dht.fetch(self.announce_key(epoch, step), Announcement.from_dict)
        }
        if mine is not None:
            anns[mine.peer_id] = mine  # our own write may not be readable yet
        return anns

    def check_progress(self, epoch: int, step: int) -> list[PeerRecord]:
        """NeedResync if a live peer already committed our step, or moved to a later epoch.

        Returns the records it read, for callers that need the live set too.
        """
        recs = self.peers()
        ahead = [
            r
            for r in recs
            if r.peer_id != self.me
            and (r.arch_epoch > epoch or (r.arch_epoch == epoch and r.last_round >= step))
        ]
        if ahead:
            best = max(ahead, key=lambda r: (r.arch_epoch, r.last_round))
            raise NeedResync(
                f"peer {best.peer_id} is at epoch {best.arch_epoch} step "
                f"{best.last_round}; we are at epoch {epoch} step {step}",
                best.public(),
            )
        return recs

    def busy_without_us(self, epoch: int, step: int, attempt: int, joined: set[str]) -> bool:
        """Is someone outside `joined` in the data phase of our step, at our attempt or later?

        Flags of earlier attempts are ignored: they belong to aborted rounds (or dead peers).
        """
        return any(
            r.in_round is not None
            and r.in_round[:2] == (epoch, step)
            and r.in_round[2] >= attempt
            and r.peer_id not in joined
            and r.peer_id != self.me
            for r in self.peers()
        )
