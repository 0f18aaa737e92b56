"""Quality sweep: DiLoCo vs synchronous data-parallel at equal tokens, over a grid.

Every run trains the same model on the same data streams with the same token budget:
`--steps` inner steps per worker, `--workers` workers. Sync DP (fp32 gradients
all-reduced every step, one step over all workers' batches) runs once per `--sync-lr`;
the best of those is the *tuned* baseline every DiLoCo run is compared with. DiLoCo runs
once per point of the grid (outer optimizer, outer lr, momentum, outer warmup, inner lr,
H, codec, workers, seed).

Runs go to a process pool, one torch thread each, as many at once as there are cores
(`--jobs`), so the grid uses the machine without oversubscribing it. Each finished run
appends one JSON row to `--results` (default benchmarks/results/quality_sweep.jsonl); a
rerun skips every run already there, so an interrupted sweep resumes. At the end: one
JSON line per run on stdout (with its gap to the tuned sync baseline and its bytes ratio),
a summary line, a markdown table and a Pareto plot (val-loss gap vs bytes-per-worker
reduction).

    python benchmarks/bench_quality.py --smoke                 # about a minute
    python benchmarks/bench_quality.py --steps 1200 --H 10 50 --outer-momentum 0.9 0.6
    python benchmarks/bench_quality.py --steps 25600 --H 256 --codecs int8 --tag target
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diloco_grow.config import InnerConfig, OuterConfig  # noqa: E402

SHIPPED = OuterConfig()

# The fields of a run that define it (its key in the results file), in table order.
SYNC_FIELDS = ("preset", "seq_len", "batch_size", "steps", "workers", "seed", "inner_lr",
               "inner_warmup")
DILOCO_FIELDS = SYNC_FIELDS + ("H", "codec", "outer_opt", "outer_lr", "outer_momentum",
                               "outer_warmup")  # + outer_momentum_warmup, ef_decay: keyed when set


VAL_BATCHES = 16  # --val-batches default; the committed rows were measured on it
INNER_CLIP = InnerConfig().clip  # --inner-clip default; keyed only when another is set


def run_key(run: dict[str, Any]) -> str:
    fields = DILOCO_FIELDS if run["arm"] == "diloco" else SYNC_FIELDS
    blob = json.dumps({"arm": run["arm"], **{k: run[k] for k in fields}}, sort_keys=True)
    # Fields added later enter the key only when set, so older results files (which ran
    # without them) still resume. A GPU run is another run (other kernels, other rounding).
    if run.get("device", "cpu") != "cpu":
        blob += "|" + run["device"]
    # Another val set is another measurement: its rows must neither resume nor pair with
    # rows of the default one.
    if run.get("val_batches", VAL_BATCHES) != VAL_BATCHES:
        blob += f"|val{run['val_batches']}"
    if run.get("inner_clip", INNER_CLIP) != INNER_CLIP:
        blob += f"|clip{run['inner_clip']}"
    if run["arm"] == "diloco" and run.get("outer_momentum_warmup", 0):
        blob += f"|mwarm{run['outer_momentum_warmup']}"
    if run["arm"] == "diloco" and run.get("ef_decay", 1.0) != 1.0:
        blob += f"|efdecay{run['ef_decay']}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_config(run: dict[str, Any]) -> dict[str, Any]:
    """The run's config as the TOML/dict form `config_from_dict` reads."""
    d: dict[str, Any] = {
        "seed": run["seed"],
        "model": {"preset": run["preset"], "seq_len": run["seq_len"]},
        "inner": {"lr": run["inner_lr"], "batch_size": run["batch_size"],
                  "warmup_steps": run["inner_warmup"], "schedule": "cosine",
                  "clip": run.get("inner_clip", INNER_CLIP),
                  "steps": run["H"]},
        "data": {"val_batches": run["val_batches"]},
    }
    if run["arm"] == "diloco":
        # A row without the momentum ramp ran before it existed: without one.
        outer = {"compression": run["codec"], "lr": run["outer_lr"],
                 "momentum": run["outer_momentum"], "error_feedback": run["codec"] != "none",
                 "momentum_warmup_steps": run.get("outer_momentum_warmup", 0)}
        # Only non-default keys, so a grid that does not use them runs on any config schema.
        if run["outer_opt"] != "sgd":
            outer["optimizer"] = run["outer_opt"]
        if run["outer_warmup"]:
            outer["warmup_steps"] = run["outer_warmup"]
        if run.get("ef_decay", 1.0) != 1.0:
            outer["error_feedback_decay"] = run["ef_decay"]
        d["outer"] = outer
    return d


def train_one(run: dict[str, Any], work: str) -> dict[str, Any]:
    """One run in a pool process: one torch thread, no progress bar."""
    import torch

    from diloco_grow.config import config_from_dict
    from diloco_grow.simulate import SimSpec, simulate, train_sync

    torch.set_num_threads(1)
    cfg = config_from_dict(run_config(run))
    spec = SimSpec(workers=run["workers"], outer_steps=run["steps"] // run["H"],
                   out_dir=str(Path(work) / run["key"]), progress=False,
                   device=run.get("device", "cpu"))
    s = simulate(cfg, spec) if run["arm"] == "diloco" else train_sync(cfg, spec)
    return {**run, "val_loss": s["val_loss"], "bytes_sent_per_worker": s["bytes_sent_per_worker"],
            "tokens": s["tokens"], "outer_steps": s["outer_steps"], "wall_s": s["wall_s"]}


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {"preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size,
            "steps": args.steps, "inner_warmup": args.inner_warmup,
            "inner_clip": args.inner_clip,
            "val_batches": args.val_batches}
    if args.device != "cpu":
        base["device"] = args.device
    runs = []
    for workers, seed, lr in itertools.product(args.workers, args.seeds, args.sync_lr):
        # sync evaluates every `chunk` steps: about 50 points per curve
        runs.append({**base, "arm": "sync", "workers": workers, "seed": seed, "inner_lr": lr,
                     "H": max(1, args.steps // 50)})
    axes = itertools.product(args.workers, args.seeds, args.inner_lr, args.H, args.codecs,
                             args.outer_opt, args.outer_lr, args.outer_momentum,
                             args.outer_warmup, args.momentum_warmup, args.ef_decay)
    for workers, seed, ilr, H, codec, opt, olr, mom, owarm, mwarm, efd in axes:
        if args.steps // H < 1:
            continue
        runs.append({**base, "arm": "diloco", "workers": workers, "seed": seed,
                     "inner_lr": ilr, "H": H, "codec": codec, "outer_opt": opt,
                     "outer_lr": olr, "outer_momentum": mom, "outer_warmup": owarm,
                     "outer_momentum_warmup": mwarm if opt == "sgd" and mom else 0,
                     "ef_decay": efd if codec != "none" else 1.0})
    for r in runs:
        r["key"] = run_key(r)
    return runs


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows[r["key"]] = r
    return rows


def compare(rows: list[dict[str, Any]]) -> None:
    """Add each DiLoCo row's gap to the tuned (best-lr) sync run of its budget, in place."""
    def budget(r: dict[str, Any]) -> tuple:
        return (r.get("device", "cpu"), r.get("val_batches", VAL_BATCHES)) + tuple(
            r[k] for k in SYNC_FIELDS if k not in ("inner_lr", "inner_warmup"))

    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["arm"] == "sync" and (budget(r) not in best
                                   or r["val_loss"] < best[budget(r)]["val_loss"]):
            best[budget(r)] = r
    for r in rows:
        s = best.get(budget(r))
        if r["arm"] != "diloco" or s is None:
            continue
        r["sync_val_loss"] = s["val_loss"]
        r["sync_lr"] = s["inner_lr"]
        r["gap_pct"] = 100 * (r["val_loss"] - s["val_loss"]) / s["val_loss"]
        if r["bytes_sent_per_worker"] > 0:  # one worker sends nothing: no ratio
            r["bytes_ratio"] = s["bytes_sent_per_worker"] / r["bytes_sent_per_worker"]


def budgets(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(workers, steps) of the DiLoCo rows: a front only compares runs of one budget."""
    return sorted({(r["workers"], r["steps"]) for r in rows if "bytes_ratio" in r})


def pareto(rows: list[dict[str, Any]], budget: tuple[int, int]) -> list[dict[str, Any]]:
    """Rows of one budget no other row of it beats on both axes (smaller gap and more
    bytes saved)."""
    pts = sorted((r for r in rows if "bytes_ratio" in r
                  and (r["workers"], r["steps"]) == budget), key=lambda r: -r["bytes_ratio"])
    front, best_gap = [], float("inf")
    for r in pts:
        if r["gap_pct"] < best_gap:
            front.append(r)
            best_gap = r["gap_pct"]
    return front


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    codecs = sorted({r["codec"] for r in rows if "bytes_ratio" in r})
    for c in codecs:
        pts = [r for r in rows if r.get("codec") == c and "bytes_ratio" in r]
        ax.scatter([r["bytes_ratio"] for r in pts], [r["gap_pct"] for r in pts], label=c, s=18)
    for budget in budgets(rows):
        front = pareto(rows, budget)
        ax.plot([r["bytes_ratio"] for r in front], [r["gap_pct"] for r in front], "--", lw=1,
                label=f"Pareto front, M={budget[0]}, {budget[1]} steps")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("× fewer bytes per worker than sync DP (fp32 all-reduce)")
    ax.set_ylabel("val-loss gap to tuned sync DP (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The columns that name a DiLoCo setting, in both tables; _diloco_cells fills them.
DILOCO_HEAD = "H | codec | outer | lr | μ | warm lr/μ | inner lr"


def _inner_lr_cell(r: dict[str, Any]) -> str:
    clip = r.get("inner_clip", INNER_CLIP)
    return f"{r['inner_lr']:g}" + (f" (clip {clip:g})" if clip != INNER_CLIP else "")


def _diloco_cells(r: dict[str, Any]) -> str:
    # A decayed error feedback (SparseLoCo) is part of how the codec is used.
    decay = r.get("ef_decay", 1.0)
    codec = r["codec"] + (f" (EF β {decay:g})" if decay != 1.0 else "")
    return (f"{r['H']} | {codec} | {r['outer_opt']} | {r['outer_lr']:g} | "
            f"{r['outer_momentum']:g} | {r['outer_warmup']}/{r.get('outer_momentum_warmup', 0)}"
            f" | {_inner_lr_cell(r)}")


def seed_means(rows: list[dict[str, Any]]) -> str:
    """Mean and spread of the gap over seeds, for settings run on more than one seed:
    a single seed's gap moves by a few points on these budgets, so tuning decisions
    should read this table, not one row."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["arm"] == "diloco" and "gap_pct" in r:
            # The run's own key with the seed left out: a field keyed later is pooled too.
            groups.setdefault(run_key({**r, "seed": None}), []).append(r)
    multi = sorted((g for g in groups.values() if len({r["seed"] for r in g}) > 1),
                   key=lambda g: (g[0]["workers"], g[0]["steps"],
                                  sum(r["gap_pct"] for r in g) / len(g)))
    if not multi:
        return ""
    lines = [f"| workers | steps | {DILOCO_HEAD} | seeds | mean gap | min … max |",
             "|---" * 12 + "|"]
    for g in multi:
        gaps = [r["gap_pct"] for r in g]
        lines.append(f"| {g[0]['workers']} | {g[0]['steps']} | {_diloco_cells(g[0])} | "
                     f"{len(g)} | {sum(gaps) / len(gaps):+.2f}% | "
                     f"{min(gaps):+.2f}% … {max(gaps):+.2f}% |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per run (sync first); a seed column once the file holds several seeds, a
    val-batches column once it holds several val sets (gaps pair within one), then the
    mean over seeds of every setting run on more than one."""
    seeded = len({r["seed"] for r in rows}) > 1
    vals = len({r.get("val_batches", VAL_BATCHES) for r in rows}) > 1
    sd = (" seed |" if seeded else "") + (" val batches |" if vals else "")
    head = (f"| workers | steps |{sd} {DILOCO_HEAD} | val loss | gap to tuned sync | "
            "× fewer bytes |")
    lines = [head, "|---" * (12 + seeded + vals) + "|"]

    def cells(r: dict[str, Any]) -> str:  # the optional seed and val-batches columns
        return ((f" {r['seed']} |" if seeded else "")
                + (f" {r.get('val_batches', VAL_BATCHES)} |" if vals else ""))

    syncs = [r for r in rows if r["arm"] == "sync"]
    for s in sorted(syncs, key=lambda r: (r["workers"], r["steps"], r["seed"], r["inner_lr"])):
        lines.append(f"| {s['workers']} | {s['steps']} |{cells(s)} – | sync DP | AdamW | – | – | "
                     f"– | {_inner_lr_cell(s)} | {s['val_loss']:.4f} | – | 1 |")
    dil = [r for r in rows if r["arm"] == "diloco"]
    for r in sorted(dil, key=lambda r: (r["workers"], r["steps"], r.get("gap_pct", 1e9))):
        gap = f"{r['gap_pct']:+.2f}%" if "gap_pct" in r else "no sync run"
        ratio = f"{r['bytes_ratio']:.0f}" if "bytes_ratio" in r else "–"
        lines.append(f"| {r['workers']} | {r['steps']} |{cells(r)} {_diloco_cells(r)} | "
                     f"{r['val_loss']:.4f} | {gap} | {ratio} |")
    means = seed_means(rows)
    out = "\n".join(lines) + "\n"
    return out + ("\nMean over seeds (each seed against its own tuned sync):\n\n" + means
                  if means else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a tiny grid that ends in about a minute")
    ap.add_argument("--preset", default="tiny", help="model preset (tiny, small, base)")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4, help="per worker and step")
    ap.add_argument("--steps", type=int, default=1200, help="inner steps per worker (budget)")
    ap.add_argument("--inner-warmup", type=int, default=50)
    ap.add_argument("--inner-clip", type=float, default=INNER_CLIP,
                    help="gradient-norm clip of every inner step, both arms (sync clips the "
                         "mean gradient of all workers' batches, a DiLoCo worker its own)")
    ap.add_argument("--val-batches", type=int, default=VAL_BATCHES)
    # grid axes: every combination runs
    ap.add_argument("--workers", type=int, nargs="+", default=[4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sync-lr", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3],
                    help="sync DP inner lrs; the best is the tuned baseline")
    ap.add_argument("--inner-lr", type=float, nargs="+", default=[2e-3])
    ap.add_argument("--H", type=int, nargs="+", default=[50])
    ap.add_argument("--codecs", nargs="+", default=["int8"])
    ap.add_argument("--outer-opt", nargs="+", default=["sgd"], help="sgd (Nesterov) or adam")
    # defaults: the shipped outer settings
    ap.add_argument("--outer-lr", type=float, nargs="+", default=[SHIPPED.lr])
    ap.add_argument("--outer-momentum", type=float, nargs="+", default=[SHIPPED.momentum])
    ap.add_argument("--outer-warmup", type=int, nargs="+", default=[0],
                    help="outer steps of linear outer-lr warmup")
    ap.add_argument("--momentum-warmup", type=int, nargs="+",
                    default=[SHIPPED.momentum_warmup_steps],
                    help="outer steps of linear outer-momentum warmup (sgd; 0: constant μ)")
    ap.add_argument("--ef-decay", type=float, nargs="+", default=[SHIPPED.error_feedback_decay],
                    help="error-feedback decay β (< 1: SparseLoCo's local momentum, with "
                         "--outer-momentum 0)")
    ap.add_argument("--arms", nargs="+", default=["sync", "diloco"], choices=["sync", "diloco"],
                    help="which arms of the grid to run (e.g. a sync baseline in another process)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="runs in parallel, one torch thread each")
    ap.add_argument("--device", default="cpu",
                    help="torch device of every run (cuda: the runs share the GPU; a GPU run "
                         "is only compared with GPU sync runs)")
    ap.add_argument("--results", default="benchmarks/results/quality_sweep.jsonl",
                    help="JSONL of finished runs; runs already in it are skipped")
    ap.add_argument("--tag", default="", help="name of this report's table and plot")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: report every run in --results (all grids merged)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.H, args.sync_lr, args.val_batches = 40, [10, 20], [2e-3], 2
        args.results = args.results.replace(".jsonl", "_smoke.jsonl")
        args.tag = args.tag or "smoke"
    return args


def main() -> None:
    args = parse_args()

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = read_rows(results)
    runs = [] if args.report else [r for r in grid(args) if r["arm"] in args.arms]
    todo = [r for r in runs if r["key"] not in done]
    print(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} already in {results}, "
          f"{len(todo)} to run on {args.jobs} processes", file=sys.stderr, flush=True)
    work = tempfile.mkdtemp(prefix="bench_quality_")
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=args.jobs) as pool, \
            open(results, "a") as sink, tqdm(total=len(todo), desc="runs") as bar:
        futures = [pool.submit(train_one, r, work) for r in todo]
        for f in as_completed(futures):
            row = f.result()  # a failed run is a bug: let it raise
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            done[row["key"]] = row
            bar.update(1)

    # The report covers the whole grid that has finished, both arms, whoever ran them
    # (--report: everything in the file).
    rows = list(done.values()) if args.report else [
        done[r["key"]] for r in grid(args) if r["key"] in done]
    compare(rows)
    for r in rows:
        print(json.dumps(r), flush=True)
    tag = f"quality_{args.tag}" if args.tag else results.stem
    out = results.parent
    (out / f"{tag}.md").write_text(table(rows))
    if any("bytes_ratio" in r for r in rows):
        plot_pareto(rows, out / f"{tag}.png")
    dil = [r for r in rows if "gap_pct" in r]
    best = min(dil, key=lambda r: r["gap_pct"]) if dil else None
    print(json.dumps({"summary": {
        "runs": len(rows), "table": str(out / f"{tag}.md"), "plot": str(out / f"{tag}.png"),
        "best": None if best is None else {k: best.get(k) for k in DILOCO_FIELDS + (
            "outer_momentum_warmup", "ef_decay", "val_loss", "gap_pct", "bytes_ratio")},
        "pareto": {f"M={b[0]},steps={b[1]}": [
            {k: r[k] for k in ("H", "codec", "outer_lr", "outer_momentum", "gap_pct",
                               "bytes_ratio")} for r in pareto(rows, b)] for b in budgets(rows)},
    }}), flush=True)


if __name__ == "__main__":
    main()
