"""The network Averager: the DiLoCo loop's view of a swarm round."""

from __future__ import annotations

from collections.abc import Callable

from compression.codec import Encoded
from diloco_grow.outer import RoundResult
from peers.swarm import Swarm


class NetworkAverager:
    """Adapts `Swarm.all_reduce` (one local contribution) to the Averager protocol."""

    def __init__(self, swarm: Swarm, arch_epoch: Callable[[], int]) -> None:
        self.swarm, self.arch_epoch = swarm, arch_epoch

    def average(
        self,
        contributions: list[tuple[Encoded, float]],
        *,
        step: int,
        params_hash: str,
        vote: dict | None = None,
    ) -> RoundResult:
        if len(contributions) != 1:
            raise ValueError("a network peer contributes exactly one pseudo-gradient per round")
        enc, weight = contributions[0]
        r = self.swarm.all_reduce(
            enc, weight, arch_epoch=self.arch_epoch(), step=step, params_hash=params_hash, vote=vote
        )
        return RoundResult(
            mean=r.mean,
            members=len(r.members),
            bytes_sent=r.bytes_sent,
            bytes_recv=r.bytes_recv,
            seconds=r.seconds,
            committed=r.committed_vote,
            member_ids=list(r.members),
        )
