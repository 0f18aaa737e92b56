"""The inner loop: H AdamW steps of one worker on its own batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diloco_grow.config import InnerConfig
from diloco_grow.data import BatchStream
from diloco_grow.model import ModelConfig, MoETransformer
from diloco_grow.outer import assign_flat


@dataclass
class InnerStats:
    loss: float  # mean total loss (CE + aux) over the phase
    ce_loss: float
    tokens: int
    steps: int


def lr_at(cfg: InnerConfig, step: int, total_steps: int | None, warmup_from: int = 0) -> float:
    """Linear warmup, then constant or cosine down to min_lr_ratio·lr.

    `warmup_from` restarts the ramp (after growth the optimizer state is new)."""
    since = step - warmup_from
    warm = cfg.rewarmup_steps if warmup_from > 0 else cfg.warmup_steps
    scale = 1.0
    if warm > 0 and since < warm:
        scale = (since + 1) / warm
    if cfg.schedule == "cosine" and total_steps:
        progress = min(1.0, step / max(1, total_steps))
        cos = 0.5 * (1 + math.cos(math.pi * progress))
        scale *= cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos
    return cfg.lr * scale


def make_optimizer(model: nn.Module, cfg: InnerConfig) -> torch.optim.AdamW:
    # No decay on norms (1-D gains): decaying them towards 0 only fights the model.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


class InnerTrainer:
    """One worker's model, optimizer and data stream."""

    def __init__(
        self,
        model: nn.Module,
        cfg: InnerConfig,
        stream: BatchStream,
        total_steps: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.model, self.cfg, self.stream = model, cfg, stream
        self.total_steps, self.device = total_steps, device
        self.opt = make_optimizer(model, cfg)
        self.step = 0  # inner steps taken, over the whole run
        self.warmup_from = 0

    def reset_optimizer(self, model: nn.Module | None = None) -> None:
        """Fresh AdamW (after growth the parameter set changed) with a short re-warmup."""
        if model is not None:
            self.model = model
        self.opt = make_optimizer(self.model, self.cfg)
        self.warmup_from = self.step

    def run(self, n_steps: int, should_stop: Callable[[int], bool] | None = None) -> InnerStats:
        """Up to `n_steps` AdamW steps; `should_stop(steps_done)` is asked after each one
        (a swarm peer ends its phase when the swarm is ready, not only after H steps)."""
        self.model.train()
        loss_sum = ce_sum = 0.0
        done = 0
        for _ in range(n_steps):
            lr = lr_at(self.cfg, self.step, self.total_steps, self.warmup_from)
            for g in self.opt.param_groups:
                g["lr"] = lr
            x, y = self.stream.next()
            out = self.model(x.to(self.device), y.to(self.device))
            self.opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
            self.opt.step()
            self.step += 1
            loss_sum += out.loss.item()
            ce_sum += out.ce_loss.item()
            done += 1
            if should_stop is not None and should_stop(done):
                break
        tokens = done * self.tokens_per_step
        n = max(done, 1)
        return InnerStats(loss_sum / n, ce_sum / n, tokens, done)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.stream.seq_len

    def state_dict(self) -> dict:
        return {
            "opt": self.opt.state_dict(),
            "step": self.step,
            "warmup_from": self.warmup_from,
            "data_position": self.stream.position,
        }

    def load_state_dict(self, d: dict) -> None:
        self.opt.load_state_dict(d["opt"])
        self.step, self.warmup_from = int(d["step"]), int(d["warmup_from"])
        self.stream.position = int(d["data_position"])


def evaluate_theta(
    model_cfg: ModelConfig,
    theta: torch.Tensor,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: str = "cpu",
) -> float:
    """Validation loss of a flat parameter vector (θ_g) of architecture `model_cfg`."""
    model = MoETransformer(model_cfg)
    assign_flat(model, theta)
    return evaluate(model.to(device), batches, device)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str = "cpu"
) -> float:
    """Mean cross-entropy on fixed validation batches."""
    model.eval()
    total = 0.0
    for x, y in batches:
        total += model(x.to(device), y.to(device)).ce_loss.item()
    model.train()
    return total / len(batches)
