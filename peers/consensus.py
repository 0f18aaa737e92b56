"""Agreement rules that every member evaluates on the same inputs, so they agree without talking.

Three questions are settled per round:

1. Whose θ_g is the group's? The leader picks the majority `params_hash` among the peers that
   joined (ties go to the leader's own hash, then to the lexicographically smallest); the
   others are told to resync. This also heals a split brain: a peer that averaged alone is
   outvoted at its next round and downloads the majority's state.
2. Does a growth proposal commit? Votes ride in JOIN and are echoed verbatim in BEGIN, so every
   member tallies the identical vote list. A proposal commits when at least `quorum` of the
   members *and* at least `min_peers` members voted for the identical proposal (compared by a
   canonical hash). The result is only acted upon if the round itself commits.
3. Who leads an attempt? The announcer with the lowest `leader_rank`.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence

from peers.schema import canonical_bytes


def vote_hash(vote: dict) -> str:
    """sha256 hex of the canonical msgpack of a proposal; equal dicts give equal hashes."""
    return hashlib.sha256(canonical_bytes(vote)).hexdigest()


def votes_needed(n_members: int, quorum: float, min_peers: int) -> int:
    """Smallest vote count that commits: ceil(quorum * n) (with float slack) and >= min_peers."""
    # 2/3 * 3 is 2.0000000000000004 in floats; the slack keeps "2 of 3" committing.
    by_quorum = math.ceil(quorum * n_members - 1e-9)
    return max(by_quorum, min_peers, 1)


def tally(votes: Sequence[dict | None], quorum: float, min_peers: int) -> dict | None:
    """The proposal that commits among `votes` (one per member, None = abstain), if any."""
    counts: Counter[str] = Counter()
    first: dict[str, dict] = {}
    for v in votes:
        if v is None:
            continue
        h = vote_hash(v)
        counts[h] += 1
        first.setdefault(h, v)
    if not counts:
        return None
    need = votes_needed(len(votes), quorum, min_peers)
    # With quorum > 1/2 at most one proposal can pass; sorting makes quorum <= 1/2 deterministic.
    best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    return first[best[0]] if best[1] >= need else None


def majority_state(states: dict[str, tuple[str, int]], leader: str) -> tuple[str, int]:
    """The (params_hash, numel) most members hold; ties prefer the leader's, then the smallest."""
    counts = Counter(states.values())
    top = max(counts.values())
    tied = sorted(s for s, c in counts.items() if c == top)
    return states[leader] if states[leader] in tied else tied[0]


def leader_rank(run: str, epoch: int, step: int, attempt: int, peer_id: str) -> bytes:
    """Order of leadership for one attempt: the lowest rank leads.

    A hash of (run, epoch, step, attempt, id) instead of the lowest id: ids cannot be
    ground to win every round, and a leader that stalls an attempt is unlikely to lead
    the retry."""
    return hashlib.sha256(f"{run}|{epoch}|{step}|{attempt}|{peer_id}".encode()).digest()


# How far ahead of our own attempt (or the announcers' median, whichever is higher) an
# attempt number may be and still count. Honest attempts grow by one per failed try; a
# record at attempt 2^20 is an attack (everyone would jump past the schema's limit, then
# see only themselves) and is ignored, not followed.
MAX_ATTEMPT_LEAP = 8
# Honest attempts grow by one per failed try, a few seconds each, and a round gives up
# after round_timeout_s: an announcement this far past the ceiling is signed proof of an
# attack (blame.py bans it at once), not a peer that retried more than we did.
BOMB_MARGIN = 1 << 10


def attempt_ceiling(mine: int, attempts: Sequence[int]) -> int:
    """The highest attempt number we accept from others while at attempt `mine`."""
    ordered = sorted(attempts)
    median = ordered[(len(ordered) - 1) // 2] if ordered else mine
    return max(mine, median) + MAX_ATTEMPT_LEAP
