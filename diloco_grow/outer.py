"""The outer step: pseudo-gradients, the Averager protocol, and SGD-Nesterov on θ_g.

θ_g is one flat fp32 vector over the model's parameters in canonical order
(`named_parameters()` order). Every peer holds a bit-identical copy of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from compression.codec import Codec, Encoded, get_codec


def make_codec(name: str, block_size: int) -> Codec:
    """The configured block size applies to our blockwise codecs and to topk (which keeps
    K = 8 per block, so block 256 sends 1/32 of the entries); bnb8 keeps its own block and
    the passthrough codecs have none."""
    return get_codec(name, block_size if name in ("int8", "int4", "topk") else None)


def flatten_params(model: nn.Module) -> torch.Tensor:
    """All parameters, canonical order, as one fp32 CPU vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


@torch.no_grad()
def assign_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector back into the model's parameters (the inverse of flatten_params)."""
    n = sum(p.numel() for p in model.parameters())
    if flat.numel() != n:
        raise ValueError(f"flat vector has {flat.numel()} elements, model has {n}")
    offset = 0
    for p in model.parameters():
        p.copy_(flat[offset : offset + p.numel()].view_as(p).to(p.device, p.dtype))
        offset += p.numel()


def params_hash(theta: torch.Tensor) -> str:
    """Short content hash of θ_g; peers compare it to prove they hold the same state."""
    return hashlib.sha256(theta.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[
        :16
    ]


def pseudo_gradient(theta_g: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Δ = θ_g − θ: points from where the inner steps went back to where they started,
    so a positive outer lr moves θ_g towards the workers (OpenDiLoCo / torchft sign)."""
    return theta_g - flatten_params(model)


class OuterOptimizer:
    """SGD with (Nesterov) momentum on θ_g, exactly torch.optim.SGD's semantics:
    m ← μ m + Δ̄ ;  θ_g ← θ_g − η (Δ̄ + μ m)  (Nesterov)  or  θ_g ← θ_g − η m."""

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.buf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, theta_g: torch.Tensor, mean_delta: torch.Tensor) -> None:
        """Update θ_g in place."""
        if self.momentum == 0:
            theta_g.sub_(mean_delta, alpha=self.lr)
            return
        if self.buf is None:
            self.buf = mean_delta.clone()  # torch's SGD starts the buffer at the first gradient
        else:
            self.buf.mul_(self.momentum).add_(mean_delta)
        update = mean_delta.add(self.buf, alpha=self.momentum) if self.nesterov else self.buf
        theta_g.sub_(update, alpha=self.lr)

    def remap(self, index_map: torch.Tensor) -> None:
        """Follow a growth event: new[i] = old[map[i]], or 0 where map[i] == -1."""
        if self.buf is not None:
            self.buf = remap_flat(self.buf, index_map)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.buf is None else {"momentum": self.buf.clone()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        self.buf = d["momentum"].clone().float() if "momentum" in d else None


def remap_flat(vec: torch.Tensor, index_map: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(index_map.numel(), dtype=vec.dtype)
    keep = index_map >= 0
    out[keep] = vec[index_map[keep]]
    return out


@dataclass
class RoundResult:
    """What one outer round produced; identical `mean` on every member."""

    mean: torch.Tensor  # fp32 flat Δ̄
    members: int
    bytes_sent: int  # per worker, this round
    bytes_recv: int
    seconds: float
    committed: dict | None = None  # a growth vote the round's members agreed on
    member_ids: list[str] = field(default_factory=list)


class Averager(Protocol):
    """How the DiLoCo loop reaches the other workers, in-process or over the network.

    `contributions` are this process's workers' encoded pseudo-gradients with their
    weights (tokens processed); the result is the weighted mean over the whole round."""

    def average(
        self,
        contributions: list[tuple[Encoded, float]],
        *,
        step: int,
        params_hash: str,
        vote: dict | None = None,
    ) -> RoundResult: ...
