"""Does a real swarm keep its cores busy and learn like the in-process simulation?

P `diloco-grow peer` processes on 127.0.0.1 (real hivemind DHT + zmq, one torch thread
each) train R rounds of H inner steps; then `diloco-grow simulate` runs the same
config with P workers in one process, as the baseline measured in the same run. Per peer
(from its metrics.jsonl): utilization (fraction of wall time spent in inner steps),
rounds per minute, discarded inner phases, resyncs, and whether all peers hold the same
θ_g hash at every step. Swarm vs simulate: validation loss at equal tokens.
Targets: utilization >= 95 %, no discarded inner phase, no hash disagreement, loss within
2 % of simulate.

What is measured, exactly:
  inner time   inner_s_total (the peer's wall time inside inner phases, cumulative)
  utilization  (inner_s_total[last] - inner_s_total[first]) / (time[last] - time[first])
               over the peer's records: the R-1 full cycles between the end of round 1 and
               the end of round R (inner phase + waiting for others + all-reduce + eval).
               Start-up and the first phase are left out: peers start one after another
               and the first round is also the one that absorbs start-up skew.
  rounds/min   (records - 1) / (time[last] - time[first]) · 60, over the same span
  swarm tokens per step: sum over peers of that step's record `weight`; cumulative over
               steps, to compare with simulate's `tokens`. A record counts only the
               peer's last inner phase: if it trained two before one round (a NeedResync
               that resolved without a download, a failed round), that step and all later
               ones are lower bounds; the log shows it (extra_phase_steps) and it is flagged.
  loss diff    (swarm val − simulate val) / simulate val at the same step (primary; equal
               tokens when every peer ran H steps in every round), and at the swarm's token
               count with simulate's curve interpolated linearly (θ_0's val loss at 0
               tokens). They differ when a round had fewer tokens (a late joiner stops once
               the others are ready, pacing.py): see compare().

Both drivers get the same run TOML with inner.schedule = "constant": simulate's cosine
decays over S·H steps while a peer (open-ended) has no total and never decays, so the
default would compare two different lr schedules. Seed, preset, H and codec are the same;
the batches are not (a peer's stream is keyed by its random peer id, simulate's by worker
index): both are iid draws from the same corpus, so the loss gap is noise plus whatever
the network round does differently.

    python benchmarks/bench_swarm.py --smoke   # H=20, 2 rounds: ~2 minutes
    python benchmarks/bench_swarm.py           # 3 peers, H=200, 6 rounds: ~15 minutes
    python benchmarks/bench_swarm.py --target-tokens 600000 --slowdown-last 2  # hetero
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diloco_grow.demo import _spawn, _wait_ready, stop_groups  # noqa: E402
from diloco_grow.metrics import plot_runs, read_jsonl  # noqa: E402

# H: one inner phase must last >= 20 s with every peer training at once. Measured on the
# 2-core dev box (tiny preset, batch 16 x 64 tokens, --threads 1): one process alone
# 88 ms/step; 3 processes at once 230-260 ms/step (2 cores for 3 peers plus the box's
# other work; 132 ms/step would be the ideal 3/2 x 88). H=200 gives 26 s per phase at the
# ideal rate and ~50 s as measured, so the phase stays >= 20 s with margin either way.
DEFAULT_H = 200
ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    # stdout carries only the result line; progress goes to stderr.
    print(f"[bench_swarm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_run_config(path: Path, val_batches: int) -> Path:
    """The run TOML both drivers read (see the docstring: constant inner lr)."""
    path.write_text(f'[inner]\nschedule = "constant"\n\n[data]\nval_batches = {val_batches}\n')
    return path


def tokens_per_step(cfg_path: Path, preset: str) -> int:
    from diloco_grow.config import build_config

    cfg = build_config(cfg_path, preset)
    return cfg.inner.batch_size * cfg.model.seq_len


# ---- the swarm -----------------------------------------------------------------------


def peer_args(a: argparse.Namespace, cfg_path: Path, work: Path, i: int) -> list[str]:
    args = [
        "peer",
        "--run",
        a.run_name,
        "--open",  # a local benchmark: no admission files
        "--preset",
        a.preset,
        "--config",
        str(cfg_path),
        "--inner-steps",
        str(a.inner_steps),
        "--heartbeat-s",
        str(a.heartbeat_s),
        "--max-rounds",
        str(a.rounds),
        "--eval-every",
        "1",
        "--threads",
        "1",
        "--out-dir",
        str(work / f"peer{i}"),
    ]
    if a.matchmaking_s is not None:
        args += ["--matchmaking-s", str(a.matchmaking_s)]
    if a.min_peers is not None:
        args += ["--min-peers", str(a.min_peers)]
    if a.target_tokens:
        args += ["--target-tokens", str(a.target_tokens)]
    if a.slowdown_last and i == a.peers - 1:
        args += ["--slowdown", str(a.slowdown_last)]
    return args


def run_swarm(a: argparse.Namespace, cfg_path: Path, work: Path) -> dict[str, Any]:
    """Start peer 0, then the others joining it; wait (bounded) until all have left."""
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    timed_out, error = False, None
    try:
        procs.append(_spawn(peer_args(a, cfg_path, work, 0), work / "peer0.log"))
        maddr = _wait_ready(work / "peer0.log", procs[0], 120)
        log(f"peer0 ready at {maddr}; starting {a.peers - 1} more")
        for i in range(1, a.peers):
            procs.append(
                _spawn([*peer_args(a, cfg_path, work, i), "--join", maddr], work / f"peer{i}.log")
            )
            if a.join_mode == "staggered":  # the next joiner starts once this one is up
                _wait_ready(work / f"peer{i}.log", procs[-1], 120)
        for i, p in enumerate(procs[1:], 1):
            _wait_ready(work / f"peer{i}.log", p, 120)
        log("all peers ready")
        deadline = t0 + a.timeout
        shown = -1
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                log(f"timeout after {a.timeout:.0f}s: stopping the peers still running")
                break
            path = work / "peer0" / "metrics.jsonl"
            recs = read_jsonl(path) if path.exists() else []
            if recs and recs[-1]["step"] != shown:
                r = recs[-1]
                shown = r["step"]
                log(f"peer0 step {shown}: members={r['members']} val={r['val_loss']}")
            time.sleep(1.0)
    except (RuntimeError, TimeoutError) as e:  # a peer died or never printed `ready`
        error = str(e)
        log(f"swarm failed: {e}")
    finally:
        stop_groups(procs)  # also reaps each peer's DHT child and p2pd
    return {
        "wall_s": time.monotonic() - t0,
        "timed_out": timed_out,
        "error": error,
        "exit_codes": [p.returncode for p in procs],
    }


def peer_summary(recs: list[dict[str, Any]], log_text: str, peers: int) -> dict[str, Any]:
    """One peer's numbers from its metrics records and its log (see the docstring)."""
    s: dict[str, Any] = {"rounds": len(recs)}
    if not recs:
        return s
    first, last = recs[0], recs[-1]
    span = last["time"] - first["time"]
    inner = [recs[0]["inner_s_total"]] + [
        b["inner_s_total"] - a["inner_s_total"] for a, b in zip(recs, recs[1:], strict=False)
    ]
    cycles = [b["time"] - a["time"] for a, b in zip(recs, recs[1:], strict=False)]
    s |= {
        "steps": [r["step"] for r in recs],
        "members": [r["members"] for r in recs],
        "inner_steps": [r["inner_steps"] for r in recs],
        "inner_s": [round(x, 2) for x in inner],
        "round_s": [r["round_s"] for r in recs],
        # non-inner seconds per cycle: waiting for others, matchmaking, all-reduce, eval
        "overhead_s": [round(c - i, 2) for c, i in zip(cycles, inner[1:], strict=True)],
        "utilization": (last["inner_s_total"] - first["inner_s_total"]) / span if span else None,
        "rounds_per_min": 60 * (len(recs) - 1) / span if span else None,
        "discarded_phases": last["discarded_phases"],
        "resyncs": last["resyncs"],
        "short_rounds": sum(r["members"] < peers for r in recs),
        "peer_id": last["peer_id"],
    }
    lines = log_text.splitlines()
    # the peer's log format names levels WARN/ERROR (hivemind's own: WARNING)
    s["warnings"] = [ln for ln in lines if re.search(r" (WARN|WARNING|ERROR) ", ln)]
    s["extra_phase_steps"] = extra_phase_steps(lines)
    s["not_waiting"] = sum("not waiting any longer" in ln for ln in lines)
    s["attempts_failed"] = sum("attempt failed" in ln for ln in lines)
    return s


def extra_phase_steps(lines: list[str]) -> list[int]:
    """Steps whose round this peer entered with more than one inner phase behind it.

    After a NeedResync that resolves without a download, or a failed round, the peer trains
    another phase and sends Δ of both with weight tokens_since_sync, but its metrics record
    (`weight`, `tokens`, `inner_steps`) counts only the last phase: those steps' swarm
    tokens are lower bounds. Found from the log: such a WARN line before `round step=K`."""
    steps, pending = [], False
    for ln in lines:
        if " WARN " in ln and ("resync:" in ln or "failed (" in ln):
            pending = True
        m = re.match(r"round step=(\d+) ", ln)
        if m:
            if pending:
                steps.append(int(m.group(1)))
            pending = False
    return steps


def swarm_curve(per_peer: list[list[dict[str, Any]]], extra: set[int]) -> list[dict[str, Any]]:
    """Per step: the swarm's cumulative tokens, val loss and hashes over all peers.
    `extra`: steps some peer reached with an uncounted extra phase (extra_phase_steps);
    from the first of them on, the cumulative tokens are lower bounds."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for recs in per_peer:
        for r in recs:
            by_step.setdefault(r["step"], []).append(r)
    out, tokens = [], 0
    for step in sorted(by_step):
        rs = by_step[step]
        tokens += sum(r["weight"] for r in rs)
        vals = [r["val_loss"] for r in rs if r.get("val_loss") is not None]
        out.append(
            {
                "step": step,
                "tokens": tokens,
                "val_loss": statistics.mean(vals) if vals else None,
                "hashes": len({r["params_hash"] for r in rs}),
                "records": len(rs),
                "members": max(r["members"] for r in rs),
                "tokens_lower_bound": any(e <= step for e in extra),
            }
        )
    return out


# ---- the baseline ----------------------------------------------------------------------


def run_simulate(a: argparse.Namespace, cfg_path: Path, work: Path, H: int) -> list[dict]:
    out = work / "simulate"
    cmd = [
        sys.executable,
        "-m",
        "diloco_grow.cli",
        "simulate",
        "--workers",
        str(a.peers),
        "--inner-steps",
        str(H),
        "--outer-steps",
        str(a.rounds),
        "--preset",
        a.preset,
        "--config",
        str(cfg_path),
        "--threads",
        "1",
        "--out",
        str(out),
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (work / "simulate.log").open("w") as f:
        subprocess.run(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            check=True,
            timeout=a.timeout,
        )
    return [r for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r]


def initial_val_loss(cfg_path: Path, preset: str) -> float:
    """θ_0's val loss (the same seed on both drivers): the curve's point at 0 tokens."""
    from diloco_grow.config import build_config
    from diloco_grow.data import load_corpus, val_set
    from diloco_grow.train import evaluate_theta
    from diloco_grow.worker import GlobalState

    cfg = build_config(cfg_path, preset)
    g = GlobalState.init(cfg)
    corpus = load_corpus(cfg.data.path, cfg.data.val_fraction)
    return evaluate_theta(g.model_cfg, g.theta, val_set(corpus, cfg))


def compare(
    curve: list[dict[str, Any]], sim: list[dict[str, Any]], val0: Callable[[], float]
) -> list[dict[str, Any]]:
    """Swarm vs simulate val loss for each swarm step that simulate's run has.

    `rel_step`: at the same step (the primary number: tokens are equal when every peer ran
    H steps in every round). `rel_tokens`: at the swarm's token count, simulate's curve
    interpolated linearly between its steps and θ_0's loss (`val0()`) at 0 tokens. The two
    differ when a round had fewer tokens (a late joiner's partial phase): the same-step
    number then handicaps the swarm, while the interpolation, on a convex curve, favours it
    (and early on a DiLoCo round's progress depends more on the round than its tokens)."""
    import numpy as np

    sim_at = {r["step"]: r for r in sim}
    xs = ys = None
    rows = []
    for c in curve:
        s = sim_at.get(c["step"])
        if c["val_loss"] is None or s is None:
            continue
        if s["tokens"] == c["tokens"]:
            at_tokens = s["val_loss"]
        else:
            if xs is None:
                xs = [0] + [r["tokens"] for r in sim]
                ys = [val0()] + [r["val_loss"] for r in sim]
            at_tokens = float(np.interp(c["tokens"], xs, ys))  # clamps past the last step
        rows.append(
            {
                "step": c["step"],
                "tokens": c["tokens"],
                "sim_tokens": s["tokens"],
                "swarm": c["val_loss"],
                "simulate": s["val_loss"],
                "rel_step": (c["val_loss"] - s["val_loss"]) / s["val_loss"],
                "simulate_at_tokens": at_tokens,
                "rel_tokens": (c["val_loss"] - at_tokens) / at_tokens,
                "tokens_lower_bound": c["tokens_lower_bound"],
            }
        )
    return rows


# ---- report ------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_report(
    path: Path,
    a: argparse.Namespace,
    result: dict,
    peers: list[dict],
    rows: list[dict],
    swarm: dict,
    work: Path,
) -> None:
    hetero = (f", target_tokens={a.target_tokens}" if a.target_tokens else "") + (
        f", last peer {a.slowdown_last}x slower" if a.slowdown_last else ""
    )
    lines = [
        f"# Swarm benchmark ({a.peers} peers, {a.preset}, H={a.inner_steps}, "
        f"{a.rounds} rounds{hetero})",
        "",
        f"heartbeat {a.heartbeat_s}s, matchmaking "
        f"{a.matchmaking_s if a.matchmaking_s is not None else 'default'}, one torch thread "
        f"per peer, inner.schedule = constant for both drivers; logs and metrics in `{work}`.",
        "",
        "```json",
        json.dumps(result),
        "```",
        "",
        "| peer | rounds | members per round | inner steps | inner s (median) | overhead s "
        "per cycle | utilization | rounds/min | discarded | resyncs | warnings | extra phase "
        "before step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(peers):
        if p["rounds"] == 0:
            lines.append(f"| {i} | 0 | - | - | - | - | - | - | - | - | - | - |")
            continue
        lines.append(
            f"| {i} | {p['rounds']} | {p['members']} | {p['inner_steps']} | "
            f"{_fmt(statistics.median(p['inner_s']), '.1f')} | {p['overhead_s']} | "
            f"{_fmt(p['utilization'])} | {_fmt(p['rounds_per_min'], '.2f')} | "
            f"{p['discarded_phases']} | {p['resyncs']} | {len(p['warnings'])} | "
            f"{p['extra_phase_steps'] or '-'} |"
        )
    lines += [
        "",
        "Utilization = inner seconds / wall seconds between a peer's first and last record "
        "(R-1 full cycles); overhead = the rest of each cycle (waiting, matchmaking, "
        "all-reduce, eval).",
        "",
        "| step | swarm tokens | simulate tokens | swarm val | simulate val (same step) | "
        "rel diff | simulate val at swarm tokens (interp.) | rel diff at equal tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lb = " (lower bound: uncounted extra phase)" if r["tokens_lower_bound"] else ""
        lines.append(
            f"| {r['step']} | {r['tokens']}{lb} | {r['sim_tokens']} | {r['swarm']:.4f} | "
            f"{r['simulate']:.4f} | {100 * r['rel_step']:+.2f}% | "
            f"{r['simulate_at_tokens']:.4f} | {100 * r['rel_tokens']:+.2f}% |"
        )
    lines += [
        "",
        "Same step is the primary comparison (equal tokens when every peer ran H steps each "
        "round). When a round had fewer tokens (a late joiner's partial phase), it handicaps "
        "the swarm, while the interpolation at equal tokens favours it (convex curve).",
    ]
    end = f"swarm: exit codes {swarm['exit_codes']}, timed out: {swarm['timed_out']}"
    lines += ["", end + (f", error: {swarm['error']}" if swarm["error"] else "")]
    warns = [(i, w) for i, p in enumerate(peers) for w in p.get("warnings", [])]
    if warns:
        lines += ["", "Warnings in the peers' logs:", "", "```"]
        lines += [f"peer{i}: {w}" for i, w in warns[:40]]
        lines += ["```"]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, work: Path, per_peer: list[list[dict]], curve: list[dict]) -> Path:
    """plot_runs reads metrics files and a peer's own `tokens` counts only its share, so
    write each peer's records with the swarm's cumulative tokens at that step."""
    swarm_tokens = {c["step"]: c["tokens"] for c in curve}
    paths, labels = [], []
    for i, recs in enumerate(per_peer):
        p = work / f"plot_peer{i}.jsonl"
        p.write_text(
            "".join(json.dumps({**r, "tokens": swarm_tokens[r["step"]]}) + "\n" for r in recs)
        )
        paths.append(p)
        labels.append(f"swarm peer {i}")
    paths.append(work / "simulate" / "metrics.jsonl")
    labels.append("simulate (in-process)")
    return plot_runs(paths, path, labels)


# ---- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true", help="H=20, 2 rounds: about 2 minutes")
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--inner-steps", "-H", type=int, help=f"default {DEFAULT_H} (smoke: 20)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds each peer runs (--max-rounds)")
    ap.add_argument("--heartbeat-s", type=float, default=1.0)
    ap.add_argument("--matchmaking-s", type=float, help="default: the peer's own")
    ap.add_argument(
        "--min-peers", type=int, help="peer --min-peers (default: the peer's own; smoke: P)"
    )
    ap.add_argument(
        "--target-tokens",
        type=int,
        help="heterogeneous mode: tokens per round for the whole swarm (peer --target-tokens);"
        " simulate then runs H = target / (peers x tokens per step)",
    )
    ap.add_argument("--slowdown-last", type=float, help="the last peer is F times slower")
    ap.add_argument(
        "--join-mode",
        choices=["together", "staggered"],
        default="together",
        help="start the joiners at once after peer 0 (as `demo`), or each after the last "
        "one's ready line",
    )
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--timeout", type=float, help="seconds for the swarm (default from H, R)")
    ap.add_argument("--out", help="report prefix (default benchmarks/results/swarm[_smoke])")
    ap.add_argument("--work", default="runs/bench_swarm", help="peers' logs and metrics")
    a = ap.parse_args()
    if a.smoke:
        a.inner_steps = a.inner_steps or 20
        a.rounds = 2
        # Peer 0 trains from its `ready` line on, and a joiner takes ~30 s to start on a busy
        # 2-core box: with 20-step phases peer 0 would finish both rounds alone and leave
        # before the joiners can bootstrap through it. min_peers = P makes it wait for them.
        if a.min_peers is None:
            a.min_peers = a.peers
    a.inner_steps = a.inner_steps or DEFAULT_H
    if a.peers < 2:
        ap.error("--peers must be >= 2")
    out = Path(a.out or f"benchmarks/results/swarm{'_smoke' if a.smoke else ''}")
    # Bounded wait: start-up, then R phases at a pessimistic 0.5 s/step (the slowed peer
    # slower still), plus a minute for rounds and shutdown.
    a.timeout = a.timeout or 240 + a.rounds * a.inner_steps * 0.5 * (a.slowdown_last or 1) + 60
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = Path(a.work).resolve() / stamp  # fresh: a peer appends to an existing metrics.jsonl
    work.mkdir(parents=True, exist_ok=False)
    a.run_name = f"bench-swarm-{stamp}"
    cfg_path = write_run_config(work / "run.toml", a.val_batches)
    tps = tokens_per_step(cfg_path, a.preset)
    sim_H = a.inner_steps
    if a.target_tokens:
        sim_H = max(1, round(a.target_tokens / (a.peers * tps)))

    t0 = time.monotonic()
    log(f"swarm: {a.peers} peers, H={a.inner_steps}, {a.rounds} rounds; work dir {work}")
    swarm = run_swarm(a, cfg_path, work)
    per_peer = []
    for i in range(a.peers):
        path = work / f"peer{i}" / "metrics.jsonl"
        per_peer.append(read_jsonl(path) if path.exists() else [])
    logs = [
        (work / f"peer{i}.log").read_text() if (work / f"peer{i}.log").exists() else ""
        for i in range(a.peers)
    ]
    peers = [peer_summary(r, t, a.peers) for r, t in zip(per_peer, logs, strict=True)]
    extra = {k for p in peers for k in p.get("extra_phase_steps", [])}
    curve = swarm_curve(per_peer, extra)

    # The baseline runs after the swarm, never beside it: it would take the swarm's cores.
    log(f"simulate: {a.peers} workers, H={sim_H}, {a.rounds} outer steps")
    sim_error = None
    try:
        sim = run_simulate(a, cfg_path, work, sim_H)
    except (subprocess.SubprocessError, OSError) as e:  # report the swarm's numbers anyway
        sim, sim_error = [], f"{e}; see {work / 'simulate.log'}"
        log(f"simulate failed: {sim_error}")
    cache: list[float] = []

    def val0() -> float:
        if not cache:
            cache.append(initial_val_loss(cfg_path, a.preset))
        return cache[0]

    rows = compare(curve, sim, val0)

    utils = [p["utilization"] for p in peers if p.get("utilization") is not None]
    rpm = [p["rounds_per_min"] for p in peers if p.get("rounds_per_min") is not None]
    inner_s = [x for p in peers for x in p.get("inner_s", [])[1:]] or [
        x for p in peers for x in p.get("inner_s", [])
    ]
    final = rows[-1] if rows else None

    def r4(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    result: dict[str, Any] = {
        "bench": "swarm",
        "peers": a.peers,
        "inner_steps": a.inner_steps,
        "rounds": a.rounds,
        "target_tokens": a.target_tokens,
        "slowdown_last": a.slowdown_last,
        "inner_s_median": round(statistics.median(inner_s), 2) if inner_s else None,
        "utilization_min": round(min(utils), 4) if utils else None,
        "utilization_median": round(statistics.median(utils), 4) if utils else None,
        "rounds_per_min": round(statistics.median(rpm), 3) if rpm else None,
        "discarded_phases": sum(p.get("discarded_phases", 0) for p in peers),
        "resyncs": sum(p.get("resyncs", 0) for p in peers),
        "short_rounds": sum(p.get("short_rounds", 0) for p in peers),
        "warnings": sum(len(p.get("warnings", [])) for p in peers),
        "hash_disagreements": sum(c["hashes"] > 1 for c in curve),
        "steps_with_extra_phases": sorted(extra),
        "steps_compared": len(rows),
        "tokens_ratio_final": r4(final["tokens"] / final["sim_tokens"]) if final else None,
        "val_loss_swarm_final": r4(final["swarm"]) if final else None,
        "val_loss_simulate_final": r4(final["simulate"]) if final else None,
        "loss_rel_diff_final": r4(final["rel_step"]) if final else None,
        "loss_rel_diff_max": r4(max(abs(r["rel_step"]) for r in rows)) if rows else None,
        "loss_rel_diff_final_equal_tokens": r4(final["rel_tokens"]) if final else None,
        "loss_rel_diff_max_equal_tokens": (
            r4(max(abs(r["rel_tokens"]) for r in rows)) if rows else None
        ),
        "swarm_timed_out": swarm["timed_out"],
        "swarm_exit_codes": swarm["exit_codes"],
        "wall_s": round(time.monotonic() - t0, 1),
    }
    if swarm["error"]:
        result["swarm_error"] = swarm["error"]
    if sim_error:
        result["simulate_error"] = sim_error
    result["targets_met"] = bool(
        utils
        and min(utils) >= 0.95
        and result["discarded_phases"] == 0
        and result["hash_disagreements"] == 0
        and result["loss_rel_diff_max"] is not None
        and result["loss_rel_diff_max"] <= 0.02
        and not extra  # else the loss comparison is at unknown tokens
        and not swarm["timed_out"]
        and not swarm["error"]
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out.with_suffix(".md"), a, result, peers, rows, swarm, work)
    if any(per_peer) and sim:
        plot(out.with_suffix(".png"), work, per_peer, curve)
    with out.with_suffix(".jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    (work / "peers.json").write_text(json.dumps(peers, indent=1))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
