"""DiLoCo semantics: FedAvg equivalence, identical workers, Nesterov, sign, int8 vs fp32."""

from __future__ import annotations

import pytest
import torch

from diloco_grow.config import config_from_dict
from diloco_grow.data import load_corpus
from diloco_grow.local_averager import LocalAverager
from diloco_grow.model import MoETransformer
from diloco_grow.outer import OuterSGD, assign_flat, flatten_params, pseudo_gradient
from diloco_grow.simulate import SimSpec, simulate
from diloco_grow.train import InnerTrainer
from diloco_grow.worker import GlobalState, Worker


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def cfg_for(**sections):
    base = {
        "preset": "tiny",
        "inner": {"steps": 3, "batch_size": 4, "warmup_steps": 2},
        "outer": {"compression": "none", "lr": 1.0, "momentum": 0.0, "error_feedback": False},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(base)


def run_rounds(cfg, corpus, workers: list[Worker], g: GlobalState, rounds: int) -> None:
    avg = LocalAverager(cfg.outer.compression, cfg.outer.block_size)
    for _ in range(rounds):
        for w in workers:
            w.inner_phase(cfg.inner.steps)
        res = avg.average([w.contribution(g) for w in workers], step=g.step, params_hash=g.hash())
        g.outer_step(res.mean)
        for w in workers:
            w.sync_to(g)


def test_one_worker_fedavg_equals_plain_training(corpus):
    """η=1, μ=0, no compression, one worker: DiLoCo is plain AdamW training.

    θ_g − (θ_g − θ) equals θ exactly whenever θ_g and θ are within a factor of two
    (Sterbenz); elsewhere (parameters crossing zero) it is off by at most one rounding
    of the subtraction, so we assert bit-equality for nearly all and ≤ 1 ulp for all."""
    cfg = cfg_for()
    g = GlobalState.init(cfg)
    w = Worker(cfg, g, corpus, total_inner_steps=12)
    torch.manual_seed(cfg.seed)
    plain = MoETransformer(cfg.model)
    ref = InnerTrainer(plain, cfg.inner, Worker(cfg, g, corpus).inner.stream, 12)
    theta_0 = g.theta.clone()
    assert torch.equal(theta_0, flatten_params(plain))
    run_rounds(cfg, corpus, [w], g, rounds=1)
    ref.run(3)
    theta = flatten_params(plain)
    scale = theta_0.abs() + 2 * theta.abs()  # |Δ| + |θ| bounds both roundings
    assert ((g.theta - theta).abs() <= torch.finfo(torch.float32).eps * scale).all()
    assert (g.theta == theta).float().mean() > 0.97
    # Over several rounds the training curves coincide.
    for _ in range(3):
        assign_flat(plain, g.theta)  # re-align, then compare the next round's losses
        loss_plain = ref.run(3).loss
        loss_diloco = w.inner_phase(3).loss
        res = LocalAverager("none", 256).average(
            [w.contribution(g)], step=g.step, params_hash=g.hash()
        )
        g.outer_step(res.mean)
        w.sync_to(g)
        assert abs(loss_plain - loss_diloco) < 1e-6


def test_identical_workers_equal_one_worker(corpus):
    cfg = cfg_for(outer={"lr": 0.7, "momentum": 0.9})
    g1, g4 = GlobalState.init(cfg), GlobalState.init(cfg)
    one = [Worker(cfg, g1, corpus, worker=0)]
    # Four workers drawing the very same batches (same data worker id 0).
    four = [Worker(cfg, g4, corpus, worker=0) for _ in range(4)]
    run_rounds(cfg, corpus, one, g1, rounds=3)
    run_rounds(cfg, corpus, four, g4, rounds=3)
    assert torch.equal(g1.theta, g4.theta)


def test_outer_step_matches_torch_sgd_nesterov():
    torch.manual_seed(0)
    theta = torch.randn(1000)
    p = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    ours = OuterSGD(lr=0.7, momentum=0.9, nesterov=True)
    for t in range(5):
        delta = torch.randn(1000)
        p.grad = delta.clone()
        sgd.step()
        ours.step(theta, delta, t)
    torch.testing.assert_close(theta, p.detach(), rtol=0, atol=1e-6)
    # and by hand for one step from zero momentum: θ − η(Δ + μΔ)
    t, d = torch.ones(3), torch.tensor([1.0, -2.0, 0.5])
    OuterSGD(0.7, 0.9, True).step(t, d, 0)
    torch.testing.assert_close(t, 1 - 0.7 * (d + 0.9 * d))


def test_pseudo_gradient_sign_moves_theta_g_towards_workers():
    model = torch.nn.Linear(4, 4)
    theta_g = flatten_params(model)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(1.0)  # the worker moved every parameter up by 1
    delta = pseudo_gradient(theta_g, model)
    assert torch.allclose(delta, -torch.ones_like(delta))
    OuterSGD(lr=0.5, momentum=0.0).step(theta_g, delta, 0)
    assert torch.allclose(theta_g, flatten_params(model) - 0.5)


def test_int8_path_within_codec_error_of_fp32(corpus):
    cfg32 = cfg_for(outer={"lr": 0.7, "momentum": 0.9})
    cfg8 = cfg_for(outer={"lr": 0.7, "momentum": 0.9, "compression": "int8"})
    results = []
    for cfg in (cfg32, cfg8):
        g = GlobalState.init(cfg)
        workers = [Worker(cfg, g, corpus, worker=i, n_workers=2) for i in range(2)]
        for w in workers:
            w.inner_phase(cfg.inner.steps)
        contribs = [w.contribution(g) for w in workers]
        res = LocalAverager(cfg.outer.compression, cfg.outer.block_size).average(
            contribs, step=0, params_hash=g.hash()
        )
        results.append(res.mean)
    fp32, q = results
    # Error of one blockwise int8 encode of each contribution plus one of the mean.
    step = fp32.abs().max() / 127
    err = (fp32 - q).abs().max()
    assert 0 < err <= 2 * step


def test_loss_falls_on_tiny(tmp_path, corpus):
    cfg = cfg_for(
        inner={"steps": 10, "batch_size": 8, "lr": 2e-3},
        outer={"lr": 0.7, "momentum": 0.9, "compression": "int8", "error_feedback": True},
    )
    summary = simulate(
        cfg, SimSpec(workers=2, outer_steps=6, out_dir=str(tmp_path), progress=False), corpus
    )
    from diloco_grow.metrics import read_jsonl

    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(recs) == 6
    assert recs[-1]["val_loss"] < recs[0]["val_loss"] - 0.3
    assert summary["val_loss"] < 5.0  # uniform over 256 bytes is 5.55 nats
    assert recs[-1]["bytes_sent_per_worker"] > 0


def test_assign_flat_rejects_wrong_length():
    model = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="elements"):
        assign_flat(model, torch.zeros(5))
