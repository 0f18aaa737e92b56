"""When a peer's inner phase ends, and the ETA it reports meanwhile (round protocol rule 2).

Two modes:
- fixed H: every peer trains H steps; the swarm waits for live peers until their ETA, so
  the slowest live peer paces the round (classic DiLoCo).
- target tokens (`--target-tokens`): the swarm agrees on tokens per round; every peer
  trains until the live peers of its step have, together, trained that many. A fast peer
  does more steps and a slow one fewer; weights stay tokens, so nobody paces the others.

In both modes a *late* peer (it started this round from downloaded state, mid-round)
stops as soon as every other live peer of its step is ready, and contributes what it has:
joining never holds the swarm back, and its work is never thrown away.
"""

from __future__ import annotations

from dataclasses import dataclass

from peers.records import PeerRecord


@dataclass
class PhasePacer:
    steps: int  # H: the inner steps of a phase in fixed-H mode
    tokens_per_step: int
    target_tokens: int | None = None
    late: bool = False
    step_s: float = 0.0  # moving average of one inner step's wall time

    def observe(self, seconds: float) -> None:
        """One inner step took `seconds`."""
        self.step_s = seconds if self.step_s == 0 else 0.8 * self.step_s + 0.2 * seconds

    def over(self, done: int, my_tokens: int, others: list[PeerRecord]) -> bool:
        """Should the phase end after `done` steps? `others`: live peers of our step."""
        if others and all(r.ready for r in others) and (self.late or self.target_tokens):
            return True  # everyone else is waiting for us and we are not owed a full phase
        if self.target_tokens:
            return my_tokens + sum(r.tokens for r in others) >= self.target_tokens
        return done >= self.steps

    def eta(self, done: int, my_tokens: int, others: list[PeerRecord]) -> float:
        """Seconds until we are ready, as the swarm should plan with it."""
        if self.late:
            return self.step_s  # we stop once the others are ready: about one step
        if self.target_tokens:
            left = self.target_tokens - my_tokens - sum(r.tokens for r in others)
            rate = self.tokens_per_step / max(self.step_s, 1e-6)
            rate += sum(r.tokens_per_s for r in others)
            return max(0.0, left / max(rate, 1e-6))
        return max(0, self.steps - done) * self.step_s
