"""Does growing a small MoE mid-training save FLOPs? (issue 4, Benchmark)

Single-worker AdamW on the embedded corpus (stdlib source, byte tokens). For each growth
point T1 and each growth (width / depth / both, alpha in {0, 0.01}):

  grown  small model T1 steps -> grow -> T2 steps (fresh AdamW, short re-warmup)
  (a)    the small model trained T2 more steps (same optimizer, no growth)
  (b)    the grown architecture from scratch for T2 steps (= FLOPs of the grown phase)
  (c)    the grown architecture from scratch until it reaches the grown run's final val
         loss (cap: --cap steps); FLOPs interpolated linearly between evaluations

FLOPs = flops_per_token(cfg) * tokens (6 * active non-embedding params + attention, see
diloco_grow.model_config.flops_per_token). speedup = FLOPs(c) / FLOPs(small + grown).
One scratch run per grown architecture serves (b) and (c) for every T1 and alpha.
Prints one JSON line per arm; writes growth[_smoke].{jsonl,md,png} under --out.

    python benchmarks/bench_growth.py            # full (~15 min on 2 CPU cores)
    python benchmarks/bench_growth.py --smoke    # < 1 min
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diloco_grow.data import BatchStream, load_corpus, val_batches
from diloco_grow.growth import GrowthEvent, grow_model
from diloco_grow.model import ModelConfig, MoETransformer, flops_per_token
from diloco_grow.threads import set_threads

# Top-1 routing to start: width growth then gives the common 8-expert top-2 layout.
SMALL = ModelConfig(
    seq_len=64, d_model=64, n_layers=2, n_heads=4, n_experts=4, top_k=1, d_expert=128
)
GROWTHS: dict[str, list[dict]] = {
    "width": [{"kind": "experts", "factor": 2}],
    "depth": [{"kind": "depth", "factor": 2, "zero_output": True}],
    "both": [{"kind": "experts", "factor": 2}, {"kind": "depth", "factor": 2, "zero_output": True}],
}
ALPHAS = (0.0, 0.01)


@dataclass
class Run:
    """A model with its optimizer, step count and (flops, val_loss) curve."""

    model: MoETransformer
    args: argparse.Namespace
    flops: float = 0.0  # training FLOPs spent so far (including any earlier phase)
    steps: int = 0
    warmup_from: int = 0
    curve: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=self.args.lr, betas=(0.9, 0.95))
        self.warmup_from = self.steps

    def train(self, stream: BatchStream, n: int, val: list) -> None:
        """n AdamW steps (linear warmup, then constant lr), evaluating every --eval-every."""
        fpt = flops_per_token(self.model.cfg)
        for _ in range(n):
            warm = min(1.0, (self.steps - self.warmup_from + 1) / self.args.warmup)
            for g in self.opt.param_groups:
                g["lr"] = self.args.lr * warm
            x, y = stream.next()
            loss = self.model(x, y).loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.steps += 1
            self.flops += fpt * x.numel()
            if self.steps % self.args.eval_every == 0:
                self.curve.append((self.flops, evaluate(self.model, val)))


@torch.no_grad()
def evaluate(model: MoETransformer, val: list) -> float:
    model.eval()
    loss = sum(model(x, y).ce_loss.item() for x, y in val) / len(val)
    model.train()
    return loss


def flops_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First FLOP count where the curve reaches target, linearly interpolated."""
    prev = (0.0, float("inf"))
    for flops, loss in curve:
        if loss <= target:
            if prev[1] == float("inf"):
                return flops
            frac = (prev[1] - target) / (prev[1] - loss)
            return prev[0] + frac * (flops - prev[0])
        prev = (flops, loss)
    return None


def grow(model: MoETransformer, kind: str, alpha: float, seed: int) -> MoETransformer:
    for spec in GROWTHS[kind]:
        model = grow_model(model, GrowthEvent.from_dict({**spec, "alpha": alpha, "seed": seed}))
    return model


def emit(rec: dict, out: list[dict]) -> None:
    out.append(rec)
    print(json.dumps(rec), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny budget, < 1 minute")
    ap.add_argument("--t1", default="200,400", help="growth points (steps), comma-separated")
    ap.add_argument("--t2", type=int, default=400, help="steps after growth")
    ap.add_argument("--cap", type=int, default=1600, help="max steps of the scratch runs (c)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20, help="warmup and post-growth re-warmup")
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.smoke:
        args.t1, args.t2, args.cap, args.eval_every, args.val_batches = "20", 20, 60, 10, 2
        args.batch_size = 8
    set_threads(args.threads)  # one model trains at a time
    t1s = sorted(int(t) for t in args.t1.split(","))
    if args.cap < args.t2 or args.t2 % args.eval_every:
        ap.error("need --cap >= --t2 and --t2 a multiple of --eval-every")
    t0 = time.perf_counter()

    corpus = load_corpus()
    val = val_batches(corpus, seq_len=SMALL.seq_len, batch_size=args.batch_size,
                      n_batches=args.val_batches)

    def stream(position: int = 0) -> BatchStream:
        s = BatchStream(corpus, seq_len=SMALL.seq_len, batch_size=args.batch_size, seed=args.seed)
        s.position = position  # every arm sees the same batch i at its step i
        return s

    records: list[dict] = []
    # --- scratch runs of each grown architecture: (b) and (c) ---------------------------
    scratch: dict[str, Run] = {}
    for kind in GROWTHS:
        torch.manual_seed(args.seed)
        arch = grow(MoETransformer(SMALL), kind, 0.0, 0).cfg
        torch.manual_seed(args.seed)
        run = Run(MoETransformer(arch), args)
        run.train(stream(), args.cap, val)
        scratch[kind] = run

    # --- small phase, snapshotted at every growth point ----------------------------------
    torch.manual_seed(args.seed)
    small = Run(MoETransformer(SMALL), args)
    s_stream = stream()
    grown_curves: dict[str, list] = {}
    for t1 in t1s:
        small.train(s_stream, t1 - small.steps, val)
        snap = copy.deepcopy(small)
        val_before = evaluate(snap.model, val)
        # (a): the small model continues with its own optimizer.
        arm_a = copy.deepcopy(snap)
        arm_a.train(stream(t1), args.t2, val)
        val_a = arm_a.curve[-1][1]
        emit({"arm": "a_small_continued", "t1": t1, "t2": args.t2, "val_loss": val_a,
              "flops": arm_a.flops, "n_params": arm_a.model.n_params()}, records)
        grown_curves[f"a t1={t1}"] = arm_a.curve

        for kind in GROWTHS:
            sc = scratch[kind]
            val_b = next(loss for f, loss in sc.curve if f >= 0.999 * _phase_flops(sc, args))
            for alpha in ALPHAS:
                run = copy.deepcopy(snap)
                run.model = grow(run.model, kind, alpha, args.seed)
                run.reset_optimizer()
                val_after = evaluate(run.model, val)
                flops_small = run.flops
                run.train(stream(t1), args.t2, val)
                final = run.curve[-1][1]
                c_flops = flops_to_reach(sc.curve, final)
                total = run.flops
                rec = {
                    "arm": "grown", "t1": t1, "t2": args.t2, "growth": kind, "alpha": alpha,
                    "events": [GrowthEvent.from_dict({**e, "alpha": alpha}).describe()
                               for e in GROWTHS[kind]],
                    "n_params_before": snap.model.n_params(),
                    "n_params_after": run.model.n_params(),
                    "val_before_growth": val_before, "val_after_growth": val_after,
                    "loss_jump": val_after - val_before, "val_loss": final,
                    "flops_small_phase": flops_small, "flops_grown_phase": total - flops_small,
                    "flops_total": total,
                    "val_a_small_continued": val_a, "val_b_scratch_same_phase_flops": val_b,
                    "beats_a": final < val_a, "beats_b": final < val_b,
                    "c_reached": c_flops is not None,
                    "flops_c": c_flops if c_flops is not None else sc.flops,
                    # Not reached within the cap: the speed-up is at least this.
                    "speedup": (c_flops if c_flops is not None else sc.flops) / total,
                }
                emit(rec, records)
                grown_curves[f"{kind} a={alpha} t1={t1}"] = run.curve

    for kind, sc in scratch.items():
        emit({"arm": "bc_scratch", "growth": kind, "steps": sc.steps, "flops": sc.flops,
              "val_loss_at_t2": next(loss for f, loss in sc.curve
                                     if f >= 0.999 * _phase_flops(sc, args)),
              "val_loss_final": sc.curve[-1][1], "n_params": sc.model.n_params(),
              "flops_per_token": flops_per_token(sc.model.cfg)}, records)
    wall = time.perf_counter() - t0
    emit({"arm": "summary", "wall_s": round(wall, 1), "smoke": args.smoke,
          "small_cfg": SMALL.to_dict(), "batch_size": args.batch_size, "lr": args.lr,
          "flops_per_token_small": flops_per_token(SMALL)}, records)
    write_reports(args, records, grown_curves, scratch)


def _phase_flops(sc: Run, args: argparse.Namespace) -> float:
    """FLOPs of T2 steps of the scratch run's architecture (= one grown phase)."""
    return flops_per_token(sc.model.cfg) * args.t2 * args.batch_size * SMALL.seq_len


def write_reports(args: argparse.Namespace, records: list[dict], curves: dict,
                  scratch: dict[str, Run]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("growth_smoke" if args.smoke else "growth")
    stem.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    fig, axes = plt.subplots(1, len(GROWTHS), figsize=(6 * len(GROWTHS), 4.5), sharey=True)
    for ax, kind in zip(axes, GROWTHS, strict=True):
        for label, curve in curves.items():
            if label.startswith((kind + " ", "a ")):
                style = "--" if label.startswith("a ") else "-"
                ax.plot([f for f, _ in curve], [v for _, v in curve], style, label=label)
        sc = scratch[kind].curve
        ax.plot([f for f, _ in sc], [v for _, v in sc], "k-", lw=2, label=f"{kind} from scratch")
        ax.set_title(f"grow: {kind}")
        ax.set_xlabel("training FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("val loss (CE, nats/byte)")
    lo = min(v for c in [*curves.values(), *(s.curve for s in scratch.values())] for _, v in c)
    axes[0].set_ylim(lo - 0.05, lo + 1.0)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)

    lines = [
        f"# Growth benchmark{' (smoke)' if args.smoke else ''}",
        "",
        f"`python benchmarks/bench_growth.py{' --smoke' if args.smoke else ''}`; small model "
        f"{SMALL.n_experts} experts top-{SMALL.top_k}, {SMALL.n_layers} layers, "
        f"d_model {SMALL.d_model}; batch {args.batch_size}x{SMALL.seq_len} bytes, AdamW lr "
        f"{args.lr}, T2 = {args.t2} steps, scratch cap {args.cap} steps.",
        "",
        "| T1 | growth | alpha | loss jump | val (grown) | val (a) | val (b) | FLOPs total "
        "| FLOPs (c) | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["arm"] != "grown":
            continue
        sp = f"{r['speedup']:.2f}x" if r["c_reached"] else f">= {r['speedup']:.2f}x (cap)"
        lines.append(
            f"| {r['t1']} | {r['growth']} | {r['alpha']} | {r['loss_jump']:+.4f} "
            f"| {r['val_loss']:.4f} | {r['val_a_small_continued']:.4f} "
            f"| {r['val_b_scratch_same_phase_flops']:.4f} | {r['flops_total']:.3g} "
            f"| {r['flops_c']:.3g} | {sp} |"
        )
    lines += ["", f"![curves]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
