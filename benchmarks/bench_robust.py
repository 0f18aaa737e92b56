"""Robust aggregation against Byzantine workers (issue #9), in the in-process simulator.

Configurations: f=0 of 4 (the aggregator's cost on an honest run), f=1 of 4 and f=2 of 8
attackers of each kind (sign-flip −4Δ, scaled 100Δ, noise of 10‖Δ‖, nan: with int8 the
worst legal encoding, see diloco_grow/byzantine.py), each with the robust aggregator
(peers/robust.py defaults) and with the plain weighted mean. Each attacked run's final
val loss is divided by that of the honest-only run: the same configuration with only the
M−f honest workers (plain mean). A run whose θ_g stops being finite ends there and counts
as diverged. The f=0 runs repeat three times (the repeats only --timing-steps outer
steps long): seconds per round are the median over the three runs of each run's median.

One JSON line per run and a summary line on stdout; robust[_smoke].{jsonl,md} under --out.

    python benchmarks/bench_robust.py            # full: about 25 minutes on 2 cores
    python benchmarks/bench_robust.py --smoke    # under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diloco_grow.byzantine import KINDS  # noqa: E402
from diloco_grow.config import config_from_dict  # noqa: E402
from diloco_grow.data import load_corpus  # noqa: E402
from diloco_grow.metrics import read_jsonl  # noqa: E402
from diloco_grow.simulate import SimSpec, simulate  # noqa: E402
from peers.robust import RobustConfig, aggregate  # noqa: E402


def run_arm(arm: dict, base: dict, steps: int, out: Path, threads: int) -> dict:
    """One simulate run; a run that breaks (θ_g no longer finite) is reported, not raised."""
    torch.set_num_threads(threads)
    d = json.loads(json.dumps(base))
    d["robust"] = {"enabled": arm["robust"]}
    cfg = config_from_dict(d)
    byz = (arm["f"], arm["kind"]) if arm["f"] else None
    name = arm["name"]
    spec = SimSpec(
        workers=arm["workers"],
        outer_steps=arm.get("outer_steps", steps),
        out_dir=str(out / name),
        progress=False,
        byzantine=byz,
    )
    t0 = time.perf_counter()
    try:
        s = simulate(cfg, spec, load_corpus())
        val, diverged = s["val_loss"], None
    except ValueError as e:  # an honest worker's Δ is NaN/Inf: the run is over
        val, diverged = float("inf"), str(e)
    recs = [r for r in read_jsonl(out / name / "metrics.jsonl") if "val_loss" in r]
    bad = set(range(arm["workers"] - arm["f"], arm["workers"]))
    hit = [r for r in recs if bad and bad <= set(r["rejected"]) | set(r["clipped"])]
    return {
        **arm,
        "val_loss": val if math.isfinite(val) else None,
        "diverged": diverged or (None if math.isfinite(val) else f"val loss {val}"),
        "rounds": len(recs),
        "seconds": time.perf_counter() - t0,
        "s_per_round": statistics.median(r["wall_s"] for r in _per_round(recs)) if recs else None,
        "average_s_per_round": statistics.median(r["average_s"] for r in recs) if recs else None,
        # rounds in which every attacker was rejected or clipped (in some shard), and the
        # rounds in which an honest worker was (false alarms)
        "rounds_attackers_caught": sum(1 for r in hit),
        "rounds_attackers_rejected": sum(1 for r in recs if bad and bad <= set(r["rejected"])),
        "rounds_honest_rejected": sum(1 for r in recs if set(r["rejected"]) - bad),
        "rounds_honest_clipped": sum(1 for r in recs if set(r["clipped"]) - bad),
    }


def _per_round(recs: list[dict]) -> list[dict]:
    """wall_s is cumulative: turn it into each round's own seconds."""
    prev, out = 0.0, []
    for r in recs:
        out.append({"wall_s": r["wall_s"] - prev})
        prev = r["wall_s"]
    return out


def time_aggregate(sizes: list[tuple[int, int]]) -> list[dict]:
    """aggregate() alone on correlated synthetic shards (P members × n elements), median
    of 3: what a swarm reducer pays for its shard."""
    rows = []
    for p, n in sizes:
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(n, generator=g)
        parts = [mu + 0.3 * torch.randn(n, generator=g) for _ in range(p)]
        row = {"timing": "aggregate", "members": p, "numel": n}
        for label, cfg in (("plain", RobustConfig(enabled=False)), ("robust", RobustConfig())):
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                aggregate(parts, [1.0] * p, cfg)
                ts.append(time.perf_counter() - t)
            row[f"{label}_ms"] = 1e3 * statistics.median(ts)
        rows.append(row)
    return rows


def arms_for(kinds: list[str], repeats: int, timing_steps: int) -> list[dict]:
    arms = []
    for rep in range(repeats):  # f=0: the aggregator's cost on an honest run
        for robust in (True, False):
            tag = "robust" if robust else "plain"
            arms.append(
                {
                    "name": f"f0of4_{tag}_r{rep}",
                    "workers": 4,
                    "f": 0,
                    "kind": "none",
                    "robust": robust,
                    "role": "honest",
                    "repeat": rep,
                    **({"outer_steps": timing_steps} if rep else {}),
                }
            )
    for m, f in ((4, 1), (8, 2)):
        arms.append(
            {
                "name": f"honest{m - f}",
                "workers": m - f,
                "f": 0,
                "kind": "none",
                "robust": False,
                "role": "reference",
                "of": m,
            }
        )
        for kind in kinds:
            for robust in (True, False):
                tag = "robust" if robust else "plain"
                arms.append(
                    {
                        "name": f"f{f}of{m}_{kind}_{tag}",
                        "workers": m,
                        "f": f,
                        "kind": kind,
                        "robust": robust,
                        "role": "attack",
                    }
                )
    return arms


def fmt_ratio(r: dict, ref: float) -> str:
    if r["diverged"]:
        return f"diverged after {r['rounds']} round{'s' * (r['rounds'] != 1)}"
    return f"{r['val_loss'] / ref:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny budget, under a minute")
    ap.add_argument("--H", type=int, help="inner steps per outer step (full 20, smoke 2)")
    ap.add_argument("--outer-steps", type=int, help="outer steps (full 15, smoke 2)")
    ap.add_argument("--seq-len", type=int, help="bytes per sequence (full 128, smoke 32)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--inner-lr", type=float, default=2e-3)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, help="attacks (default: all)")
    ap.add_argument("--repeats", type=int, help="f=0 runs per aggregator (full 3, smoke 1)")
    ap.add_argument("--timing-steps", type=int, default=4, help="outer steps of each repeat")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    args = ap.parse_args()
    H = args.H or (2 if args.smoke else 20)
    steps = args.outer_steps or (2 if args.smoke else 15)
    seq = args.seq_len or (32 if args.smoke else 128)
    kinds = args.kinds or (["sign-flip", "nan"] if args.smoke else list(KINDS))
    repeats = args.repeats or (1 if args.smoke else 3)
    base = {
        "preset": "tiny",
        "seed": 0,
        "model": {"seq_len": seq},
        "inner": {
            "lr": args.inner_lr,
            "batch_size": args.batch_size,
            "steps": H,
            "warmup_steps": min(50, H * steps // 4),
            "schedule": "cosine",
        },
        "outer": {"compression": "int8"},
        "data": {"val_batches": 2 if args.smoke else 8},
    }
    work = Path(tempfile.mkdtemp(prefix="bench_robust_"))
    arms = arms_for(kinds, repeats, args.timing_steps)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        # Biggest first, so the two processes finish together.
        order = sorted(arms, key=lambda a: -a["workers"])
        futures = {
            a["name"]: pool.submit(run_arm, a, base, steps, work, args.threads) for a in order
        }
        results = [futures[a["name"]].result() for a in arms]
    shutil.rmtree(work)  # per-run metrics: everything reported is in robust.jsonl
    for r in results:
        print(json.dumps(r), flush=True)
    torch.set_num_threads(args.threads)
    sizes = (
        [(4, 1 << 16), (4, 1 << 20)] if args.smoke else [(4, 1 << 20), (8, 1 << 20), (4, 1 << 22)]
    )
    timings = time_aggregate(sizes)
    for t in timings:
        print(json.dumps(t), flush=True)

    by = {r["name"]: r for r in results}
    honest = {
        tag: [r for r in results if r["role"] == "honest" and r["robust"] == (tag == "robust")]
        for tag in ("robust", "plain")
    }
    med = {
        tag: {
            "val_loss": rs[0]["val_loss"],  # the full-length run (runs are deterministic)
            **{
                k: statistics.median(r[k] for r in rs)
                for k in ("s_per_round", "average_s_per_round")
            },
        }
        for tag, rs in honest.items()
    }
    lines = [
        "# Robust aggregation vs Byzantine workers",
        "",
        f"`{' '.join(['python benchmarks/bench_robust.py'] + sys.argv[1:])}` "
        f"(wall {time.perf_counter() - t0:.0f} s). In-process simulator, tiny preset "
        f"(0.26 M params), seq_len {seq}, batch {args.batch_size}, inner lr {args.inner_lr}, "
        f"H={H}, {steps} outer steps, int8 + error feedback, outer lr 0.7 / Nesterov 0.9. "
        "Robust = `peers/robust.py` defaults "
        f"({RobustConfig()}); plain = the weighted mean the swarm ran before.",
        "",
        "Cell = final val loss / the honest-only run's (same config, only the M−f honest "
        "workers, plain mean); lower is better, 1.000 = as if the attackers were absent. "
        "*diverged*: θ_g stopped being finite and an honest worker could not encode its Δ. "
        "Attackers train honestly and claim honest weights. `nan`: no codec encodes NaN, so "
        "the attacker sends the worst legal int8 encoding (every code −128 at the largest "
        "scale, every element −FLT_MAX).",
        "",
        "| attackers | kind | robust | plain mean | robust: rounds attackers rejected / "
        "caught (rejected or clipped) | honest rejected / clipped (rounds) |",
        "|---|---|---|---|---|---|",
    ]
    for m, f in ((4, 1), (8, 2)):
        ref = by[f"honest{m - f}"]["val_loss"]
        for kind in kinds:
            rob, pl = by[f"f{f}of{m}_{kind}_robust"], by[f"f{f}of{m}_{kind}_plain"]
            lines.append(
                f"| {f} of {m} | {kind} | {fmt_ratio(rob, ref)} | {fmt_ratio(pl, ref)} | "
                f"{rob['rounds_attackers_rejected']} / {rob['rounds_attackers_caught']} of "
                f"{rob['rounds']} | {rob['rounds_honest_rejected']} / "
                f"{rob['rounds_honest_clipped']} |"
            )
    lines += [
        "",
        "Honest-only references: "
        + ", ".join(
            f"{m - f} workers val {by[f'honest{m - f}']['val_loss']:.4f}"
            for m, f in ((4, 1), (8, 2))
        )
        + ".",
        "",
        f"## Cost on an honest run (f=0 of 4, median of {repeats} runs)",
        "",
        "| aggregator | final val loss | seconds per round (train + average + eval) "
        "| averaging seconds per round "
        "| honest rounds with a rejection / clip |",
        "|---|---|---|---|---|",
    ]
    for tag in ("robust", "plain"):
        rs = honest[tag]
        lines.append(
            f"| {tag} | {med[tag]['val_loss']:.4f} | {med[tag]['s_per_round']:.2f} | "
            f"{med[tag]['average_s_per_round'] * 1e3:.1f} ms | "
            f"{sum(r['rounds_honest_rejected'] for r in rs)} / "
            f"{sum(r['rounds_honest_clipped'] for r in rs)} of {sum(r['rounds'] for r in rs)} |"
        )
    lines += [
        "",
        "`aggregate()` alone on one shard of correlated synthetic contributions (what a swarm "
        "reducer adds per round; 1 thread, median of 3):",
        "",
        "| members | elements | plain | robust |",
        "|---|---|---|---|",
    ]
    for t in timings:
        lines.append(
            f"| {t['members']} | {t['numel']:,} | {t['plain_ms']:.1f} ms | "
            f"{t['robust_ms']:.1f} ms |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "_smoke" if args.smoke else ""
    (out / f"robust{tag}.md").write_text("\n".join(lines) + "\n")
    with open(out / f"robust{tag}.jsonl", "w") as fh:
        for r in results + timings:
            fh.write(json.dumps(r) + "\n")
    print(
        json.dumps(
            {
                "summary": {
                    "honest_val_loss_robust": med["robust"]["val_loss"],
                    "honest_val_loss_plain": med["plain"]["val_loss"],
                    "attacked_robust_worst_ratio": max(
                        (by[f"f{f}of{m}_{k}_robust"]["val_loss"] or math.inf)
                        / by[f"honest{m - f}"]["val_loss"]
                        for m, f in ((4, 1), (8, 2))
                        for k in kinds
                    ),
                    "table": str(out / f"robust{tag}.md"),
                }
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
