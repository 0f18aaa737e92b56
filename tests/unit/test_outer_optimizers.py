"""Outer optimizer choices: Adam vs a reference, SGD without momentum, the lr warmup,
growth remap of every buffer, checkpoints (and old ones), untrusted served state, config."""

from __future__ import annotations

import math

import pytest
import torch

from diloco_grow import checkpoint as ckpt
from diloco_grow.config import ConfigError, build_config, config_from_dict, load_config
from diloco_grow.data import load_corpus
from diloco_grow.growth import GrowthEvent, flat_index_map
from diloco_grow.local_averager import LocalAverager
from diloco_grow.loop import outer_round
from diloco_grow.metrics import read_jsonl
from diloco_grow.outer import OuterAdam, OuterSGD, warmup_lr, warmup_momentum
from diloco_grow.simulate import SimSpec, simulate
from diloco_grow.worker import GlobalState, Worker


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def cfg_for(**outer):
    return config_from_dict(
        {
            "preset": "tiny",
            "inner": {"steps": 3, "batch_size": 4, "warmup_steps": 2},
            "outer": {"compression": "none", "error_feedback": False, **outer},
        }
    )


def adam_reference(theta, deltas, lr, b1, b2, eps):
    """Adam written out by hand in float64, one line per formula."""
    theta = theta.double().clone()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for k, d in enumerate(deltas, start=1):
        d = d.double()
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        m_hat = m / (1 - b1**k)
        v_hat = v / (1 - b2**k)
        theta = theta - lr * m_hat / (v_hat.sqrt() + eps)
    return theta


def test_adam_matches_hand_written_reference_and_torch():
    torch.manual_seed(0)
    theta0 = torch.randn(1000)
    deltas = [torch.randn(1000) * 10**-i for i in range(3)]  # shrinking: v̂ must track it
    ours, theta = OuterAdam(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8), theta0.clone()
    for t, d in enumerate(deltas):
        ours.step(theta, d, t)
    ref = adam_reference(theta0, deltas, 0.05, 0.9, 0.99, 1e-8)
    torch.testing.assert_close(theta.double(), ref, rtol=0, atol=1e-6)
    assert ours.steps_taken == 3
    # torch.optim.Adam places ε the same way (after the bias-corrected √v).
    p = torch.nn.Parameter(theta0.clone())
    adam = torch.optim.Adam([p], lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    for d in deltas:
        p.grad = d.clone()
        adam.step()
    torch.testing.assert_close(theta, p.detach(), rtol=0, atol=1e-6)
    # β1 = 0 (momentum 0): m̂ is the last Δ̄ itself.
    a, th = OuterAdam(lr=0.1, beta1=0.0, beta2=0.99), theta0.clone()
    for t, d in enumerate(deltas):
        a.step(th, d, t)
    torch.testing.assert_close(
        th.double(), adam_reference(theta0, deltas, 0.1, 0.0, 0.99, 1e-8), rtol=0, atol=1e-6
    )


def test_adam_is_deterministic_bit_for_bit():
    torch.manual_seed(1)
    theta0, deltas = torch.randn(4097), [torch.randn(4097) for _ in range(3)]
    runs = []
    for _ in range(2):
        opt, theta = OuterAdam(lr=0.1), theta0.clone()
        for t, d in enumerate(deltas):
            opt.step(theta, d, t)
        runs.append(theta)
    assert torch.equal(runs[0], runs[1])


def test_sgd_momentum_zero_is_the_plain_step():
    theta, d = torch.full((3,), 3.0), torch.tensor([1.0, -2.0, 0.5])
    OuterSGD(lr=0.5, momentum=0.0).step(theta, d, 0)
    assert torch.equal(theta, torch.tensor([2.5, 4.0, 2.75]))  # exact: no rounding here
    torch.manual_seed(2)
    theta0, d = torch.randn(1000), torch.randn(1000)
    opt, theta = OuterSGD(lr=0.7, momentum=0.0), theta0.clone()
    for t in range(3):  # no state: every step is θ − η Δ̄
        before = theta.clone()
        opt.step(theta, d, t)
        torch.testing.assert_close(theta, before - 0.7 * d, rtol=0, atol=1e-6)
    assert opt.state_dict() == {}


@pytest.mark.parametrize(
    "make", [lambda n: OuterSGD(0.5, 0.9, True, n), lambda n: OuterAdam(0.5, warmup_steps=n)]
)
def test_warmup_scales_the_first_updates_exactly(make):
    """lr·(t+1)/N for t < N, then lr. η = 0.5 and N = 4 make every factor a power of two,
    so the scaled update is exact and compared bit for bit with the unscaled one."""
    assert [warmup_lr(0.5, 4, t) for t in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert warmup_lr(0.5, 0, 0) == 0.5
    torch.manual_seed(3)
    deltas = [torch.randn(100) for _ in range(5)]
    warm, flat = make(4), make(0)
    for t, d in enumerate(deltas):
        a, b = torch.zeros(100), torch.zeros(100)  # from 0, θ after the step is −update
        warm.step(a, d, t)
        flat.step(b, d, t)
        scale = min(1.0, (t + 1) / 4)
        if scale in (0.25, 0.5, 1.0):
            assert torch.equal(a, b * scale)
        else:
            torch.testing.assert_close(a, b * scale, rtol=1e-6, atol=0)
    # The buffers do not see the ramp: only the step size does.
    for k, v in warm.buffers().items():
        assert torch.equal(v, flat.buffers()[k])


def test_momentum_warmup_ramps_mu_then_is_plain_nesterov():
    """μ_t = μ·(t+1)/N for t < N, then μ: checked against the recurrence written out by
    hand in float64, and the ramp really changes the steps (it is not a no-op)."""
    assert [warmup_momentum(0.6, 4, t) for t in range(6)] == [0.15, 0.3, 0.44999999999999996,
                                                               0.6, 0.6, 0.6]
    assert warmup_momentum(0.6, 0, 0) == 0.6
    torch.manual_seed(5)
    deltas = [torch.randn(200) for _ in range(7)]
    ours, plain = OuterSGD(0.7, 0.6, True, 0, 4), OuterSGD(0.7, 0.6, True, 0, 0)
    a, b = torch.zeros(200), torch.zeros(200)
    ref, buf = torch.zeros(200, dtype=torch.float64), None
    for t, d in enumerate(deltas):
        ours.step(a, d, t)
        plain.step(b, d, t)
        mu = 0.6 * min(1.0, (t + 1) / 4)
        buf = d.double() if buf is None else mu * buf + d.double()
        ref = ref - 0.7 * (d.double() + mu * buf)
    torch.testing.assert_close(a.double(), ref, rtol=0, atol=1e-5)
    assert (a - b).abs().max() > 0.1
    assert ours.hparams()["momentum_warmup_steps"] == 4


def test_sgd_checkpoint_keeps_the_ramp_and_old_meta_runs_without_it():
    g = GlobalState.init(cfg_for(lr=0.7, momentum=0.6, momentum_warmup_steps=6))
    d = torch.full_like(g.theta, 1e-3)
    g.outer_step(d)
    tensors, meta = ckpt.global_tensors_meta(g)
    assert meta["outer"]["momentum_warmup_steps"] == 6
    g2 = _served(tensors, meta)
    assert g2.outer.momentum_warmup_steps == 6
    g.outer_step(d * 2)
    g2.outer_step(d * 2)
    assert g.hash() == g2.hash()
    del meta["outer"]["momentum_warmup_steps"]  # as written before the ramp existed
    assert _served(tensors, meta).outer.momentum_warmup_steps == 0


def test_global_state_passes_its_step_to_the_warmup():
    g = GlobalState.init(cfg_for(lr=0.5, momentum=0.0, warmup_steps=4))
    d = torch.full_like(g.theta, 0.25)
    for t in range(5):
        before = g.theta.clone()
        g.outer_step(d)
        assert g.step == t + 1
        torch.testing.assert_close(before - g.theta, d * warmup_lr(0.5, 4, t), rtol=0, atol=1e-6)


def test_adam_buffers_follow_the_growth_index_map():
    c = cfg_for(optimizer="adam", lr=0.01)
    g = GlobalState.init(c)
    torch.manual_seed(4)
    g.outer_step(torch.randn_like(g.theta) * 1e-3)
    g.outer_step(torch.randn_like(g.theta) * 1e-3)
    old = {k: v.clone() for k, v in g.outer.buffers().items()}
    assert set(old) == {"momentum", "second_moment"}
    # Depth growth with zeroed outputs: copies map to their source, the zeroed output
    # projections to -1 (their buffers must start at 0).
    ev = GrowthEvent(kind="depth", factor=2, zero_output=True)
    index_map = g.grow(ev)
    assert torch.equal(index_map, flat_index_map(c.model, ev))
    keep = index_map >= 0
    assert (~keep).any()
    for k, v in g.outer.buffers().items():
        assert v.numel() == g.theta.numel()
        assert torch.equal(v[keep], old[k][index_map[keep]])
        assert (v[~keep] == 0).all()
    assert g.outer.steps_taken == 2
    g.outer_step(torch.randn_like(g.theta) * 1e-3)
    assert torch.isfinite(g.theta).all() and g.outer.steps_taken == 3


def adam_state(steps=2):
    g = GlobalState.init(
        cfg_for(optimizer="adam", lr=0.01, momentum=0.8, beta2=0.95, eps=1e-6, warmup_steps=3)
    )
    torch.manual_seed(5)
    for _ in range(steps):
        g.outer_step(torch.randn_like(g.theta) * 1e-3)
    return g


def test_adam_checkpoint_round_trip():
    g = adam_state()
    tensors, meta = ckpt.global_tensors_meta(g)
    assert meta["outer"] == {
        "optimizer": "adam",
        "lr": 0.01,
        "momentum": 0.8,
        "beta2": 0.95,
        "eps": 1e-6,
        "warmup_steps": 3,
    }
    blob = ckpt.pack_state(tensors, meta)
    assert len(blob) <= ckpt.max_state_bytes(g.model_cfg)
    g2 = ckpt.global_from(*ckpt.unpack_state(blob))
    assert isinstance(g2.outer, OuterAdam) and g2.outer.hparams() == g.outer.hparams()
    assert g2.outer.steps_taken == 2 and g2.step == 2
    for k, v in g.outer.buffers().items():
        assert torch.equal(g2.outer.buffers()[k], v)
    # Both continue bit-identically (the loaded one is what a joining peer would run).
    d = torch.randn_like(g.theta) * 1e-3
    g.outer_step(d)
    g2.outer_step(d)
    assert g.hash() == g2.hash()


def test_old_sgd_meta_loads_with_defaults():
    g = GlobalState.init(cfg_for(lr=0.7, momentum=0.9))
    g.outer_step(torch.full_like(g.theta, 1e-3))
    tensors, meta = ckpt.global_tensors_meta(g)
    meta["outer"] = {"lr": 0.7, "momentum": 0.9, "nesterov": False}  # as written before
    g2 = ckpt.global_from(*ckpt.unpack_state(ckpt.pack_state(tensors, meta)))
    assert isinstance(g2.outer, OuterSGD) and not g2.outer.nesterov
    assert g2.outer.warmup_steps == 0 and torch.equal(g2.outer.buf, g.outer.buf)
    assert g2.outer.momentum_warmup_steps == 0
    assert set(tensors) == {"theta_g", "outer.momentum"}  # sgd's state is what it was


def _served(tensors, meta):
    return ckpt.global_from(*ckpt.unpack_state(ckpt.pack_state(tensors, meta)))


@pytest.mark.parametrize(
    "change, msg",
    [
        (lambda t, m: t.update({"outer.second_moment": torch.ones(7)}), "shape"),
        (lambda t, m: t["outer.momentum"].__setitem__(0, math.nan), "not finite"),
        (lambda t, m: t["outer.second_moment"].__setitem__(3, -1.0), "negative"),
        (lambda t, m: t.pop("outer.t"), "needs momentum, second_moment and t"),
        (lambda t, m: t.update({"outer.t": torch.tensor([0])}), "step count"),
        (lambda t, m: t.update({"outer.t": torch.tensor([1.5])}), "step count"),
        (lambda t, m: m["outer"].update(optimizer="rmsprop"), "outer.optimizer"),
        (lambda t, m: m["outer"].update(beta2=1.0), "outer.beta2"),
        (lambda t, m: m["outer"].update(eps=-1.0), "outer.eps"),
        (lambda t, m: m["outer"].update(lr=math.inf), "outer.lr"),
        (lambda t, m: m["outer"].update(optimizer="sgd"), "unexpected outer state"),
    ],
)
def test_served_state_with_bad_outer_state_is_rejected(change, msg):
    tensors, meta = ckpt.global_tensors_meta(adam_state())
    tensors = {k: v.clone() for k, v in tensors.items()}
    change(tensors, meta)
    with pytest.raises(ckpt.CheckpointError, match=msg):
        _served(tensors, meta)


def test_max_state_bytes_holds_theta_and_two_buffers():
    cfg = cfg_for().model
    n = ckpt.max_params(cfg)
    assert n >= sum(p.numel() for p in ckpt._shapes(cfg))
    assert ckpt.max_state_bytes(cfg) == 3 * 4 * n + (16 << 20)


@pytest.mark.parametrize(
    "outer, msg",
    [
        ({"optimizer": "adamw"}, "outer.optimizer"),
        ({"optimizer": 1}, "outer.optimizer"),
        ({"beta2": 1.0}, "outer.beta2"),
        ({"beta2": -0.1}, "outer.beta2"),
        ({"beta2": "0.99"}, "outer.beta2"),
        ({"eps": 0.0}, "outer.eps"),
        ({"eps": math.nan}, "outer.eps"),
        ({"warmup_steps": -1}, "outer.warmup_steps"),
        ({"warmup_steps": 2.5}, "outer.warmup_steps"),
        ({"warmup_steps": True}, "outer.warmup_steps"),
        ({"momentum_warmup_steps": -1}, "outer.momentum_warmup_steps"),
        ({"momentum_warmup_steps": 2.5}, "outer.momentum_warmup_steps"),
        ({"momentum_warmup_steps": "10"}, "outer.momentum_warmup_steps"),
        ({"error_feedback_decay": 0.0}, "outer.error_feedback_decay"),
        ({"error_feedback_decay": 1.01}, "outer.error_feedback_decay"),
        ({"error_feedback_decay": math.nan}, "outer.error_feedback_decay"),
        ({"error_feedback_decay": "0.95"}, "outer.error_feedback_decay"),
        ({"nesterov": "yes"}, "outer.nesterov"),
        ({"lr": math.inf}, "outer.lr"),
        ({"lr": "0.7"}, "outer.lr"),
    ],
)
def test_bad_outer_values_give_clear_errors(outer, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict({"outer": outer})


def test_outer_fields_load_from_toml_and_overrides(tmp_path):
    defaults = config_from_dict({}).outer
    assert defaults.optimizer == "sgd"  # the tuned lr and momentum: test_shipped_defaults.py
    assert (defaults.beta2, defaults.eps, defaults.warmup_steps) == (0.99, 1e-8, 0)
    p = tmp_path / "run.toml"
    p.write_text(
        '[outer]\noptimizer = "adam"\nlr = 0.05\nbeta2 = 0.95\neps = 1e-6\nwarmup_steps = 5\n'
    )
    o = load_config(p).outer
    assert (o.optimizer, o.lr, o.beta2, o.eps, o.warmup_steps) == ("adam", 0.05, 0.95, 1e-6, 5)
    assert isinstance(GlobalState.init(load_config(p)).outer, OuterAdam)
    o2 = build_config(p, None, {"outer.optimizer": "sgd", "outer.warmup_steps": 0}).outer
    assert (o2.optimizer, o2.warmup_steps, o2.beta2) == ("sgd", 0, 0.95)
    (tmp_path / "bad.toml").write_text('[outer]\noptimizer = "lion"\n')
    with pytest.raises(ConfigError, match="outer.optimizer must be one of"):
        load_config(tmp_path / "bad.toml")


def test_simulate_with_outer_adam_and_resume(tmp_path, corpus):
    cfg = cfg_for(optimizer="adam", lr=0.01, momentum=0.9, warmup_steps=2)
    full = simulate(
        cfg, SimSpec(workers=2, outer_steps=2, out_dir=str(tmp_path / "a"), progress=False), corpus
    )
    recs = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["val_loss"]) for r in recs)
    assert full["outer_steps"] == 2
    g = ckpt.load_trained_model(tmp_path / "a")[1]
    assert isinstance(g.outer, OuterAdam) and g.outer.steps_taken == 2
    assert g.hash() == full["params_hash"]
    # Interrupted after step 1, resumed: the Adam moments and count came through intact.
    spec = SimSpec(workers=2, outer_steps=2, out_dir=str(tmp_path / "b"), progress=False)
    simulate(cfg, SimSpec(**{**spec.__dict__, "stop_after": 1}), corpus)
    resumed = simulate(cfg, SimSpec(**{**spec.__dict__, "resume": True}), corpus)
    assert resumed["params_hash"] == full["params_hash"]


def test_ef_decay_reaches_each_worker_and_changes_only_what_it_sends(corpus):
    """A worker's error-feedback decay (SparseLoCo) is its own: θ_g after the first
    round is the same (the residual is still empty), after the second it differs."""
    hashes = {}
    for decay in (1.0, 0.8):
        cfg = cfg_for(compression="topk", error_feedback=True, error_feedback_decay=decay,
                      momentum=0.0, lr=1.0)
        g = GlobalState.init(cfg)
        w = Worker(cfg, g, corpus, total_inner_steps=6)
        assert w.feedback is not None and w.feedback.decay == decay
        averager = LocalAverager(cfg.outer.compression, cfg.outer.block_size, cfg.robust)
        hashes[decay] = []
        for _ in range(2):
            w.inner_phase(3)
            outer_round(g, [w], averager)
            hashes[decay].append(g.hash())
    assert hashes[1.0][0] == hashes[0.8][0]
    assert hashes[1.0][1] != hashes[0.8][1]
