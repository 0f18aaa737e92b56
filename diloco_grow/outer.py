"""The outer step: pseudo-gradients, the Averager protocol, and the outer optimizer
(SGD-Nesterov or Adam) on θ_g.

θ_g is one flat fp32 vector over the model's parameters in canonical order
(`named_parameters()` order). Every peer holds a bit-identical copy of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from compression.codec import Codec, Encoded, get_codec

if TYPE_CHECKING:
    from diloco_grow.config import OuterConfig


def make_codec(name: str, block_size: int) -> Codec:
    """The configured block size applies to our blockwise codecs and to the topk family
    (K per block: topk keeps 8 of 256, 1/32 of the entries); bnb8 keeps its own block and
    the passthrough codecs have none."""
    blocked = name in ("int8", "int4") or name.startswith("topk")
    return get_codec(name, block_size if blocked else None)


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


class OuterOptimizer(Protocol):
    """The outer step on θ_g from the round's mean pseudo-gradient Δ̄.

    Every peer runs it on bit-identical inputs and must get a bit-identical θ_g, so an
    implementation uses elementwise fp32 torch ops on the CPU in a fixed order, and its
    Python scalars avoid the platform's libm (see _powi). `t` is the number of outer steps
    already taken (GlobalState.step), which drives the lr warmup."""

    kind: str
    lr: float
    warmup_steps: int

    def step(self, theta_g: torch.Tensor, mean_delta: torch.Tensor, t: int) -> None: ...

    def buffers(self) -> dict[str, torch.Tensor]:
        """The per-parameter state, each flat like θ_g (empty before the first step)."""
        ...

    def remap(self, index_map: torch.Tensor) -> None: ...

    def hparams(self) -> dict[str, Any]:
        """The [outer] fields this optimizer uses, as a checkpoint's meta records them."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None: ...


def warmup_lr(lr: float, warmup_steps: int, t: int) -> float:
    """lr · min(1, (t+1)/N): the first outer steps, taken from a random init with an empty
    momentum, are the least reliable ones. N = 0 turns the ramp off."""
    return lr if warmup_steps <= 0 else lr * min(1.0, (t + 1) / warmup_steps)


def warmup_momentum(momentum: float, warmup_steps: int, t: int) -> float:
    """μ · min(1, (t+1)/N). The first pseudo-gradients, from a random init, are the
    largest and least aligned with later ones; a full μ keeps re-applying them (at 0.6
    the buffer still holds 0.6^k of the first one k steps later), which is why FedAvg
    led Nesterov over the first few hundred inner steps (issue #10). Ramping μ lets the
    early steps be plain averaging and the later ones Nesterov. Python floats (IEEE, no
    libm), so every peer computes the same μ_t."""
    return warmup_lr(momentum, warmup_steps, t)


def make_outer(o: OuterConfig) -> OuterOptimizer:
    """The optimizer the [outer] section names, with an empty state."""
    if o.optimizer == "adam":
        return OuterAdam(o.lr, o.momentum, o.beta2, o.eps, o.warmup_steps)
    return OuterSGD(o.lr, o.momentum, o.nesterov, o.warmup_steps, o.momentum_warmup_steps)


def _check_keys(d: dict[str, torch.Tensor], known: set[str]) -> None:
    # A served state is untrusted: a buffer we would silently drop is a sign of a state
    # written for another optimizer.
    extra = sorted(set(d) - known)
    if extra:
        raise ValueError(f"unexpected outer state {extra}; this optimizer keeps {sorted(known)}")


class OuterSGD:
    """SGD with (Nesterov) momentum on θ_g, exactly torch.optim.SGD's semantics:
    m ← μ m + Δ̄ ;  θ_g ← θ_g − η (Δ̄ + μ m)  (Nesterov)  or  θ_g ← θ_g − η m.
    μ = 0 is the plain averaging step θ_g ← θ_g − η Δ̄ (FedAvg at η = 1).
    With `momentum_warmup_steps` N > 0, μ is μ_t = μ · min(1, (t+1)/N) at outer step t
    (the shipped [outer] ramps it; the bare class defaults to torch's constant μ)."""

    kind = "sgd"

    def __init__(
        self,
        lr: float = 0.7,
        momentum: float = 0.6,
        nesterov: bool = True,
        warmup_steps: int = 0,
        momentum_warmup_steps: int = 0,
    ) -> None:
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
        self.warmup_steps, self.momentum_warmup_steps = warmup_steps, momentum_warmup_steps
        self.buf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, theta_g: torch.Tensor, mean_delta: torch.Tensor, t: int) -> None:
        """Update θ_g in place."""
        lr = warmup_lr(self.lr, self.warmup_steps, t)
        mu = warmup_momentum(self.momentum, self.momentum_warmup_steps, t)
        if self.momentum == 0:
            theta_g.sub_(mean_delta, alpha=lr)
            return
        if self.buf is None:
            self.buf = mean_delta.clone()  # torch's SGD starts the buffer at the first gradient
        else:
            self.buf.mul_(mu).add_(mean_delta)
        update = mean_delta.add(self.buf, alpha=mu) if self.nesterov else self.buf
        theta_g.sub_(update, alpha=lr)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {} if self.buf is None else {"momentum": self.buf}

    def remap(self, index_map: torch.Tensor) -> None:
        """Follow a growth event: new[i] = old[map[i]], or 0 where map[i] == -1."""
        if self.buf is not None:
            self.buf = remap_flat(self.buf, index_map)

    def hparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "warmup_steps": self.warmup_steps,
            "momentum_warmup_steps": self.momentum_warmup_steps,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.buffers().items()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        _check_keys(d, {"momentum"})
        self.buf = d["momentum"].clone().float() if "momentum" in d else None


class OuterAdam:
    """Adam on the pseudo-gradient (the DiLoCo paper's outer-optimizer ablation):
    m ← β1 m + (1−β1) Δ̄ ;  v ← β2 v + (1−β2) Δ̄² ;  θ_g ← θ_g − η m̂ / (√v̂ + ε)
    with m̂ = m / (1−β1^k), v̂ = v / (1−β2^k) after k Adam steps. β1 is [outer] momentum.
    Its first step moves every parameter by about η (m̂/√v̂ = sign Δ̄), so it wants a far
    smaller η than SGD's 0.7."""

    kind = "adam"

    def __init__(
        self,
        lr: float,
        beta1: float = 0.9,
        beta2: float = 0.99,
        eps: float = 1e-8,
        warmup_steps: int = 0,
    ) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.warmup_steps = warmup_steps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.steps_taken = 0  # Adam steps (its bias correction), not the outer step index

    @torch.no_grad()
    def step(self, theta_g: torch.Tensor, mean_delta: torch.Tensor, t: int) -> None:
        """Update θ_g in place."""
        lr = warmup_lr(self.lr, self.warmup_steps, t)
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(theta_g), torch.zeros_like(theta_g)
        self.steps_taken += 1
        b1, b2 = self.beta1, self.beta2
        self.m.mul_(b1).add_(mean_delta.mul(1 - b1))
        self.v.mul_(b2).add_(mean_delta.mul(mean_delta).mul_(1 - b2))
        m_hat = self.m.div(1 - _powi(b1, self.steps_taken))
        v_hat = self.v.div(1 - _powi(b2, self.steps_taken))
        theta_g.sub_(m_hat.div_(v_hat.sqrt_().add_(self.eps)).mul_(lr))

    def buffers(self) -> dict[str, torch.Tensor]:
        if self.m is None or self.v is None:
            return {}
        return {"momentum": self.m, "second_moment": self.v}

    def remap(self, index_map: torch.Tensor) -> None:
        """Follow a growth event: new[i] = old[map[i]], or 0 where map[i] == -1. The step
        count is kept, so once the bias correction has faded a new parameter's first
        update is η (1−β1)/√(1−β2) sign Δ̄ (η itself for β1 0.9, β2 0.99)."""
        if self.m is not None and self.v is not None:
            self.m, self.v = remap_flat(self.m, index_map), remap_flat(self.v, index_map)

    def hparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "warmup_steps": self.warmup_steps,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {k: v.clone() for k, v in self.buffers().items()}
        if d:
            d["t"] = torch.tensor([self.steps_taken], dtype=torch.int64)
        return d

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        _check_keys(d, {"momentum", "second_moment", "t"})
        if not d:
            self.m = self.v = None
            self.steps_taken = 0
            return
        if set(d) != {"momentum", "second_moment", "t"}:
            raise ValueError(f"adam state needs momentum, second_moment and t, got {sorted(d)}")
        t = d["t"]
        if t.numel() != 1 or t.dtype != torch.int64 or int(t.item()) < 1:
            got = t.item() if t.numel() == 1 else f"{t.numel()} values"
            raise ValueError(f"adam step count t must be one int64 >= 1, got {got!r} ({t.dtype})")
        self.m, self.v = d["momentum"].clone().float(), d["second_moment"].clone().float()
        self.steps_taken = int(t.item())


def _powi(base: float, n: int) -> float:
    """base**n by squaring: only IEEE multiplications, so every platform gets the same
    double (float.__pow__ calls the C library's pow, whose last bit may differ)."""
    result = 1.0
    while n:
        if n & 1:
            result *= base
        base *= base
        n >>= 1
    return result


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
