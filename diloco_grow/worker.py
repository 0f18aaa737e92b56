"""The two halves of DiLoCo state: what every peer shares (θ_g, outer momentum, step,
architecture) and what one worker keeps to itself (model, AdamW, data, error feedback)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compression.codec import Encoded
from compression.feedback import ErrorFeedback
from diloco_grow.config import RunConfig
from diloco_grow.data import BatchStream, Corpus
from diloco_grow.growth import GrowthEvent, flat_index_map, grow_model
from diloco_grow.model import ModelConfig, MoETransformer
from diloco_grow.outer import (
    OuterOptimizer,
    assign_flat,
    flatten_params,
    make_codec,
    make_outer,
    params_hash,
    pseudo_gradient,
)
from diloco_grow.train import InnerStats, InnerTrainer


@dataclass
class GlobalState:
    """Bit-identical on every peer after every round."""

    model_cfg: ModelConfig
    theta: torch.Tensor  # θ_g, flat fp32
    outer: OuterOptimizer
    step: int = 0  # outer steps completed
    arch_epoch: int = 0  # growth events applied
    history: list[dict] = field(default_factory=list)  # committed growth events

    @classmethod
    def init(cls, cfg: RunConfig) -> GlobalState:
        torch.manual_seed(cfg.seed)  # every peer starts from the same θ_g
        model = MoETransformer(cfg.model)
        return cls(cfg.model, flatten_params(model), make_outer(cfg.outer))

    def hash(self) -> str:
        return params_hash(self.theta)

    def outer_step(self, mean_delta: torch.Tensor) -> None:
        self.outer.step(self.theta, mean_delta, self.step)  # the step index drives warmup
        self.step += 1

    def grow(self, event: GrowthEvent) -> torch.Tensor:
        """Apply a growth event to θ_g and the outer optimizer's buffers; returns the flat
        index map so the workers can remap their own per-parameter state."""
        model = MoETransformer(self.model_cfg)
        assign_flat(model, self.theta)
        grown = grow_model(model, event)
        index_map = flat_index_map(self.model_cfg, event)
        self.outer.remap(index_map)
        self.model_cfg = grown.cfg
        self.theta = flatten_params(grown)
        self.arch_epoch += 1
        self.history.append({**event.to_dict(), "hash": event.hash(), "outer_step": self.step})
        return index_map


class Worker:
    """One island: a local model trained by AdamW, plus its error-feedback residual."""

    def __init__(
        self,
        cfg: RunConfig,
        g: GlobalState,
        corpus: Corpus,
        *,
        worker: int = 0,
        n_workers: int = 1,
        total_inner_steps: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.cfg, self.device = cfg, device
        self.model = self._model_at(g)
        stream = BatchStream.for_worker(corpus, cfg, worker, n_workers)
        self.inner = InnerTrainer(self.model, cfg.inner, stream, total_inner_steps, device)
        codec = make_codec(cfg.outer.compression, cfg.outer.block_size)
        self.feedback = (
            ErrorFeedback(codec, cfg.outer.error_feedback_decay)
            if cfg.outer.error_feedback
            else None
        )
        self.codec = codec
        self.tokens_since_sync = 0

    def _model_at(self, g: GlobalState) -> MoETransformer:
        model = MoETransformer(g.model_cfg)
        assign_flat(model, g.theta)
        return model.to(self.device)

    def inner_phase(
        self, n_steps: int, should_stop: Callable[[int], bool] | None = None
    ) -> InnerStats:
        """Up to n_steps inner steps (fewer if should_stop(steps_done) says so)."""
        stats = self.inner.run(n_steps, self._counting(should_stop))
        return stats

    def _counting(self, should_stop: Callable[[int], bool] | None) -> Callable[[int], bool]:
        # tokens_since_sync must be current when should_stop reports progress to the swarm.
        def step_done(done: int) -> bool:
            self.tokens_since_sync += self.inner.tokens_per_step
            return should_stop(done) if should_stop is not None else False

        return step_done

    def contribution(self, g: GlobalState) -> tuple[Encoded, float]:
        """Encode Δ = θ_g − θ (with error feedback); weight = tokens processed (0 for a
        peer that trained nothing yet; the swarm refuses it: a mean over nothing is never
        committed)."""
        delta = pseudo_gradient(g.theta, self.model)
        if self.feedback is None:
            return self.codec.encode(delta), float(self.tokens_since_sync)
        # Keep the old residual: if the round fails, Δ is sent again next time and the
        # residual must not count this attempt's quantization error twice.
        r = self.feedback.residual
        self._residual_backup = None if r is None else r.clone()
        enc = self.feedback.compress(delta)
        return enc, float(self.tokens_since_sync)

    def round_failed(self) -> None:
        """The round was not applied: undo this attempt's error-feedback update."""
        if self.feedback is not None:
            self.feedback.residual = getattr(self, "_residual_backup", None)

    @torch.no_grad()
    def shift(self, old: GlobalState, new: GlobalState) -> None:
        """Adopt a downloaded θ_g of the same architecture *keeping* our inner progress:
        θ ← θ + (θ_g,new − θ_g,old), so our next Δ = θ_g,new − θ is the one we had.
        AdamW state, tokens and error-feedback residual stay valid and are kept."""
        assign_flat(self.model, flatten_params(self.model) + (new.theta - old.theta))

    def resync(self, g: GlobalState) -> None:
        """Adopt a downloaded θ_g of another architecture: our progress cannot be mapped
        onto it, so it is discarded (the only case that throws an inner phase away)."""
        self.model = self._model_at(g)
        if self.feedback is not None:
            self.feedback.residual = None
        self.inner.reset_optimizer(self.model)
        self.tokens_since_sync = 0

    def sync_to(self, g: GlobalState) -> None:
        """θ ← θ_g after the outer step."""
        assign_flat(self.model, g.theta)
        self.tokens_since_sync = 0

    def follow_growth(self, g: GlobalState, index_map: torch.Tensor) -> None:
        """Rebuild the model at the grown architecture; AdamW restarts with a re-warmup."""
        self.model = self._model_at(g)
        if self.feedback is not None and self.feedback.residual is not None:
            self.feedback.remap(index_map)
        self.inner.reset_optimizer(self.model)

    def clone_model(self) -> MoETransformer:
        return copy.deepcopy(self.model)
