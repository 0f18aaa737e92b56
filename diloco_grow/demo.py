"""`diloco-grow demo`: a real local swarm of peer processes on 127.0.0.1.

A bootstrap peer starts first; the others join its multiaddr; the last one joins late
(after the swarm finished a few rounds) and must catch up by state transfer. Each peer
is its own OS process in its own process group, so stopping a group also stops the
hivemind DHT child and its p2pd daemon.

The demo is a private run, set up as a run owner would (README, "Running a private run"):
an owner key and a run file in the output folder, and for every peer an identity key and
the owner's certificate for it. Peers outside that list could not take part.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from diloco_grow.growth_event import GrowthEvent, growth_line
from diloco_grow.metrics import plot_runs, read_jsonl
from peers.admission import RunFile, load_or_create_owner_key, public_hex, sign
from peers.identity import load_or_create, peer_id_of_key


@dataclass(frozen=True)
class DemoSpec:
    peers: int = 3
    minutes: float = 3.0
    out_dir: str = "runs/demo"
    preset: str = "tiny"
    inner_steps: int = 25
    late_after_rounds: int = 2  # the last peer joins once the swarm has done this many
    grow: str = ""
    run: str = "demo"


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    f = log_path.open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "diloco_grow.cli", *args],
        stdout=f,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _wait_ready(log_path: Path, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if line.startswith("ready "):
                return line.split(" ", 1)[1].strip()
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with code {proc.returncode}; see {log_path}")
        time.sleep(0.2)
    raise TimeoutError(f"peer printed no ready line within {timeout:.0f}s; see {log_path}")


def stop_groups(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM every peer's process group at once (graceful leave), then SIGKILL what
    remains: p2pd and the DHT child share the group, so nothing is orphaned."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def admit_peers(out: Path, run: str, n: int, days: float = 1.0) -> list[list[str]]:
    """`run init`, then `keygen` and `admit` for each peer, in `out`: the `peer` flags each
    peer joins with. Keys already there are reused (stable peer ids across demos)."""
    owner, _ = load_or_create_owner_key(out / "owner.key")
    run_file = out / "run.json"
    RunFile(run, public_hex(owner)).save(run_file)
    flags = []
    for i in range(n):
        key = out / f"peer{i}.key"
        cert = out / f"peer{i}.cert"
        peer_id = peer_id_of_key(load_or_create(key))
        sign(owner, run, peer_id, int(time.time() + days * 86400)).save(cert)
        flags.append(["--run-file", str(run_file), "--key", str(key), "--cert", str(cert)])
    return flags


def run_demo(spec: DemoSpec) -> dict[str, Any]:
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    admitted = admit_peers(out, spec.run, spec.peers)
    print(
        f"private run {spec.run!r}: run file {out / 'run.json'}, owner key {out / 'owner.key'}, "
        f"{spec.peers} peers admitted",
        flush=True,
    )
    common = [
        "peer",
        "--run",
        spec.run,
        "--preset",
        spec.preset,
        "--inner-steps",
        str(spec.inner_steps),
        # Loopback: a sub-second heartbeat notices a late or dead peer fast, and the inner
        # phase (seconds) is still many heartbeats long, as on a real run.
        "--heartbeat-s",
        "0.5",
        "--matchmaking-s",
        "1",
    ]
    if spec.grow:
        common += ["--grow", spec.grow]
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + spec.minutes * 60
    try:
        boot_log = out / "peer0.log"
        procs.append(_spawn([*common, *admitted[0], "--out-dir", str(out / "peer0")], boot_log))
        maddr = _wait_ready(boot_log, procs[0], 120)
        print(f"bootstrap peer ready at {maddr}", flush=True)

        def joiner(i: int) -> subprocess.Popen:
            args = [*common, *admitted[i], "--join", maddr, "--out-dir", str(out / f"peer{i}")]
            return _spawn(args, out / f"peer{i}.log")

        for i in range(1, spec.peers - 1):
            procs.append(joiner(i))
        late_started = spec.peers < 2
        # On a terminal a live bar; in a log (make demo | tee, CI) one line per new step.
        tty = sys.stderr.isatty()
        bar = tqdm(total=int(spec.minutes * 60), desc="demo", unit="s", disable=not tty)
        shown_step, shown_events = -1, 0
        while time.monotonic() < deadline:
            time.sleep(1.0)
            bar.update(1)
            recs = (
                read_jsonl(out / "peer0" / "metrics.jsonl")
                if (out / "peer0" / "metrics.jsonl").exists()
                else []
            )
            if recs:
                last = recs[-1]
                bar.set_postfix(
                    step=last["step"],
                    members=last["members"],
                    loss=last["train_loss"] and round(last["train_loss"], 3),
                )
                if not tty and last["step"] != shown_step:
                    shown_step = last["step"]
                    print(
                        f"step {last['step']}: members={last['members']} "
                        f"train_loss={last['train_loss']} val_loss={last['val_loss']} "
                        f"hash={last['params_hash']}",
                        flush=True,
                    )
            events = [r for r in recs if "event" in r]
            for r in events[shown_events:]:  # a committed growth: say so, whatever the bar
                bar.write(growth_line_of(r["event"], r["step"]))
                sys.stdout.flush()
            shown_events = len(events)
            if not late_started and len(recs) >= spec.late_after_rounds:
                i = spec.peers - 1
                print(f"\nlate peer {i} joins at step {recs[-1]['step']}", flush=True)
                procs.append(joiner(i))
                late_started = True
            if any(p.poll() is not None for p in procs):
                print("\na peer exited early; stopping the demo", flush=True)
                break
        bar.close()
    finally:
        print("\nstopping the swarm", flush=True)
        stop_groups(procs)
    return summarize(out, spec.peers)


_EVENT_FIELDS = {f.name for f in dataclasses.fields(GrowthEvent)}


def growth_line_of(event: dict[str, Any], step: int) -> str:
    """The peer's growth line, rebuilt from the event in its metrics record."""
    ev = GrowthEvent.from_dict({k: v for k, v in event.items() if k in _EVENT_FIELDS})
    return growth_line(ev, event["n_params_before"], event["n_params_after"], step)


def summarize(out: Path, n_peers: int) -> dict[str, Any]:
    """Check that all peers agree on θ_g at every step and plot the bootstrap peer's loss."""
    by_step: dict[int, set[str]] = {}
    metrics = []
    for i in range(n_peers):
        path = out / f"peer{i}" / "metrics.jsonl"
        if not path.exists():
            continue
        metrics.append(path)
        for r in read_jsonl(path):
            by_step.setdefault(r["step"], set()).add(r["params_hash"])
    disagree = sorted(s for s, h in by_step.items() if len(h) > 1)
    recs = read_jsonl(metrics[0]) if metrics else []
    vals = [r["val_loss"] for r in recs if r.get("val_loss") is not None]
    summary = {
        "rounds": len(by_step),
        "steps_with_disagreeing_hashes": disagree,
        "first_val_loss": vals[0] if vals else None,
        "last_val_loss": vals[-1] if vals else None,
        "peers_with_metrics": len(metrics),
        "bytes_sent_per_peer": recs[-1]["bytes_sent_per_worker"] if recs else 0,
        "growth": [growth_line_of(r["event"], r["step"]) for r in recs if "event" in r],
    }
    if metrics:
        summary["plot"] = str(
            plot_runs(metrics, out / "loss.png", [p.parent.name for p in metrics], x="step")
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
