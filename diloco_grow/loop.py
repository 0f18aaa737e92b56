"""One DiLoCo round, the same for both drivers (simulate and peer): contributions ->
average -> outer step -> sync the workers -> apply a committed growth event.

Only the averager differs: `LocalAverager` (every worker in this process) or
`NetworkAverager` (this peer's one worker, the others over the swarm). A round that fails
raises before anything is applied, and every worker's error-feedback residual is restored,
so the next round's Δ covers the failed one's progress too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from diloco_grow.growth import GrowthEvent
from diloco_grow.model import ModelConfig
from diloco_grow.outer import Averager, RoundResult
from diloco_grow.worker import GlobalState, Worker


@dataclass(frozen=True)
class RoundOutcome:
    result: RoundResult
    event: GrowthEvent | None  # applied right after the outer step
    n_params_before: int
    n_params_after: int
    # θ_g after the outer step but before the growth event (only when one applied), so
    # drivers can measure what growth itself changed.
    pre_growth: tuple[ModelConfig, torch.Tensor] | None = None


def outer_round(
    g: GlobalState,
    workers: list[Worker],
    averager: Averager,
    *,
    vote: GrowthEvent | None = None,
    scheduled: GrowthEvent | None = None,
    guard: Any = None,
) -> RoundOutcome:
    """Run one outer round on `g` in place.

    `vote`: our growth proposal for this round (the swarm commits it by quorum);
    `scheduled`: an event applied unconditionally after this round (simulate's schedule).
    `guard`: a lock held while `g` changes (a peer serves `g` to joiners from a thread)."""
    contribs = [w.contribution(g) for w in workers]
    try:
        result = averager.average(
            contribs,
            step=g.step,
            params_hash=g.hash(),
            vote=None if vote is None else vote.to_dict(),
        )
        # Validated before anything changes: a committed vote that is not a valid event
        # must not leave θ_g half-updated.
        event = GrowthEvent.from_dict(result.committed) if result.committed else scheduled
    except BaseException:
        for w in workers:
            w.round_failed()
        raise
    n_before = int(g.theta.numel())
    with guard if guard is not None else contextlib.nullcontext():
        g.outer_step(result.mean)
        for w in workers:
            w.sync_to(g)
        pre = None
        if event is not None:
            pre = (g.model_cfg, g.theta.clone())
            index_map = g.grow(event)
            for w in workers:
                w.follow_growth(g, index_map)
    return RoundOutcome(result, event, n_before, int(g.theta.numel()), pre)
