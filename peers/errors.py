"""Outcomes of a round that the caller must act on, and the internal reasons a round is retried.

The app sees only two exceptions from `Swarm.all_reduce`: `NeedResync` (our θ_g is not the
group's, or the group has moved past our step, so we must download state instead of averaging)
and `RoundFailed` (no round could be completed before the deadline; the contribution is kept
and the caller may try again). Everything else is handled inside the swarm by retrying.
"""

from __future__ import annotations


class NeedResync(Exception):
    """Our state is behind or different from the swarm's; download state before the next round.

    `source` is the (stale-able) DHT record of a live peer believed to hold the right state
    (it carries `state_endpoint` / `state_curve_key` when that peer serves state), or None.
    """

    def __init__(self, reason: str, source: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.source = source


class RoundFailed(Exception):
    """No round committed before the overall deadline (or a fatal configuration mismatch)."""


class RoundAborted(Exception):
    """Internal: this attempt is over without being applied; survivors retry at next_attempt."""

    def __init__(self, reason: str, next_attempt: int, culprits: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.next_attempt = next_attempt
        self.culprits = culprits  # who caused it, if we know (blame.py)


class Malformed(ValueError):
    """Internal: an incoming message or record failed validation; log it and drop it."""
