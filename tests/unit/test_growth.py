"""Growth: function preservation, noise statistics, determinism, gradients, index maps."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import pytest
import torch

from diloco_grow.growth import (
    GrowthEvent,
    apply_index_map,
    config_before,
    flat_index_map,
    grow_config,
    grow_model,
    grow_state,
    growth_line,
    n_params_before,
    parse_schedule,
)
from diloco_grow.model import PRESETS, ModelConfig, MoETransformer, count_params, param_shapes

TINY = PRESETS["tiny"]
SHARED = dataclasses.replace(TINY, shared_expert=True)
EXPERT_KEYS = ("w_router_ED", "w_gate_EFD", "w_up_EFD", "w_down_EDF")


def _model(cfg: ModelConfig = TINY, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg)


def _batch(cfg: ModelConfig = TINY, B: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _state_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("cfg, factor", [(TINY, 2), (SHARED, 3)])
def test_width_alpha0_preserves_logits_and_all_losses(cfg: ModelConfig, factor: int) -> None:
    model, x = _model(cfg), _batch(cfg)
    grown = grow_model(model, GrowthEvent("experts", factor, alpha=0))
    assert (grown.cfg.n_experts, grown.cfg.top_k) == (4 * factor, 2 * factor)
    a, b = model(x[:, :-1], x[:, 1:]), grown(x[:, :-1], x[:, 1:])
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    assert b.lb_loss.item() == pytest.approx(a.lb_loss.item(), rel=1e-6)
    assert b.z_loss.item() == pytest.approx(a.z_loss.item(), rel=1e-4, abs=1e-8)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["interpose", "stack"])
def test_depth_zero_output_is_exact_and_plain_copy_is_not(mode: str) -> None:
    model, x = _model(SHARED), _batch(SHARED)
    before = model(x).logits
    exact = grow_model(model, GrowthEvent("depth", 2, mode=mode, zero_output=True))
    assert exact.cfg.n_layers == 4
    assert torch.equal(exact(x).logits, before)
    plain = grow_model(model, GrowthEvent("depth", 2, mode=mode))
    diff = (plain(x).logits - before).abs().max().item()
    assert diff > 1e-2  # recorded: ~0.36 for interpose on tiny at init


def test_depth_layer_placement() -> None:
    model = _model()
    s = model.state_dict()
    n = "attn.wqkv.weight"
    inter = grow_model(model, GrowthEvent("depth", 3)).state_dict()
    stack = grow_model(model, GrowthEvent("depth", 3, mode="stack")).state_dict()
    for new_l, src_l in enumerate([0, 0, 0, 1, 1, 1]):
        assert torch.equal(inter[f"layers.{new_l}.{n}"], s[f"layers.{src_l}.{n}"])
    for new_l, src_l in enumerate([0, 1, 0, 1, 0, 1]):
        assert torch.equal(stack[f"layers.{new_l}.{n}"], s[f"layers.{src_l}.{n}"])


def test_width_noise_std_and_untouched_originals() -> None:
    alpha, E = 0.01, TINY.n_experts
    model = _model()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    new = grow_model(model, GrowthEvent("experts", 3, alpha=alpha, seed=7)).state_dict()
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items())  # input intact
    for name, v in new.items():
        if not name.endswith(EXPERT_KEYS):
            assert torch.equal(v, old[name])
            continue
        src = old[name]
        assert torch.equal(v[:E], src)  # originals bit-identical
        num = den = 0.0
        for j in (1, 2):
            for i in range(E):
                eps, want = v[j * E + i] - src[i], alpha * src[i].std(correction=0)
                assert eps.abs().max() > 0
                if name.endswith("w_router_ED"):  # rows of only 64: pool them below
                    num += eps.square().sum().item()
                    den += want.square().item() * eps.numel()
                else:  # 8192 elements per expert: the per-copy estimate is tight
                    assert (eps.std() / want).item() == pytest.approx(1.0, rel=0.05)
        if name.endswith("w_router_ED"):
            assert (num / den) ** 0.5 == pytest.approx(1.0, rel=0.1)


def test_depth_noise_std_and_zeroed_outputs() -> None:
    alpha = 0.05
    old = _model(SHARED).state_dict()
    new = grow_state(SHARED, old, GrowthEvent("depth", 2, alpha=alpha, zero_output=True))[1]
    for name, src in old.items():
        if not name.startswith("layers.1."):
            continue
        rest = name.removeprefix("layers.1.")
        assert torch.equal(new[f"layers.2.{rest}"], src)
        copy = new[f"layers.3.{rest}"]
        if rest in ("attn.wo.weight", "moe.w_down_EDF", "moe.shared.w_down_DF"):
            assert not copy.any()
        elif src.numel() > 4000:
            ratio = (copy - src).std() / (alpha * src.std(correction=0))
            assert ratio.item() == pytest.approx(1.0, rel=0.05)


def test_seed_determinism() -> None:
    model = _model()
    h = lambda ev: _state_hash(grow_model(model, ev))  # noqa: E731
    ev = GrowthEvent("experts", 2, alpha=0.01, seed=1)
    assert h(ev) == h(GrowthEvent("experts", 2, alpha=0.01, seed=1))
    assert h(ev) != h(GrowthEvent("experts", 2, alpha=0.01, seed=2))
    assert h(GrowthEvent("depth", 2, alpha=0.01, seed=1)) != h(
        GrowthEvent("depth", 2, alpha=0.01, seed=2)
    )
    # Without noise the seed is irrelevant.
    assert h(GrowthEvent("experts", 2, alpha=0, seed=1)) == h(
        GrowthEvent("experts", 2, alpha=0, seed=2)
    )
    # Growth never consumes the global RNG.
    before = torch.get_rng_state()
    grow_model(model, ev)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_copy_gradients_equal_sources_only_without_noise(alpha: float) -> None:
    E = TINY.n_experts
    grown = grow_model(_model(), GrowthEvent("experts", 2, alpha=alpha, seed=3))
    x = _batch(B=8)
    grown(x[:, :-1], x[:, 1:]).loss.backward()
    for name, p in grown.named_parameters():
        if not name.endswith(EXPERT_KEYS):
            continue
        src, copy = p.grad[:E], p.grad[E:]
        assert src.abs().max() > 0
        close = torch.allclose(src, copy, rtol=1e-4, atol=1e-9)
        assert close == (alpha == 0.0), name


def _reference_remap(cfg: ModelConfig, ev: GrowthEvent, flat: torch.Tensor) -> torch.Tensor:
    """Index-by-index reference, written from the parameter names and the growth rules."""
    old, off = {}, 0
    for name, shape in param_shapes(cfg).items():
        old[name] = flat[off : off + shape.numel()].view(shape)
        off += shape.numel()
    new_cfg, f, out = grow_config(cfg, ev), ev.factor, []
    for name, shape in param_shapes(new_cfg).items():
        t = torch.empty(shape)
        if ev.kind == "experts" and name.endswith(EXPERT_KEYS):
            for e in range(shape[0]):
                t[e] = old[name][e % cfg.n_experts]
        elif ev.kind == "depth" and name.startswith("layers."):
            _, l, rest = name.split(".", 2)
            src_l, j = divmod(int(l), f)
            zeroed = rest in ("attn.wo.weight", "moe.w_down_EDF", "moe.shared.w_down_DF")
            t = (
                torch.zeros(shape)
                if j and ev.zero_output and zeroed
                else old[f"layers.{src_l}.{rest}"]
            )
        else:
            t = old[name]
        out.append(t.reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize(
    "ev",
    [
        GrowthEvent("experts", 2, alpha=0.01),
        GrowthEvent("experts", 3, alpha=0),
        GrowthEvent("depth", 2, zero_output=True),
        GrowthEvent("depth", 3, alpha=0.01),
    ],
)
def test_flat_index_map_remaps_momentum(ev: GrowthEvent) -> None:
    momentum = torch.randn(sum(s.numel() for s in param_shapes(SHARED).values()))
    index_map = flat_index_map(SHARED, ev)
    remapped = apply_index_map(momentum, index_map)
    assert torch.equal(remapped, _reference_remap(SHARED, ev, momentum))
    grown_cfg = grow_config(SHARED, ev)
    assert index_map.numel() == sum(s.numel() for s in param_shapes(grown_cfg).values())
    if ev.alpha == 0.0:  # without noise the map also moves the parameters themselves
        model = _model(SHARED)
        assert torch.equal(apply_index_map(_flat(model), index_map), _flat(grow_model(model, ev)))


def test_training_after_growth_reduces_loss() -> None:
    model = _model()
    model = grow_model(model, GrowthEvent("experts", 2, alpha=0.01))
    model = grow_model(model, GrowthEvent("depth", 2, zero_output=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _batch(B=4)
    losses = []
    for _ in range(8):
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_event_hash_and_msgpack_roundtrip() -> None:
    ev = GrowthEvent("depth", 2, alpha=0.01, seed=5, zero_output=True)
    back = GrowthEvent.from_dict(msgpack.unpackb(msgpack.packb(ev.to_dict())))
    assert back == ev and back.hash() == ev.hash()
    # Pinned: the swarm votes on this hash, it must not drift between versions.
    assert GrowthEvent("experts", 2, alpha=0.0).hash() == (
        "6ace592c1dc5a150b38bc63ebdbbd61829d21ba22b12581d6ea7ba634c117475"
    )
    assert GrowthEvent("experts", 2, alpha=0).hash() == GrowthEvent("experts", 2, alpha=0.0).hash()
    # The default is resolved before hashing: a schedule without alpha and one that spells
    # out the default are the same vote.
    assert GrowthEvent("experts", 2).hash() == GrowthEvent("experts", 2, alpha=0.01).hash()
    assert ev.hash() != GrowthEvent("depth", 2, alpha=0.01, seed=6, zero_output=True).hash()


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"kind": "heads", "factor": 2}, "kind must be one of"),
        ({"kind": "experts", "factor": 1}, "factor must be an integer >= 2"),
        ({"kind": "experts", "factor": 2, "alpha": -0.1}, "alpha must be finite and >= 0"),
        ({"kind": "depth", "factor": 2, "mode": "zigzag"}, "mode must be one of"),
        ({"kind": "experts", "factor": 2, "zero_output": True}, "depth growth only"),
        ({"kind": "experts", "factor": 2, "colour": 1}, r"unknown growth event key\(s\)"),
        ({"factor": 2}, "missing"),
    ],
)
def test_event_validation(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        GrowthEvent.from_dict(kwargs)


def test_growth_limits_and_state_check() -> None:
    cfg = dataclasses.replace(TINY, max_experts=8, max_layers=3)
    assert grow_config(cfg, GrowthEvent("experts", 2)).n_experts == 8
    with pytest.raises(ValueError, match="12 experts > max_experts=8"):
        grow_config(cfg, GrowthEvent("experts", 3))
    with pytest.raises(ValueError, match="4 layers > max_layers=3"):
        grow_config(cfg, GrowthEvent("depth", 2))
    state = _model().state_dict()
    del state["norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        grow_state(TINY, state, GrowthEvent("depth", 2))


def test_parse_schedule() -> None:
    sched = parse_schedule("experts:2@20, depth:2@40:alpha=0.01:zero_output,depth:3@5:stack")
    assert sched == [
        (5, GrowthEvent("depth", 3, mode="stack")),
        (20, GrowthEvent("experts", 2)),
        (40, GrowthEvent("depth", 2, alpha=0.01, zero_output=True)),
    ]
    assert parse_schedule("") == []
    assert parse_schedule("experts:2@3:seed=9")[0][1].seed == 9
    ev = GrowthEvent("depth", 2, alpha=0.01, seed=4, mode="stack", zero_output=True)
    assert parse_schedule(ev.describe(step=7)) == [(7, ev)]
    for bad in ("experts@2", "experts:x@2", "experts:2@-1", "depth:2@1:beta=3", "experts:1@4"):
        with pytest.raises(ValueError, match="bad growth schedule"):
            parse_schedule(bad)


def test_width_defaults_to_noise_and_alpha0_stays_expressible() -> None:
    # Width copies without noise get identical gradients and never diverge: the default
    # is a little noise; alpha=0 (exactly function-preserving) must be asked for.
    assert GrowthEvent("experts", 2).alpha == 0.01
    assert GrowthEvent("depth", 2).alpha == 0.0
    assert GrowthEvent.from_dict({"kind": "experts", "factor": 2}).alpha == 0.01
    [(_, ev0)] = parse_schedule("experts:2@5:alpha=0")
    [(_, ev1)] = parse_schedule("experts:2@5")
    assert (ev0.alpha, ev1.alpha) == (0.0, 0.01)
    # describe() spells out a non-default alpha so the schedule reads back identically.
    assert ev0.describe(step=5) == "experts:2@5:alpha=0.0"
    assert ev1.describe(step=5) == "experts:2@5"
    for ev in (ev0, ev1, GrowthEvent("depth", 2, alpha=0.02)):
        assert parse_schedule(ev.describe(step=5)) == [(5, ev)]
    # With the default noise the copies really differ from their sources.
    grown = grow_model(_model(), ev1).state_dict()
    w = grown["layers.0.moe.w_up_EFD"]
    E = TINY.n_experts
    assert not torch.equal(w[:E], w[E:])


@pytest.mark.parametrize(
    "ev", [GrowthEvent("experts", 2), GrowthEvent("depth", 3, zero_output=True)]
)
def test_growth_line_names_kind_factor_params_and_step(ev: GrowthEvent) -> None:
    grown = grow_config(SHARED, ev)
    assert config_before(grown, ev) == SHARED
    n_before = n_params_before(grown, ev)
    n_after = count_params(grown)[0]
    assert n_before == count_params(SHARED)[0] < n_after
    line = growth_line(ev, n_before, n_after, step=15)
    assert line.startswith(f"growth step=15 {ev.kind} x{ev.factor}: ")
    assert f"params {n_before:,} -> {n_after:,}" in line
    assert f"alpha={ev.alpha:g}" in line
    assert ("zero_output" in line) == ev.zero_output
