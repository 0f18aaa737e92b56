"""In-process swarm: M DiLoCo workers in one process, for research and fast tests.

The loop below is the whole algorithm; the round itself is `loop.outer_round`, which the
networked peer (peer.py) calls too, with a network Averager instead of LocalAverager.
Rounds combine contributions as `cfg.robust` says (peers/robust.py, as a swarm reducer
does); `SimSpec.byzantine` makes the last f workers attackers (diloco_grow/byzantine.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diloco_grow import checkpoint as ckpt
from diloco_grow.byzantine import ByzantineWorker, check_byzantine
from diloco_grow.config import RunConfig
from diloco_grow.data import BatchStream, Corpus, load_corpus, val_set
from diloco_grow.growth import GrowthEvent, growth_line
from diloco_grow.local_averager import LocalAverager
from diloco_grow.loop import outer_round
from diloco_grow.metrics import MetricsWriter, read_jsonl
from diloco_grow.model import MoETransformer
from diloco_grow.train import evaluate, evaluate_theta, lr_at, make_optimizer
from diloco_grow.worker import GlobalState, Worker


@dataclass(frozen=True)
class SimSpec:
    workers: int = 4
    outer_steps: int = 10
    out_dir: str = "runs/simulate"
    grow: tuple[tuple[int, GrowthEvent], ...] = ()  # (after outer step s, event)
    checkpoint_every: int = 0  # 0: only at the end
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None  # end this process early (checkpointed), as if interrupted
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
    # (f, kind): the last f workers send poisoned contributions (research; see byzantine.py)
    byzantine: tuple[int, str] | None = None

    def __post_init__(self) -> None:
        check_byzantine(self.byzantine, self.workers)


def simulate(cfg: RunConfig, spec: SimSpec, corpus: Corpus | None = None) -> dict[str, Any]:
    """Run DiLoCo with `spec.workers` workers; returns the final summary record."""
    corpus = corpus or load_corpus(cfg.data.path, cfg.data.val_fraction)
    out = Path(spec.out_dir)
    ckpt_path = out / "checkpoint.safetensors"
    H, S, M = cfg.inner.steps, spec.outer_steps, spec.workers
    val = val_set(corpus, cfg)

    # --- state: shared θ_g + one Worker per island --------------------------------------
    g = GlobalState.init(cfg)
    totals = {"tokens": 0, "bytes_sent_per_worker": 0, "wall_s": 0.0}
    tensors = meta = None
    if spec.resume:
        tensors, meta = ckpt.read_checkpoint(ckpt_path)
        g = ckpt.global_from(tensors, meta)
        totals = meta["extra"]["totals"]
    n_bad, kind = spec.byzantine or (0, "")
    common = {"n_workers": M, "total_inner_steps": S * H, "device": spec.device}
    workers = [
        Worker(cfg, g, corpus, worker=w, **common)
        if w < M - n_bad
        else ByzantineWorker(cfg, g, corpus, worker=w, kind=kind, **common)
        for w in range(M)
    ]
    if tensors is not None:
        ckpt.restore_workers(workers, tensors, meta)
        kept = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= g.step]
    averager = LocalAverager(cfg.outer.compression, cfg.outer.block_size, cfg.robust)
    metrics = MetricsWriter(out / "metrics.jsonl")
    if tensors is not None:
        for r in kept:
            metrics.write(r)
    schedule = dict(spec.grow)
    t_start = time.perf_counter() - totals["wall_s"]
    bar = tqdm(total=S, initial=g.step, desc="outer steps", disable=not spec.progress)

    record: dict[str, Any] = {}
    while g.step < S and (spec.stop_after is None or g.step < spec.stop_after):
        # --- inner phase: every worker runs H AdamW steps from θ_g ------------------------
        stats = [w.inner_phase(H) for w in workers]
        totals["tokens"] += sum(s.tokens for s in stats)

        # --- outer round: average int8 pseudo-gradients, Nesterov, growth (loop.py) -------
        out = outer_round(g, workers, averager, scheduled=schedule.get(g.step + 1))
        totals["bytes_sent_per_worker"] += out.result.bytes_sent
        val_loss = evaluate_theta(g.model_cfg, g.theta, val, spec.device)
        if out.event is not None and out.pre_growth is not None:
            val_before = evaluate_theta(*out.pre_growth, val, spec.device)
            metrics.write(
                {
                    "step": g.step,
                    "tokens": totals["tokens"],
                    "event": {
                        **out.event.to_dict(),
                        "hash": out.event.hash(),
                        "outer_step": g.step,
                        "n_params_before": out.n_params_before,
                        "n_params_after": out.n_params_after,
                        "val_loss_before": val_before,
                        "val_loss_after": val_loss,
                    },
                }
            )
            # stderr: stdout stays one JSON line under --json; tqdm.write keeps the bar whole.
            line = growth_line(out.event, out.n_params_before, out.n_params_after, g.step)
            tqdm.write(line, file=sys.stderr)

        # --- metrics and checkpoint ------------------------------------------------------
        totals["wall_s"] = time.perf_counter() - t_start
        record = {
            "step": g.step,
            "train_loss": sum(s.ce_loss for s in stats) / M,
            "val_loss": val_loss,
            "tokens": totals["tokens"],
            "bytes_sent_per_worker": totals["bytes_sent_per_worker"],
            "wall_s": round(totals["wall_s"], 3),
            "n_params": int(g.theta.numel()),
            "arch_epoch": g.arch_epoch,
            "params_hash": g.hash(),
            "members": M,
            "average_s": round(out.result.seconds, 6),
            # which workers the robust aggregation rejected or clipped (in any shard)
            "rejected": sorted(averager.rejected),
            "clipped": sorted(averager.clipped),
        }
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(val=f"{val_loss:.3f}")
        if (spec.checkpoint_every and g.step % spec.checkpoint_every == 0) or g.step in (
            S,
            spec.stop_after,
        ):
            ckpt.save_checkpoint(ckpt_path, g, workers, {"totals": totals})
    bar.close()
    metrics.close()
    return {
        **record,
        "outer_steps": g.step,
        "workers": M,
        "compression": cfg.outer.compression,
        "inner_steps": H,
        "robust": cfg.robust.enabled,
        "byzantine": list(spec.byzantine) if spec.byzantine else None,
    }


def train_sync(cfg: RunConfig, spec: SimSpec, corpus: Corpus | None = None) -> dict[str, Any]:
    """Baseline: synchronous data-parallel AdamW, gradients averaged every step in fp32.

    Same workers' data streams and token budget as DiLoCo; gradient averaging over M
    equal batches is the gradient of their concatenation, so it runs as one model."""
    corpus = corpus or load_corpus(cfg.data.path, cfg.data.val_fraction)
    out = Path(spec.out_dir)
    H, S, M = cfg.inner.steps, spec.outer_steps, spec.workers
    val = val_set(corpus, cfg)
    torch.manual_seed(cfg.seed)
    model = MoETransformer(cfg.model).to(spec.device)
    opt = make_optimizer(model, cfg.inner)
    streams = [BatchStream.for_worker(corpus, cfg, w, M) for w in range(M)]
    n_params = sum(p.numel() for p in model.parameters())
    # A ring all-reduce of fp32 gradients sends 2·(M−1)/M·N·4 bytes per worker per step.
    bytes_per_step = int(2 * (M - 1) / M * n_params * 4) if M > 1 else 0
    metrics = MetricsWriter(out / "metrics.jsonl")
    t0, tokens, step, record = time.perf_counter(), 0, 0, {}
    for s in tqdm(range(S), desc="sync DP (H-step chunks)", disable=not spec.progress):
        ce_sum = 0.0
        for _ in range(H):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg.inner, step, S * H)
            batches = [st.next() for st in streams]
            x = torch.cat([b[0] for b in batches]).to(spec.device)
            y = torch.cat([b[1] for b in batches]).to(spec.device)
            out_ = model(x, y)
            opt.zero_grad(set_to_none=True)
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.inner.clip)
            opt.step()
            step += 1
            tokens += x.numel()
            ce_sum += out_.ce_loss.item()
        record = {
            "step": s + 1,
            "train_loss": ce_sum / H,
            "val_loss": evaluate(model, val, spec.device),
            "tokens": tokens,
            "bytes_sent_per_worker": bytes_per_step * step,
            "wall_s": round(time.perf_counter() - t0, 3),
            "n_params": n_params,
            "members": M,
        }
        metrics.write(record)
    metrics.close()
    return {
        **record,
        "outer_steps": S,
        "workers": M,
        "compression": "none (sync DP)",
        "inner_steps": H,
    }
