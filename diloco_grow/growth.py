"""Deterministic model growth: more experts per layer (width) or more layers (depth).

Pure functions from (config, state, event) to (config, state). Every peer applies the
same event at the same outer step and must get bit-identical parameters, so:
* noise comes from a CPU torch.Generator seeded by the event, drawn in float64 (the CPU
  float64 normal sampler has no SIMD-specific fast path) in the grown model's canonical
  parameter order, copy by copy;
* the same structural map, applied to flat indices instead of values, moves the outer
  momentum and error-feedback residuals (`flat_index_map`), so they can never disagree.

Width: expert i of a layer keeps slot i; copy j (1 <= j < f) of expert i goes to slot
j*E + i, with router row j*E + i copied from row i. With alpha = 0 and k -> f*k each
original and its copies are all selected together and split the original's
renormalised weight equally, so the layer output is unchanged.

Depth: copy j of layer l goes to l*f + j ("interpose") or j*n + l ("stack");
`zero_output` zeroes the copies' attention out-projection and expert down-projections
so each copy starts as the identity on the residual stream (exactly function-preserving).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import Tensor

from diloco_grow.growth_event import GrowthEvent, growth_line, parse_schedule
from diloco_grow.model import ModelConfig, MoETransformer, count_params, param_shapes

__all__ = [
    "GrowthEvent",
    "apply_index_map",
    "config_before",
    "flat_index_map",
    "grow_config",
    "grow_model",
    "grow_state",
    "growth_line",
    "n_params_before",
    "parse_schedule",
]

_EXPERT_SUFFIXES = ("moe.w_router_ED", "moe.w_gate_EFD", "moe.w_up_EFD", "moe.w_down_EDF")
_OUTPUT_SUFFIXES = ("attn.wo.weight", "moe.w_down_EDF", "moe.shared.w_down_DF")
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def grow_config(cfg: ModelConfig, ev: GrowthEvent) -> ModelConfig:
    """The grown config; ValueError if it would exceed cfg.max_experts / cfg.max_layers."""
    if ev.kind == "experts":
        n = cfg.n_experts * ev.factor
        if n > cfg.max_experts:
            raise ValueError(
                f"growth {ev.describe()} would give {n} experts > max_experts={cfg.max_experts}"
            )
        return dataclasses.replace(cfg, n_experts=n, top_k=cfg.top_k * ev.factor)
    n = cfg.n_layers * ev.factor
    if n > cfg.max_layers:
        raise ValueError(
            f"growth {ev.describe()} would give {n} layers > max_layers={cfg.max_layers}"
        )
    return dataclasses.replace(cfg, n_layers=n)


def config_before(cfg: ModelConfig, ev: GrowthEvent) -> ModelConfig:
    """The config `ev` grew into `cfg` (the inverse of grow_config): code that only holds
    the grown state can still report what the model was."""
    if ev.kind == "experts":
        return dataclasses.replace(
            cfg, n_experts=cfg.n_experts // ev.factor, top_k=cfg.top_k // ev.factor
        )
    return dataclasses.replace(cfg, n_layers=cfg.n_layers // ev.factor)


def n_params_before(cfg: ModelConfig, ev: GrowthEvent) -> int:
    """Parameter count before `ev` grew the model into `cfg`."""
    return count_params(config_before(cfg, ev))[0]


def _restructure(
    cfg: ModelConfig,
    ev: GrowthEvent,
    state: dict[str, Tensor],
    copy_fn: Callable[[Tensor], Tensor],
    zero_fn: Callable[[Tensor], Tensor],
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The structural part of growth. copy_fn makes each copy (called in canonical order:
    grown-model parameter order, then slot order); zero_fn makes zeroed outputs."""
    new_cfg = grow_config(cfg, ev)
    f, out = ev.factor, {}
    for name in param_shapes(new_cfg):
        if ev.kind == "experts":
            src = state[name]
            if name.endswith(_EXPERT_SUFFIXES):
                copies = [
                    torch.stack([copy_fn(src[i]) for i in range(cfg.n_experts)])
                    for _ in range(1, f)
                ]
                out[name] = torch.cat([src.clone(), *copies], dim=0)
            else:
                out[name] = src.clone()
            continue
        m = _LAYER_RE.fullmatch(name)
        if m is None:  # embeddings, final norm, lm_head
            out[name] = state[name].clone()
            continue
        new_l, rest = int(m.group(1)), m.group(2)
        if ev.mode == "interpose":
            src_l, j = divmod(new_l, f)
        else:
            j, src_l = divmod(new_l, cfg.n_layers)
        src = state[f"layers.{src_l}.{rest}"]
        if j == 0:
            out[name] = src.clone()
        elif ev.zero_output and rest.endswith(_OUTPUT_SUFFIXES):
            out[name] = zero_fn(src)
        else:
            out[name] = copy_fn(src)
    return new_cfg, out


def _check_state(cfg: ModelConfig, state: dict[str, Tensor]) -> None:
    shapes = param_shapes(cfg)
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    if missing or unexpected:
        raise ValueError(
            f"state does not match config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, shape in shapes.items():
        if state[k].shape != shape:
            raise ValueError(f"state[{k!r}] has shape {tuple(state[k].shape)}, want {tuple(shape)}")


def grow_state(
    cfg: ModelConfig, state: dict[str, Tensor], ev: GrowthEvent
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Grow a parameter state dict (as from model.state_dict()). Inputs are not modified;
    every output tensor is new memory, on the device and dtype of its source."""
    _check_state(cfg, state)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(ev.seed)

    def noisy_copy(src: Tensor) -> Tensor:
        if ev.alpha == 0.0:
            return src.clone()
        # Noise std is alpha * std of this source tensor (population std), in float64 on
        # the CPU so every machine computes the same bytes.
        src64 = src.detach().to("cpu", torch.float64)
        scale = ev.alpha * src64.std(correction=0).item()
        eps = torch.randn(src64.shape, generator=gen, dtype=torch.float64) * scale
        return (src64 + eps).to(src.dtype).to(src.device)

    return _restructure(cfg, ev, state, noisy_copy, torch.zeros_like)


def flat_index_map(cfg: ModelConfig, ev: GrowthEvent) -> torch.LongTensor:
    """For the grown model's flat parameter vector (canonical order):
    new_flat[i] = old_flat[map[i]] where map[i] >= 0, else 0.0 (zeroed outputs).
    Copies map to their source, without noise."""
    shapes = param_shapes(cfg)
    idx_state, offset = {}, 0
    for name, shape in shapes.items():
        n = shape.numel()
        idx_state[name] = torch.arange(offset, offset + n, dtype=torch.int64).view(shape)
        offset += n
    new_cfg, new_idx = _restructure(
        cfg, ev, idx_state, torch.clone, lambda t: torch.full_like(t, -1)
    )
    return torch.cat([new_idx[name].reshape(-1) for name in param_shapes(new_cfg)])


def apply_index_map(flat: Tensor, index_map: Tensor) -> Tensor:
    """Remap a flat buffer (outer momentum, error-feedback residual) through a
    flat_index_map: new[i] = flat[map[i]] if map[i] >= 0 else 0."""
    index_map = index_map.to(flat.device)
    out = flat[index_map.clamp(min=0)]
    return torch.where(index_map >= 0, out, torch.zeros((), dtype=flat.dtype, device=flat.device))


def grow_model(model: MoETransformer, ev: GrowthEvent) -> MoETransformer:
    """A new module with the grown state loaded; `model` is left untouched and torch's
    global RNG is not consumed (the module is built on the meta device)."""
    new_cfg, new_state = grow_state(model.cfg, model.state_dict(), ev)
    with torch.device("meta"):
        grown = MoETransformer(new_cfg)
    grown.load_state_dict(new_state, assign=True)
    grown.train(model.training)
    return grown
