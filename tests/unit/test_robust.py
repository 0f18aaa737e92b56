"""Robust aggregation (peers/robust.py): plain arithmetic when disabled, honest rounds
untouched, bounded damage from attackers, member-side sanity check, and its use in the
in-process simulator (LocalAverager, simulate's Byzantine workers, the [robust] section)."""

from __future__ import annotations

import pytest
import torch

from compression.wire import pack, unpack
from diloco_grow.byzantine import ByzantineWorker, poisoned, worst_legal
from diloco_grow.config import ConfigError, config_from_dict
from diloco_grow.local_averager import LocalAverager, weighted_mean_encoded
from diloco_grow.outer import make_codec
from diloco_grow.simulate import SimSpec
from peers.robust import RobustConfig, aggregate, cap_weights, check_reduced, plain_mean

N = 4096
ON, OFF = RobustConfig(), RobustConfig(enabled=False)
FLT_MAX = torch.finfo(torch.float32).max


def swarm_formula(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Today's reducer arithmetic (peers/rounds.py _Accumulator, local_averager before
    robust aggregation), written out independently."""
    total = sum(weights)
    acc = torch.zeros(parts[0].numel(), dtype=torch.float32)
    for x, w in zip(parts, weights, strict=True):
        acc.add_(x, alpha=w / total if total > 0 else 1.0 / len(parts))
    return acc


def honest(p: int, noise: float = 0.3, seed: int = 0) -> list[torch.Tensor]:
    """Pseudo-gradients as DiLoCo workers send them: one shared direction plus worker
    noise (cosine ~0.95, norms within a few %, as measured on the tiny preset)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(N, generator=g)
    return [mu + noise * torch.randn(N, generator=g) for _ in range(p)]


WEIGHTS = [1.0, 1.2, 0.9, 1.1, 1.0, 0.8, 1.0, 1.05]


# ---- enabled=False is exactly today's arithmetic ------------------------------------------


@pytest.mark.parametrize("weights", [[3.0, 1.0, 2.5, 7.0], [0.0, 0.0, 0.0, 0.0], [1e-3, 5.0, 0, 2]])
def test_disabled_is_bit_identical_to_the_swarm_formula(weights):
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(1000, generator=g) * s for s in (1.0, 3.0, 1e-3, 50.0)]
    assert torch.equal(aggregate(parts, weights, OFF).mean, swarm_formula(parts, weights))
    # Also through the simulator's reducer, on int8 encodings.
    codec = make_codec("int8", 256)
    encs = [codec.encode(x) for x in parts]
    decoded = [codec.decode(e).reshape(-1) for e in encs]
    want = codec.encode(swarm_formula(decoded, weights))
    got = weighted_mean_encoded(encs, weights, "int8", 256, OFF)
    assert torch.equal(got.payload, want.payload) and torch.equal(got.scales, want.scales)


def test_disabled_keeps_a_nan_as_today():
    out = aggregate([torch.ones(4), torch.full((4,), float("nan"))], [1.0, 1.0], OFF)
    assert out.mean.isnan().all() and out.rejected == () and out.clipped == ()


# ---- honest rounds ---------------------------------------------------------------------


@pytest.mark.parametrize("p", [3, 4, 8])
def test_honest_round_is_the_plain_weighted_mean_bit_for_bit(p):
    parts, weights = honest(p), WEIGHTS[:p]
    out = aggregate(parts, weights, ON)
    assert out.rejected == () and out.clipped == ()
    assert torch.equal(out.mean, swarm_formula(parts, weights))


def test_heterogeneous_honest_round_stays_close_to_the_plain_mean():
    # Peers 3x apart in speed: weights 1..3 (under the cap), noise 0.2..0.6.
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(N, generator=g)
    parts = [
        mu * s + n * torch.randn(N, generator=g)
        for s, n in ((1, 0.2), (1.5, 0.6), (2, 0.3), (0.8, 0.5), (1.2, 0.4))
    ]
    weights = [1.0, 2.0, 3.0, 1.0, 1.5]
    plain = swarm_formula(parts, weights)
    out = aggregate(parts, weights, ON)
    assert out.rejected == ()
    assert (out.mean - plain).norm() <= 0.02 * plain.norm()


def test_deterministic():
    parts = honest(4)
    parts[3] = -4 * parts[3]
    a, b = aggregate(parts, WEIGHTS[:4], ON), aggregate(parts, WEIGHTS[:4], ON)
    assert torch.equal(a.mean, b.mean) and a.clipped == b.clipped == (3,)


# ---- attackers -------------------------------------------------------------------------


def int8_poison() -> torch.Tensor:
    """The worst a member can put on the wire with int8: code -128 at the largest scale."""
    codec = make_codec("int8", 256)
    enc = unpack(pack(worst_legal(codec, N)))  # the wire accepts it
    return codec.decode(enc).reshape(-1)


ATTACKS = {
    "sign-flip": lambda x: -4 * x,
    "scaled-1e6": lambda x: 1e6 * x,
    "nan": lambda x: torch.full_like(x, float("nan")),
    "int8-poison": lambda x: int8_poison(),
}


@pytest.mark.parametrize("p,f", [(4, 1), (8, 2)])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attackers_move_the_mean_by_less_than_the_honest_spread(p, f, attack):
    parts, weights = honest(p), WEIGHTS[:p]
    h = swarm_formula(parts[: p - f], weights[: p - f])  # what the honest members agree on
    spread = min((x - h).norm() for x in parts[: p - f])  # an honest member's own error
    sent = parts[: p - f] + [ATTACKS[attack](x) for x in parts[p - f :]]
    out = aggregate(sent, weights, ON)
    plain = swarm_formula(sent, weights)
    assert torch.isfinite(out.mean).all()
    assert not torch.isfinite(plain).all() or (plain - h).norm() > h.norm()  # plain breaks
    attackers = set(range(p - f, p))
    if attack == "sign-flip":  # a plausible norm (4x): clipped, not rejected
        assert out.rejected == () and set(out.clipped) == attackers
        # measured 0.89 (4 members) and 0.78 (8 members) spreads, about 0.2 |h|
        assert (out.mean - h).norm() <= 1.0 * spread
    else:  # absurd or non-finite: rejected outright, the rest is the honest mean exactly
        assert {k for k, _ in out.rejected} == attackers and out.clipped == ()
        assert torch.equal(out.mean, h)
    if attack == "nan":
        assert {why for _, why in out.rejected} == {"non-finite"}
    if attack == "scaled-1e6":
        assert all(why.startswith("norm ") and "> 10 x median" in why for _, why in out.rejected)


def test_a_claimed_huge_weight_is_capped():
    parts = honest(4)
    h = swarm_formula(parts[:3], WEIGHTS[:3])
    spread = min((x - h).norm() for x in parts[:3])
    sent = parts[:3] + [-4 * parts[3]]
    weights = WEIGHTS[:3] + [1e12]
    plain = swarm_formula(sent, weights)
    out = aggregate(sent, weights, ON)
    assert (plain - h).norm() > 4 * h.norm()
    # Capped at 4x the median weight the attacker still holds 4/7 of the weight (more than
    # all honest members): clipping bounds it to a few spreads (measured 2.8), not less.
    assert (out.mean - h).norm() <= 3.5 * spread


def test_cap_weights():
    assert cap_weights([1, 1, 1, 1e12], 4) == [1, 1, 1, 4]
    assert cap_weights([1, 100], 4) == [1, 4]  # lower median: the smaller of two
    assert cap_weights([0, 0, 0, 5], 4) == [0, 0, 0, 5]  # zeros neither count nor pull down
    assert cap_weights([0.0, 0.0], 4) == [0.0, 0.0]
    with pytest.raises(ValueError, match="finite and >= 0"):
        cap_weights([1.0, -1.0], 4)


# ---- degenerate rounds -----------------------------------------------------------------


def test_one_member():
    x = torch.randn(N)
    assert torch.equal(aggregate([x], [5.0], ON).mean, swarm_formula([x], [5.0]))
    out = aggregate([torch.full((N,), float("nan"))], [5.0], ON)
    assert torch.equal(out.mean, torch.zeros(N)) and out.rejected == ((0, "non-finite"),)


def test_two_members_only_finiteness_applies():
    a, b = torch.randn(N), torch.randn(N)
    # No majority: even a sign-flipped 4x vector with a huge weight is averaged (the
    # members' check of the reduced shard is the defence here); an honest late joiner's
    # few steps keep their small weight.
    out = aggregate([a, -4 * b], [1.0, 1e9], ON)
    assert torch.equal(out.mean, swarm_formula([a, -4 * b], [1.0, 1e9]))
    late = aggregate([a, b], [1.0, 60.0], ON)
    assert torch.equal(late.mean, swarm_formula([a, b], [1.0, 60.0]))
    nan = aggregate([a, torch.full((N,), float("nan"))], [1.0, 1.0], ON)
    assert torch.equal(nan.mean, a) and nan.rejected == ((1, "non-finite"),)


def test_all_zero_contributions_and_zero_weights():
    zeros = [torch.zeros(N) for _ in range(4)]
    out = aggregate(zeros, [1.0] * 4, ON)
    assert torch.equal(out.mean, torch.zeros(N)) and out.rejected == () and out.clipped == ()
    parts = honest(4)
    out = aggregate(parts, [0.0] * 4, ON)  # nobody trained: the unweighted mean, as today
    assert torch.equal(out.mean, swarm_formula(parts, [0.0] * 4))
    # Most members' shard is untouched (zeros) and one moved it: the majority view wins.
    out = aggregate(zeros[:3] + [parts[0]], [1.0] * 4, ON)
    assert torch.equal(out.mean, torch.zeros(N)) and out.clipped == (3,)


def test_a_poisoned_majority_still_gives_a_finite_mean():
    bad = int8_poison()
    out = aggregate([bad, bad.clone(), bad.clone(), torch.randn(N)], [1.0] * 4, ON)
    assert torch.isfinite(out.mean).all()
    out = aggregate([bad, -bad, bad], [1.0] * 3, ON)
    assert torch.isfinite(out.mean).all()


def test_empty_shard():
    out = aggregate([torch.zeros(0)] * 3, [1.0] * 3, ON)
    assert out.mean.numel() == 0


def test_input_validation():
    with pytest.raises(ValueError, match="at least one"):
        aggregate([], [], ON)
    with pytest.raises(ValueError, match="weights"):
        aggregate([torch.zeros(3)], [1.0, 2.0], ON)
    with pytest.raises(ValueError, match="fp32 1-D"):
        aggregate([torch.zeros(3), torch.zeros(4)], [1.0, 1.0], ON)
    out = aggregate(honest(4), [1.0, float("nan"), 1.0, -2.0], ON)
    assert [k for k, _ in out.rejected] == [1, 3]


# ---- the member-side check -------------------------------------------------------------


def test_check_reduced():
    parts = honest(4)
    mean = plain_mean(parts, WEIGHTS[:4])
    assert all(check_reduced(mean, x, ON) is None for x in parts)
    assert check_reduced(1e6 * mean, parts[0], ON).startswith("norm ")
    assert check_reduced(int8_poison(), parts[0], ON).startswith("norm ")
    assert check_reduced(torch.full((N,), float("nan")), parts[0], ON) == "non-finite"
    assert check_reduced(torch.zeros(N), torch.zeros(N), ON) is None


# ---- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("weight_cap", 0.5),
        ("clip_factor", 0.0),
        ("reject_factor", float("inf")),
        ("max_mean_ratio", -1.0),
        ("iters", 0),
        ("enabled", "yes"),
        ("clip_factor", float("nan")),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"robust.{field}"):
        RobustConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"robust.{field}"):
        config_from_dict({"robust": {field: value}})


def test_robust_section_of_the_run_config():
    cfg = config_from_dict({"robust": {"enabled": False, "clip_factor": 3.0}})
    assert cfg.robust == RobustConfig(enabled=False, clip_factor=3.0)
    assert config_from_dict(cfg.to_dict()).robust == cfg.robust
    assert config_from_dict({}).robust == RobustConfig()  # robust by default


# ---- the simulator ---------------------------------------------------------------------


def test_byzantine_kinds_and_validation():
    delta, gen = torch.randn(N), torch.Generator().manual_seed(0)
    assert torch.equal(poisoned(delta, "sign-flip", gen), -4 * delta)
    assert torch.equal(poisoned(delta, "scaled", gen), 100 * delta)
    noise = poisoned(delta, "noise", gen)
    assert abs(noise.norm() / delta.norm() - 10) < 1e-3
    assert poisoned(delta, "nan", gen).isnan().all()
    with pytest.raises(ValueError, match="kind"):
        SimSpec(workers=4, byzantine=(1, "evil"))
    with pytest.raises(ValueError, match="count"):
        SimSpec(workers=4, byzantine=(4, "nan"))


def test_local_averager_rejects_a_nan_worker(tmp_path):
    from diloco_grow.data import load_corpus
    from diloco_grow.worker import GlobalState, Worker

    cfg = config_from_dict({"preset": "tiny", "inner": {"steps": 2, "batch_size": 2}})
    corpus = load_corpus()
    g = GlobalState.init(cfg)
    kw = {"n_workers": 4, "total_inner_steps": 2}
    workers = [Worker(cfg, g, corpus, worker=w, **kw) for w in range(3)]
    workers.append(ByzantineWorker(cfg, g, corpus, worker=3, kind="nan", **kw))
    for w in workers:
        w.inner_phase(2)
    contribs = [w.contribution(g) for w in workers]
    robust = LocalAverager("int8", 256)  # robust by default
    res = robust.average(contribs, step=0, params_hash=g.hash())
    assert torch.isfinite(res.mean).all() and res.mean.abs().max() < 1
    assert set(robust.rejected) == {3} and robust.clipped == set()
    honest_only = LocalAverager("int8", 256, OFF).average(contribs[:3], step=0, params_hash="")
    # Each shard: the three honest contributions, reduced exactly as without the attacker
    # (the shards are cut differently for 3 and 4 members, hence a codec step of slack).
    assert (res.mean - honest_only.mean).abs().max() <= 2 * honest_only.mean.abs().max() / 127
    plain = LocalAverager("int8", 256, OFF).average(contribs, step=0, params_hash="")
    assert plain.mean.abs().max() > 1e37


def test_mean_over_senders_counts_only_the_members_that_sent_a_coordinate():
    """Coordinate 0: only member 0 (weight 1) sent it; 1: members 0 and 1; 2: everybody;
    3: nobody. Over all members a lone sender's value arrives at w/Σw of itself; over its
    senders it arrives whole, and a coordinate everybody sent keeps the mean bit for bit."""
    parts = [torch.tensor([2.0, 1.0, 0.3, 0.0]), torch.tensor([0.0, 3.0, 0.7, 0.0]),
             torch.tensor([0.0, 0.0, 0.1, 0.0])]
    weights = [1.0, 3.0, 4.0]
    for cfg in (ON, OFF):  # 3 members: the robust path; and the plain one
        mean = aggregate(parts, weights, cfg).mean
        got = aggregate(parts, weights, cfg, over_senders=True).mean
        assert got[0].item() == pytest.approx(2.0, rel=1e-6)  # was 2 · 1/8
        assert mean[0].item() == pytest.approx(0.25, rel=1e-6)
        assert got[1].item() == pytest.approx((1.0 * 1 + 3.0 * 3) / 4, rel=1e-6)
        assert got[2].item() == mean[2].item()  # every member sent it: exactly the mean
        assert got[3].item() == 0.0
    # dense contributions (int8, fp32): nothing to normalise, the result is unchanged
    xs = honest(5)
    for cfg in (ON, OFF):
        a, b = aggregate(xs, [1, 2, 3, 4, 5], cfg), aggregate(xs, [1, 2, 3, 4, 5], cfg, True)
        assert torch.equal(a.mean, b.mean)


def test_mean_over_senders_ignores_rejected_members_and_zero_weights():
    """A NaN member is rejected before anyone counts senders, so it cannot dilute (or
    inflate) the honest ones; a zero-weight sender counts nothing; all-zero weights fall
    back to the unweighted mean, as plain_mean does."""
    honest_parts = [torch.tensor([1.0, 0.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 0.0, 2.0]),
                    torch.tensor([0.0, 0.0, 1.0, 2.0])]
    nan = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    agg = aggregate([*honest_parts, nan], [1.0] * 4, ON, over_senders=True)
    assert agg.rejected == ((3, "non-finite"),) and agg.clipped == ()
    assert agg.mean.tolist() == pytest.approx([1.0, 1.0, 1.0, 2.0], rel=1e-6)  # not 3/4
    two = aggregate(honest_parts[:2], [1.0, 0.0], OFF, over_senders=True)
    assert two.mean.tolist() == [1.0, 0.0, 0.0, 2.0]  # member 1 has weight 0: it counts nothing
    zero = aggregate(honest_parts, [0.0, 0.0, 0.0], OFF, over_senders=True)
    assert zero.mean.tolist() == pytest.approx([1.0, 1.0, 1.0, 2.0], rel=1e-6)


def test_over_senders_reach_of_a_lone_attacker_is_bounded_by_clipping_not_weight():
    """With the senders' mean, a member's coordinates that nobody else sent arrive whole
    (divided by its own weight fraction), so its claimed weight no longer bounds them;
    CenteredClip does: its pull is at most τ = clip_factor × the median distance per
    iteration. Here 4 honest sparse members (disjoint supports) and one attacker at 9× the
    median norm (under reject_factor) on coordinates of its own: robust, its reach stays
    within iters × τ at any claimed weight, and a tiny weight buys nothing more; with the
    robust rules off it lands whole (9×)."""
    g = torch.Generator().manual_seed(0)
    xs = []
    for i in range(4):
        x = torch.zeros(N)
        x[i * 64 : (i + 1) * 64] = torch.randn(64, generator=g)
        xs.append(x)
    norms = sorted(float(x.norm()) for x in xs)
    attack = torch.zeros(N)
    attack[1000:1064] = 1.0
    attack *= 9 * norms[1] / float(attack.norm())
    reach = {}
    for w in (1e-6, 1.0, ON.weight_cap):
        got = aggregate([*xs, attack], [1.0] * 4 + [w], ON, over_senders=True)
        assert got.rejected == () and got.clipped == (4,)
        reach[w] = float(got.mean[1000:1064].norm())
        assert reach[w] <= ON.iters * ON.clip_factor * norms[-1]
        off = aggregate([*xs, attack], [1.0] * 4 + [w], OFF, over_senders=True)
        assert float(off.mean[1000:1064].norm()) == pytest.approx(9 * norms[1], rel=1e-5)
    assert reach[1e-6] <= reach[1.0] <= reach[ON.weight_cap]
