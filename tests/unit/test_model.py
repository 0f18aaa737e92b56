"""MoE transformer: shapes, losses, causality, routing maths, configs, param counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from diloco_grow.model import (
    PRESETS,
    ModelConfig,
    MoETransformer,
    count_params,
    flops_per_token,
    model_config_from_dict,
    param_shapes,
)

TINY = PRESETS["tiny"]


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg)


def _batch(cfg: ModelConfig = TINY, B: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)


def test_forward_shapes_and_finite_losses() -> None:
    model, x = _model(), _batch()
    out = model(x[:, :-1], x[:, 1:])
    assert out.logits.shape == (3, TINY.seq_len - 1, 256)
    for t in (out.loss, out.ce_loss, out.lb_loss, out.z_loss):
        assert t.ndim == 0 and torch.isfinite(t)
    # Random init on 256 classes: CE near log(256) = 5.545.
    assert abs(out.ce_loss.item() - math.log(256)) < 0.2
    want = out.ce_loss + TINY.aux_loss_coef * out.lb_loss + TINY.z_loss_coef * out.z_loss
    assert torch.allclose(out.loss, want)
    no_targets = model(x)
    assert no_targets.loss is None and no_targets.ce_loss is None
    assert torch.allclose(no_targets.logits[:, :-1], out.logits, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits() -> None:
    model, x = _model(), _batch(B=2)
    t = 40
    y = x.clone()
    y[:, t:] = (y[:, t:] + 17) % 256
    a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


def test_uniform_router_gives_lb_one_and_zero_z() -> None:
    model = _model()
    with torch.no_grad():
        for layer in model.layers:
            layer.moe.w_router_ED.zero_()
    out = model(_batch())
    assert out.lb_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert out.z_loss.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_moe_layer_matches_per_token_reference(shared: bool) -> None:
    cfg = dataclasses.replace(TINY, shared_expert=shared, n_experts=5, top_k=3)
    moe = _model(cfg).layers[0].moe
    x_TD = torch.randn(50, cfg.d_model, generator=torch.Generator().manual_seed(3))
    y_TD, _, _ = moe(x_TD)
    probs = (x_TD @ moe.w_router_ED.T).softmax(-1)
    ref = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        w, idx = probs[t].topk(cfg.top_k)
        w = w / w.sum()
        for wi, e in zip(w, idx.tolist(), strict=True):
            h = F.silu(moe.w_gate_EFD[e] @ x_TD[t]) * (moe.w_up_EFD[e] @ x_TD[t])
            ref[t] += wi * (moe.w_down_EDF[e] @ h)
        if shared:
            s = moe.shared
            ref[t] += s.w_down_DF @ (F.silu(s.w_gate_FD @ x_TD[t]) * (s.w_up_FD @ x_TD[t]))
    assert torch.allclose(y_TD, ref, atol=1e-6)


def test_init_is_deterministic_and_order_canonical() -> None:
    a, b, c = _model(seed=5), _model(seed=5), _model(seed=6)
    names = [n for n, _ in a.named_parameters()]
    assert names == list(param_shapes(TINY))
    assert names[:9] == [
        "tok_emb.weight",
        "layers.0.attn_norm.weight",
        "layers.0.attn.wqkv.weight",
        "layers.0.attn.wo.weight",
        "layers.0.moe_norm.weight",
        "layers.0.moe.w_router_ED",
        "layers.0.moe.w_gate_EFD",
        "layers.0.moe.w_up_EFD",
        "layers.0.moe.w_down_EDF",
    ]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    assert len(a.state_dict()) == len(names)  # no buffers: everything averaged is a param


def test_param_shapes_uses_no_rng() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    param_shapes(PRESETS["base"])
    assert torch.equal(before, torch.get_rng_state())


def test_preset_param_counts() -> None:
    assert count_params(PRESETS["tiny"]) == (262_976, 164_672)
    assert count_params(PRESETS["small"]) == (3_478_656, 1_119_360)
    assert count_params(PRESETS["base"]) == (109_355_520, 33_858_048)
    assert count_params(PRESETS["tiny"])[0] < 1_000_000
    assert 1_000_000 < count_params(PRESETS["small"])[0] < 10_000_000
    assert count_params(PRESETS["base"])[0] >= 100_000_000
    for cfg in (TINY, dataclasses.replace(TINY, shared_expert=True)):
        model = _model(cfg)
        assert (model.n_params(), model.n_active_params()) == count_params(cfg)


def test_flops_per_token_formula() -> None:
    # 6 * (active - embedding table) + 12 * layers * d_model * seq_len
    assert flops_per_token(TINY) == 6 * (164_672 - 256 * 64) + 12 * 2 * 64 * 64


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"d_model": 0}, "d_model must be a positive integer"),
        ({"n_layers": 2.0}, "n_layers must be a positive integer"),
        ({"d_model": 66, "n_heads": 4}, "divisible by n_heads"),
        ({"d_model": 60, "n_heads": 4}, "must be even for RoPE"),
        ({"top_k": 5}, "top_k=5 must be in"),
        ({"n_experts": 70}, "exceeds max_experts=64"),
        ({"n_layers": 9, "max_layers": 8}, "exceeds max_layers=8"),
        ({"aux_loss_coef": -1.0}, ">= 0"),
        ({"z_loss_coef": float("nan")}, "finite"),
        ({"shared_expert": 1}, "true or false"),
        ({"vocab_size": 1}, "at least 2"),
    ],
)
def test_config_validation(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        dataclasses.replace(TINY, **kwargs)


def test_config_from_dict() -> None:
    cfg = model_config_from_dict({"preset": "tiny", "n_layers": 3})
    assert cfg == dataclasses.replace(TINY, n_layers=3)
    assert model_config_from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['d_modle'\]"):
        model_config_from_dict({"d_modle": 64})
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        model_config_from_dict({"preset": "huge"})


def test_seq_len_limit() -> None:
    with pytest.raises(ValueError, match="exceeds cfg.seq_len"):
        _model()(torch.zeros(1, TINY.seq_len + 1, dtype=torch.long))
