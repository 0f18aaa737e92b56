"""ModelConfig, presets, and the parameter / FLOP arithmetic used by growth and benchmarks.

Kept apart from model.py so configs can be parsed, validated and costed without torch
modules; model.py re-exports everything here (import from `diloco_grow.model`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 4
    top_k: int = 2
    d_expert: int = 128  # hidden size F of each SwiGLU expert (also of the shared expert)
    shared_expert: bool = False
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    rope_theta: float = 10000.0
    max_experts: int = 64  # growth limits: a growth event past these is rejected
    max_layers: int = 64

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the offending field(s)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"ModelConfig.{f.name} must be a positive integer, got {v!r}")
            if f.type == "float" and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                raise ValueError(f"ModelConfig.{f.name} must be a finite number, got {v!r}")
            if f.type == "bool" and not isinstance(v, bool):
                raise ValueError(f"ModelConfig.{f.name} must be true or false, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE"
            )
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.n_experts > self.max_experts:
            raise ValueError(
                f"n_experts={self.n_experts} exceeds max_experts={self.max_experts}"
            )
        if self.n_layers > self.max_layers:
            raise ValueError(f"n_layers={self.n_layers} exceeds max_layers={self.max_layers}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size} must be at least 2")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("aux_loss_coef and z_loss_coef must be >= 0")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # ~0.26M params: unit tests and quick smoke runs.
    "tiny": ModelConfig(
        seq_len=64, d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=2, d_expert=128
    ),
    # ~3.5M params (~1.1M active): the CPU demo.
    "small": ModelConfig(
        seq_len=128, d_model=128, n_layers=4, n_heads=4, n_experts=8, top_k=2, d_expert=256
    ),
    # ~109M params (~34M active): GPU runs.
    "base": ModelConfig(
        seq_len=512, d_model=512, n_layers=8, n_heads=8, n_experts=8, top_k=2, d_expert=1024
    ),
}


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Build a config from a plain dict (e.g. a TOML table); unknown keys are an error.

    A "preset" key starts from that preset and the other keys override it.
    """
    d = dict(d)
    base = ModelConfig()
    if "preset" in d:
        name = d.pop("preset")
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
        base = PRESETS[name]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base, **d)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token). Active = everything except the E - k unrouted experts."""
    D, F, E = cfg.d_model, cfg.d_expert, cfg.n_experts
    expert = 3 * F * D  # gate, up, down
    per_layer = (
        2 * D  # two RMSNorms
        + 4 * D * D  # wqkv + wo
        + E * D  # router
        + E * expert
        + (expert if cfg.shared_expert else 0)
    )
    total = 2 * cfg.vocab_size * D + cfg.n_layers * per_layer + D  # + final norm
    active = total - cfg.n_layers * (E - cfg.top_k) * expert
    return total, active


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token (forward + backward), PaLM-style:

        6 * N_active_nonembedding + 12 * n_layers * d_model * seq_len

    N counts every matmul weight a token touches (attention, router, k routed experts,
    shared expert, lm_head) but not the embedding lookup table; the second term is
    the attention score/value matmuls (QK^T and AV, 2 FLOPs per multiply-add, x3 for
    backward), counted at full context as PaLM does.
    """
    _, active = count_params(cfg)
    n = active - cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
