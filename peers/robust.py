"""Robust aggregation of one shard's contributions (issue #9: untrusted volunteers).

A reducer receives P decoded fp32 contributions to its shard, one per member, and the
weights the members claim (tokens trained). The plain weighted mean lets one member move
the result anywhere: a NaN poisons it, a ×1e6 vector owns it, and a claimed weight of 1e12
makes the member the whole mean. `aggregate` bounds what a minority can do:

1. A contribution with a NaN or Inf (or a NaN, Inf or negative weight) is rejected.
2. Weights are capped at `weight_cap` × the median weight, so no member outweighs a few
   honest ones however many tokens it claims. Honest peers differ in speed, so the cap
   is loose, and the clipping below bounds what the attackers' weight buys only while
   their capped weight is under half the total: f·weight_cap < P − f, so with the
   default cap of 4 one attacker who claims a huge weight needs P >= 6 to be outvoted
   (at P = 4 it holds 4/7 and drags the mean ~3 honest spreads; tests/unit/test_robust.py).
3. With at least 3 finite contributions, one whose norm exceeds `reject_factor` × the
   median norm is rejected (absurd scales; also keeps the fp32 arithmetic far from
   overflow), and the rest are combined by CenteredClip (Karimireddy et al. 2021, as used
   by BTARD, Gorbunov et al. 2022): start at the coordinate-wise median v, then `iters`
   times v ← v + Σ w_i c_i (x_i − v) / Σ w_i with c_i = min(1, τ / ‖x_i − v‖) and
   τ = `clip_factor` × the median of ‖x_i − median‖. Every member keeps its pull towards
   itself, but nobody pulls harder than τ, so f of P members (capped weight fraction α)
   move the result by at most about α·τ per iteration, whatever they send.

With 1 or 2 finite contributions there is no majority to trust: any norm or distance rule
would let one member veto the other (a zero vector would get the honest one rejected), and
so would a weight cap (nobody can tell whether the heavier member inflates or the lighter
one just joined with a few steps: capping made an honest late joiner's few steps count a
quarter of a full phase). Only step 1 applies, and the result is the weighted mean.
Members defend themselves with `check_reduced` (a reduced shard far larger than their own
contribution), which also catches a lying reducer at any P.

Sparse codecs (`topk_s32`, Layout.mean_over_senders) then divide each coordinate by the
weight fraction of the kept members that sent it (`mean_over_senders`). That lifts the
weight's bound on a member's reach over the coordinates only it sent: its clipped pull
there, at most w·τ/Σw per iteration, is scaled by Σw/w, so it is bounded by about τ per
iteration (`iters` · τ in all), whatever weight it claims; a tiny claimed weight buys
nothing more. Measured: an attacker at 9× the median norm reaches 1.2–2.1 τ at claimed
weights 1e-6 to the cap (tests/unit/test_robust.py). The plain sparse mean at the outer
lr ≈ M it needs (docs/design.md) reaches comparably far.

Medians of scalars (weights, norms, distances) are the *lower* median: with an even count
it is the smaller middle value, which an inflating member cannot raise. The coordinate-wise
center takes the mean of the two middle values (the symmetric median), so it is unbiased.

Honest DiLoCo pseudo-gradients are similar in norm and direction, so nobody is clipped and
the first iteration lands exactly on the weighted mean: when no contribution is clipped,
`aggregate` returns the plain arithmetic's result bit for bit. `enabled=False` is always
the plain arithmetic the swarm's reducers ran before (rounds.py): acc += x_i · w_i/Σw in
member order from zeros, or the unweighted mean when Σw = 0. Everything runs in member
order on one machine (the reducer's), and the result is finite: that is all the swarm
needs, since every member decodes the reducer's one encoding of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLT_MAX = torch.finfo(torch.float32).max
MIN_ROBUST = 3  # below this many finite contributions no majority exists (see above)
SORT_NETWORK_MAX = 16  # measured: up to here a min/max network beats torch.sort


@dataclass(frozen=True)
class RobustConfig:
    """How a reducer combines one shard's contributions, and what a member accepts back.

    The defaults leave honest rounds untouched. Measured on tiny-preset pseudo-gradients
    (4 workers, H=30, int8, 8 rounds): every shard's norms lie within 1.08× of their
    median, distances to the coordinate-wise median within 1.2×, cosine to the mean
    >= 0.8; benchmarks/bench_robust.py counts no honest rejection or clip. AdamW moves a
    parameter by about lr per step at most, so a peer that trains 4× the median steps
    sends at most about 4× the median norm, well under reject_factor."""

    enabled: bool = True
    # A member's weight counts at most weight_cap × the median weight: loose enough for
    # peers that differ several-fold in speed, tight enough that a claimed 1e12 tokens
    # is worth a few honest peers, not the round.
    weight_cap: float = 4.0
    # τ = clip_factor × median distance to the center. 2 keeps honest contributions
    # unclipped (their distances vary by well under 2×), while an attacker pulls at most
    # 2 honest spreads' worth, times its weight fraction.
    clip_factor: float = 2.0
    # Reject a norm above reject_factor × the median norm. Clipping already bounds a
    # large vector; this catches absurd ones (×1e6, int8 codes at the largest scale)
    # before they get near fp32 overflow, and leaves a fast honest peer (≤ 4×) alone.
    reject_factor: float = 10.0
    iters: int = 3  # CenteredClip iterations; honest rounds stop after the first
    # A member refuses a reduced shard whose norm exceeds max_mean_ratio × its own
    # contribution's norm. Generous: a peer that trained few steps sends a small Δ, and
    # an honest mean is at most the largest honest norm.
    max_mean_ratio: float = 50.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"robust.enabled must be true or false, got {self.enabled!r}")
        # weight_cap and reject_factor below 1 would cap or reject the median member itself.
        for name, at_least_one in (
            ("weight_cap", True),
            ("clip_factor", False),
            ("reject_factor", True),
            ("max_mean_ratio", False),
        ):
            v = getattr(self, name)
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not number or (v < 1 if at_least_one else v <= 0):
                bound = ">= 1" if at_least_one else "> 0"
                raise ValueError(f"robust.{name} must be a finite number {bound}, got {v!r}")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 1:
            raise ValueError(f"robust.iters must be an integer >= 1, got {self.iters!r}")


@dataclass(frozen=True)
class Aggregate:
    """One shard's combined contribution and what the reducer did to get it."""

    mean: torch.Tensor  # fp32 1-D, finite
    rejected: tuple[tuple[int, str], ...]  # (member index, reason), e.g. (2, "non-finite")
    clipped: tuple[int, ...]  # members whose pull was clipped in the last iteration


def lower_median(values: Sequence[float]) -> float:
    """The lower median: with an even count, the smaller middle value."""
    s = sorted(values)
    return s[(len(s) - 1) // 2]


def cap_weights(weights: Sequence[float], cap: float) -> list[float]:
    """min(w, cap × median), the median taken over the positive weights.

    Zero weights stay zero and do not pull the median down: a member that trained nothing
    counts nothing, and must not make everybody else's weight count nothing too."""
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    positive = [w for w in weights if w > 0]
    if not positive:
        return [float(w) for w in weights]
    limit = cap * lower_median(positive)
    return [float(min(w, limit)) for w in weights]


def plain_mean(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The swarm's arithmetic: Σ x_i · (w_i / Σw) in member order from zeros, in fp32;
    the unweighted mean when Σw = 0. Bit-identical to the reducers' arithmetic before robust.py."""
    total = float(sum(weights))
    acc = torch.zeros(parts[0].numel(), dtype=torch.float32)
    for x, w in zip(parts, weights, strict=True):
        acc.add_(x.reshape(-1), alpha=w / total if total > 0 else 1 / len(parts))
    return acc


def mean_over_senders(
    mean: torch.Tensor, parts: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """Each coordinate of `mean` (a weighted mean of `parts`) divided by the weight
    fraction of the parts that are non-zero there: for sparse contributions, the mean over
    the members that sent the coordinate instead of over all of them.

    Why: a top-k member that sends a coordinate drops it from its error feedback, while the
    others, which did not send it, keep theirs for later. In a mean over all M members a
    coordinate one member sent arrives at 1/M of its value, so a round moves θ_g far less
    than a dense mean would and the outer lr had to grow with M (docs/design.md, "Codecs
    below 4 bits"). Here it arrives whole, and a coordinate everybody sent is the plain
    mean: an effective lr between 1 and M per coordinate. Coordinates nobody sent stay 0.

    Weights add up in fp64 in member order, the total in the same order, so a coordinate
    every member sent is multiplied by exactly 1.0 and stays bit for bit the mean. With
    Σw <= 0 every part counts 1, as in plain_mean's unweighted mean."""
    if sum(weights) <= 0:
        weights = [1.0] * len(weights)
    total, sent = 0.0, torch.zeros(mean.numel(), dtype=torch.float64)
    for x, w in zip(parts, weights, strict=True):
        total += w
        sent.add_((x.reshape(-1) != 0).to(torch.float64), alpha=w)
    factor = torch.where(sent > 0, total / sent.clamp_min(math.ulp(0.0)), 1.0)
    return (mean.reshape(-1).to(torch.float64) * factor).to(torch.float32)


def aggregate(
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    cfg: RobustConfig,
    over_senders: bool = False,
) -> Aggregate:
    """Combine one shard's decoded contributions (member order) robustly; see the module
    docstring for the rules. Every part must be a fp32 1-D tensor of the same length.

    over_senders: divide each coordinate by the weight fraction of the members that sent
    it (`mean_over_senders`), for sparse codecs whose contributions mostly hold zeros."""
    agg, xs, ws = _aggregate(parts, weights, cfg)
    if not over_senders or not xs:
        return agg
    return Aggregate(_finite(mean_over_senders(agg.mean, xs, ws)), agg.rejected, agg.clipped)


def _aggregate(
    parts: Sequence[torch.Tensor], weights: Sequence[float], cfg: RobustConfig
) -> tuple[Aggregate, list[torch.Tensor], list[float]]:
    """`aggregate` without the sender normalisation; also returns the contributions and
    weights that the result averages (none when it carries no update)."""
    if not parts:
        raise ValueError("aggregate needs at least one contribution")
    if len(parts) != len(weights):
        raise ValueError(f"{len(parts)} contributions but {len(weights)} weights")
    numel = parts[0].numel()
    for x in parts:
        if x.dtype != torch.float32 or x.dim() != 1 or x.numel() != numel:
            raise ValueError(f"contributions must be fp32 1-D of length {numel}")
    if not cfg.enabled or numel == 0:  # an empty shard (more members than blocks) too
        ws = [float(w) for w in weights]
        return Aggregate(plain_mean(parts, ws), (), ()), list(parts), ws

    # 1. Finite contributions with sane weights.
    rejected: list[tuple[int, str]] = []
    kept: list[int] = []
    norms: dict[int, float] = {}
    for i, (x, w) in enumerate(zip(parts, weights, strict=True)):
        if not (math.isfinite(w) and w >= 0):
            rejected.append((i, f"weight {w!r}"))
            continue
        norms[i] = _norm(x)  # finite exactly when every element is (see _norm)
        if math.isfinite(norms[i]):
            kept.append(i)
        else:
            rejected.append((i, "non-finite"))
    if not kept:  # nothing to trust: the shard carries no update this round
        return Aggregate(torch.zeros(numel, dtype=torch.float32), tuple(rejected), ()), [], []

    # 2. Weight cap.
    capped_list = cap_weights([float(weights[i]) for i in kept], cfg.weight_cap)
    capped = dict(zip(kept, capped_list, strict=True))
    if len(kept) < MIN_ROBUST:
        xs, ws = [parts[i] for i in kept], [float(weights[i]) for i in kept]
        return Aggregate(_finite(plain_mean(xs, ws)), tuple(rejected), ()), xs, ws

    # 3a. Norm outliers.
    med = lower_median([norms[i] for i in kept])
    if med > 0:  # all (or most) zero: no scale to compare with; clipping decides
        limit = cfg.reject_factor * med
        for i in list(kept):
            if norms[i] > limit:
                rejected.append((i, f"norm {norms[i]:.2g} > {cfg.reject_factor:g} x median"))
                kept.remove(i)
    rejected.sort()

    # 3b. CenteredClip from the coordinate-wise median.
    xs, ws = [parts[i] for i in kept], [capped[i] for i in kept]
    if sum(ws) <= 0:
        ws = [1.0] * len(ws)  # only zero weights left: the unweighted mean, as plain does
    mean, clipped = _centered_clip(xs, ws, cfg)
    return Aggregate(_finite(mean), tuple(rejected), tuple(kept[k] for k in clipped)), xs, ws


def _centered_clip(
    xs: list[torch.Tensor], ws: list[float], cfg: RobustConfig
) -> tuple[torch.Tensor, list[int]]:
    """CenteredClip with fixed τ; returns (center, positions clipped in the last pass)."""
    v = _coordinate_median(xs)
    diff = torch.empty_like(v)  # reused: fresh multi-MB temporaries cost page faults
    dist = [_norm(torch.sub(x, v, out=diff)) for x in xs]
    tau = cfg.clip_factor * lower_median(dist)
    total = float(sum(ws))
    clipped: list[int] = []
    at_mean = False  # v is the plain weighted mean of xs
    for it in range(cfg.iters):
        if it > 0:
            dist = [_norm(torch.sub(x, v, out=diff)) for x in xs]
        # A member at the center (distance 0) or within τ pulls with its full weight.
        scale = [1.0 if d <= tau else tau / d for d in dist]
        clipped = [k for k, c in enumerate(scale) if c < 1.0]
        if not clipped:
            # Nobody clipped: this step lands on the weighted mean. Take the plain
            # arithmetic's result itself, so honest rounds match it bit for bit. There
            # Σ w_i (x_i − v) = 0, so unless somebody is clipped at it, it is a fixed point.
            if at_mean:
                break
            v, at_mean = plain_mean(xs, ws), True
            continue
        step = torch.zeros_like(v)
        for x, w, c in zip(xs, ws, scale, strict=True):
            if w > 0 and c > 0:  # c = 0 only for an infinite distance (fp32 overflow)
                step.add_(torch.sub(x, v, out=diff), alpha=w * c / total)
        v, at_mean = v + step, False
    return v, clipped


def _coordinate_median(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per coordinate, the mean of the two middle values (the middle one for odd P)."""
    p = len(xs)
    if p <= SORT_NETWORK_MAX:
        # Odd-even transposition sort, elementwise min/max: exact like torch.sort, and
        # 4-8x faster for few members (torch's median/sort along a short dim is slow).
        s = list(xs)
        for rnd in range(p):
            for i in range(rnd % 2, p - 1, 2):
                s[i], s[i + 1] = torch.minimum(s[i], s[i + 1]), torch.maximum(s[i], s[i + 1])
        lo, hi = s[(p - 1) // 2], s[p // 2]
    else:
        s = torch.sort(torch.stack(xs, dim=1), dim=1).values
        lo, hi = s[:, (p - 1) // 2], s[:, p // 2]
    if p % 2:
        return lo.clone()
    return lo * 0.5 + hi * 0.5  # halves first: (lo + hi) could overflow


def _norm(x: torch.Tensor) -> float:
    """‖x‖, finite exactly when every element is: NaN or Inf anywhere gives NaN or inf.
    fp32 first (20x faster than fp64, and than isfinite().all()); a norm that overflows
    fp32 (elements near ±FLT_MAX) is recomputed in fp64, where it cannot."""
    n = float(torch.linalg.vector_norm(x))
    if n == math.inf:
        n = float(torch.linalg.vector_norm(x, dtype=torch.float64))
    return n


def _finite(v: torch.Tensor) -> torch.Tensor:
    """Overflow at the very edge of fp32 (rounded weights summing past 1 over ±FLT_MAX
    inputs) must not make the shard unencodable: clamp instead."""
    if math.isfinite(_norm(v)):
        return v
    return torch.nan_to_num(v, nan=0.0, posinf=FLT_MAX, neginf=-FLT_MAX)


def check_reduced(reduced: torch.Tensor, own: torch.Tensor, cfg: RobustConfig) -> str | None:
    """A member's sanity check of a reduced shard against its own contribution to it:
    None if acceptable, else the reason. Catches a lying reducer (or, with P <= 2, a
    member) that sends NaN or a vector far larger than anything honest could average to.
    A member whose own contribution is all zeros accepts only (near) zeros."""
    r, o = _norm(reduced), _norm(own)
    if not math.isfinite(r):
        return "non-finite"
    if r > cfg.max_mean_ratio * o + 1e-30:  # eps: an all-zero shard against all zeros
        return f"norm {r:.2g} > {cfg.max_mean_ratio:g} x own {o:.2g}"
    return None
