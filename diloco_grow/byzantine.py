"""Byzantine workers for research (issue #9): in `simulate`, the last f workers train like
everybody else but send a poisoned pseudo-gradient, so robust aggregation can be measured
against the attacks it is meant to stop. Honest workers are untouched.

Kinds, for a Byzantine worker whose honest pseudo-gradient is Δ:
- sign-flip: −4·Δ (pushes θ_g back against the honest direction, at a plausible norm)
- scaled:    100·Δ (the right direction, a hundredfold step)
- noise:     Gaussian noise of norm 10·‖Δ‖ (seeded by run seed, step and worker)
- nan:       all NaN. No codec encodes NaN and the wire drops NaN or Inf, so this sends
             the worst encoding the wire does accept instead (`worst_legal`: for int8 every
             code −128 at the largest legal scale, i.e. every element −FLT_MAX).
The worker claims its honest weight (tokens trained): weight inflation is a separate
attack, bounded by the weight cap (tests/unit/test_robust.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from compression.codec import Codec, Encoded
from diloco_grow.outer import pseudo_gradient
from diloco_grow.worker import GlobalState, Worker

KINDS = ("sign-flip", "scaled", "noise", "nan")
SIGN_FLIP = 4.0
SCALE = 100.0
NOISE_NORM = 10.0  # × the honest norm

# Code −128 (int8) and nibble 0 (int4, code −8) are legal on the wire and never produced by
# our encoders: the largest magnitude a payload byte can carry.
_MIN_CODE_BYTE = {"int8": 0x80, "int4": 0x00}


def check_byzantine(byzantine: tuple[int, str] | None, workers: int) -> None:
    """(f, kind) must name a known kind and leave at least one honest worker."""
    if byzantine is None:
        return
    f, kind = byzantine
    if kind not in KINDS:
        raise ValueError(f"byzantine kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(f, int) or not 0 <= f < workers:
        raise ValueError(f"byzantine count must be an integer in [0, {workers}), got {f!r}")


def poisoned(delta: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """What a Byzantine worker sends instead of its honest Δ (before encoding)."""
    if kind == "sign-flip":
        return -SIGN_FLIP * delta
    if kind == "scaled":
        return SCALE * delta
    if kind == "noise":
        noise = torch.randn(delta.numel(), generator=generator, dtype=torch.float32)
        norm = float(torch.linalg.vector_norm(noise))
        return noise * (NOISE_NORM * float(torch.linalg.vector_norm(delta)) / max(norm, 1e-30))
    if kind == "nan":
        return torch.full_like(delta, float("nan"))
    raise ValueError(f"unknown byzantine kind {kind!r}")


def worst_legal(codec: Codec, numel: int) -> Encoded:
    """The largest-magnitude encoding of `numel` elements that the wire accepts."""
    big = torch.finfo(torch.float16 if codec.name == "fp16" else torch.float32).max
    enc = codec.encode(torch.full((numel,), -big, dtype=torch.float32))
    byte = _MIN_CODE_BYTE.get(enc.codec)
    if byte is None:
        return enc
    # The encoder capped the scale at FLT_MAX / 128 and clipped the codes to −127; the
    # wire still takes code −128 at that scale, which decodes to −FLT_MAX exactly.
    return dataclasses.replace(enc, payload=torch.full_like(enc.payload, byte))


class ByzantineWorker(Worker):
    """Trains honestly (so it can scale its own Δ), sends a poisoned contribution."""

    def __init__(self, *args: Any, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kind not in KINDS:
            raise ValueError(f"byzantine kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.index = kind, kwargs.get("worker", 0)

    def contribution(self, g: GlobalState) -> tuple[Encoded, float]:
        delta = pseudo_gradient(g.theta, self.model)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + g.step * 1009 + self.index)
        bad = poisoned(delta, self.kind, gen)
        try:
            enc = self.codec.encode(bad)
        except ValueError:  # NaN does not encode (and would not pass the wire)
            enc = worst_legal(self.codec, delta.numel())
        # No error feedback: an attacker has no use for it, and skipping it keeps the
        # residual of a failed round (round_failed) trivially right.
        return enc, float(self.tokens_since_sync)
