"""Decoder-only MoE transformer: embedding, RoPE, causal SDPA attention, RMSNorm, MoE FFN.

Canonical parameter order is `named_parameters()` order (registration order below); the
flat vector peers average and growth's index maps both depend on it, so do not reorder
attributes. Embeddings are untied (tok_emb and lm_head are separate): simpler growth
and, with a 256-byte vocabulary, they cost little.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diloco_grow.model_config import (
    PRESETS,
    ModelConfig,
    count_params,
    flops_per_token,
    model_config_from_dict,
)
from diloco_grow.moe import MoE

__all__ = [
    "PRESETS",
    "ModelConfig",
    "ModelOutput",
    "MoETransformer",
    "count_params",
    "flops_per_token",
    "model_config_from_dict",
    "param_shapes",
]

INIT_STD = 0.02


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # ce + aux_loss_coef * lb + z_loss_coef * z; None without targets
    ce_loss: Tensor | None
    lb_loss: Tensor  # Switch load-balancing loss, mean over layers (1.0 = uniform)
    z_loss: Tensor  # router z-loss, mean over layers


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        # By hand rather than F.rms_norm (torch >= 2.4 only); statistics in fp32.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def apply_rope(x_BHTd: Tensor, cos_Td: Tensor, sin_Td: Tensor) -> Tensor:
    """Rotate-half RoPE: pairs (i, i + d/2) rotate by position * freq_i."""
    x1, x2 = x_BHTd.chunk(2, dim=-1)
    cos, sin = cos_Td.to(x_BHTd.dtype), sin_Td.to(x_BHTd.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BTD: Tensor, cos_Td: Tensor, sin_Td: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        qkv = self.wqkv(x_BTD).view(B, T, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, d)
        q, k = apply_rope(q, cos_Td, sin_Td), apply_rope(k, cos_Td, sin_Td)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.moe_norm = RMSNorm(cfg.d_model)
        self.moe = MoE(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.d_expert, cfg.shared_expert)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin)
        B, T, D = x_BTD.shape
        y_TD, lb, z = self.moe(self.moe_norm(x_BTD).reshape(B * T, D))
        return x_BTD + y_TD.view(B, T, D).to(x_BTD.dtype), lb, z


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # RoPE tables are derived from the config, not trained: a plain cache keyed by
        # device keeps them out of state_dict() and the averaged flat vector.
        self._rope_cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deterministic init from torch's global RNG, in canonical parameter order."""
        out_std = INIT_STD / math.sqrt(2 * self.cfg.n_layers)  # GPT-2 residual scaling
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down_EDF", "w_down_DF")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, INIT_STD)

    def _rope(self, T: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (str(device), T)
        if key not in self._rope_cache:
            d = self.cfg.d_model // self.cfg.n_heads
            inv_freq = 1.0 / self.cfg.rope_theta ** (
                torch.arange(0, d, 2, dtype=torch.float64) / d
            )
            ang = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
            self._rope_cache[key] = (
                ang.cos().float().to(device),
                ang.sin().float().to(device),
            )
        return self._rope_cache[key]

    def forward(self, idx_BT: Tensor, targets_BT: Tensor | None = None) -> ModelOutput:
        T = idx_BT.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds cfg.seq_len={self.cfg.seq_len}")
        cos, sin = self._rope(T, idx_BT.device)
        x = self.tok_emb(idx_BT)
        lbs, zs = [], []
        for layer in self.layers:
            x, lb, z = layer(x, cos, sin)
            lbs.append(lb)
            zs.append(z)
        logits = self.lm_head(self.norm(x))
        # Mean over layers keeps the aux terms' scale independent of depth growth.
        lb_loss = torch.stack(lbs).mean()
        z_loss = torch.stack(zs).mean()
        if targets_BT is None:
            return ModelOutput(logits, None, None, lb_loss, z_loss)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets_BT.reshape(-1))
        loss = ce + self.cfg.aux_loss_coef * lb_loss + self.cfg.z_loss_coef * z_loss
        return ModelOutput(logits, loss, ce, lb_loss, z_loss)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def n_active_params(self) -> int:
        """Parameters touched per token: everything except the (E - k) unrouted experts."""
        return count_params(self.cfg)[1]


def param_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Canonical (name -> shape) of a model with `cfg`, without allocating or using RNG."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    return {name: p.shape for name, p in model.named_parameters()}
