"""What a round is about (`RoundRequest`, one per all_reduce call), who takes part in it
(`Group`, frozen by the leader and identical on every member once BEGIN is accepted), and
what it gives the app (`AllReduceResult`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peers.messages import Member


@dataclass(frozen=True)
class RoundRequest:
    epoch: int
    step: int
    weight: float
    params_hash: str
    numel: int
    codec: str
    block_size: int
    vote: dict | None


@dataclass(frozen=True)
class Group:
    rid: str
    epoch: int
    step: int
    attempt: int
    leader: Member
    members: tuple[Member, ...]  # sorted by peer_id; shard k is reduced by members[k]
    params_hash: str


@dataclass(frozen=True)
class AllReduceResult:
    mean: torch.Tensor  # fp32, shape of the local encoding; identical on every member
    members: list[str]  # peer ids of the group, sorted
    bytes_sent: int  # by this peer during this call (all attempts, headers included)
    bytes_recv: int
    seconds: float  # the whole call: matchmaking, failed attempts, data phase, commit
    data_seconds: float  # BEGIN to commit (all votes in) of the attempt that committed
    committed_vote: dict | None  # the growth proposal the group committed, if any
    attempts: int  # 1 = the first group formed committed
    leader: str
    round_id: str
