"""DiLoCo vs synchronous data-parallel at equal tokens: validation loss vs bytes sent.

Same model, data streams and total tokens for every arm: sync DP (fp32 gradients
all-reduced every step) against DiLoCo with M workers for each H × codec. One JSON line
per run, then a summary line; a plot and a markdown table go to benchmarks/results/.

    python benchmarks/bench_quality.py            # full: tens of minutes on 2 cores
    python benchmarks/bench_quality.py --smoke    # about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diloco_grow.config import config_from_dict  # noqa: E402
from diloco_grow.data import load_corpus  # noqa: E402
from diloco_grow.metrics import plot_runs  # noqa: E402
from diloco_grow.simulate import SimSpec, simulate, train_sync  # noqa: E402
from diloco_grow.threads import default_threads  # noqa: E402


def run_arm(name: str, base: dict, H: int, codec: str | None, steps: int, workers: int,
            out: Path, outer_lr: float, threads: int) -> dict:
    torch.set_num_threads(threads)
    corpus = load_corpus()
    d = json.loads(json.dumps(base))
    d["inner"]["steps"] = H
    if codec is not None:
        d["outer"] = {"compression": codec, "lr": outer_lr, "momentum": 0.9,
                      "error_feedback": codec not in ("none",)}
    cfg = config_from_dict(d)
    spec = SimSpec(workers=workers, outer_steps=steps // H, out_dir=str(out / name),
                   progress=False)
    s = train_sync(cfg, spec, corpus) if codec is None else simulate(cfg, spec, corpus)
    return {"run": name, "H": H, "codec": codec or "sync-dp-fp32", "val_loss": s["val_loss"],
            "bytes_sent_per_worker": s["bytes_sent_per_worker"], "tokens": s["tokens"],
            "wall_s": s["wall_s"], "metrics": str(out / name / "metrics.jsonl")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny budget, finishes in about a minute")
    ap.add_argument("--steps", type=int, help="inner steps per worker (total budget)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--H", type=int, nargs="+", help="inner steps per outer step")
    ap.add_argument("--codecs", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--inner-lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--jobs", type=int, default=2, help="arms run in parallel processes")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per arm (0: the cores shared by jobs x workers)")
    args = ap.parse_args()
    steps = args.steps or (40 if args.smoke else 3000)
    Hs = args.H or ([10, 20] if args.smoke else [50, 250, 1000])
    codecs = ["int8"] if args.smoke and args.codecs == ["none", "int8", "int4"] else args.codecs
    base = {"preset": "tiny", "seed": 0,
            "inner": {"lr": args.inner_lr, "batch_size": args.batch_size, "warmup_steps": 50,
                      "schedule": "cosine"},
            "data": {"val_batches": 4 if args.smoke else 16}}
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    arms = [("sync", min(Hs), None)] + [(f"diloco_H{H}_{c}", H, c) for H in Hs for c in codecs]
    # --jobs arms run side by side, each with --workers simulated workers: share the cores.
    threads = args.threads or default_threads(workers=args.jobs * args.workers)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_arm, name, base, H, c, steps, args.workers, work,
                               args.outer_lr, threads) for name, H, c in arms]
        results = [f.result() for f in futures]  # an arm's failure is a bug: let it raise
    sync = results[0]
    print(json.dumps(sync), flush=True)
    for r in results[1:]:
        sent = max(1, r["bytes_sent_per_worker"])
        r["bytes_ratio_vs_sync"] = sync["bytes_sent_per_worker"] / sent
        r["val_gap_vs_sync_pct"] = 100 * (r["val_loss"] - sync["val_loss"]) / sync["val_loss"]
        print(json.dumps(r), flush=True)

    out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else "full"
    plot_runs([r["metrics"] for r in results], out / f"quality_{tag}.png",
              [r["run"] for r in results])
    lines = ["| run | H | codec | val loss | bytes/worker | × fewer bytes | gap to sync |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['H']} | {r['codec']} | {r['val_loss']:.4f} | "
                     f"{r['bytes_sent_per_worker']:.3g} | {r.get('bytes_ratio_vs_sync', 1):.0f} | "
                     f"{r.get('val_gap_vs_sync_pct', 0):+.2f}% |")
    (out / f"quality_{tag}.md").write_text(
        f"steps/worker={steps} workers={args.workers} tokens={sync['tokens']}\n\n"
        + "\n".join(lines) + "\n")
    best = min(results[1:], key=lambda r: r["val_gap_vs_sync_pct"])
    print(json.dumps({"summary": {"sync_val_loss": sync["val_loss"], "best_run": best["run"],
                                  "best_gap_pct": best["val_gap_vs_sync_pct"],
                                  "best_bytes_ratio": best["bytes_ratio_vs_sync"],
                                  "table": str(out / f'quality_{tag}.md')}}), flush=True)


if __name__ == "__main__":
    main()
