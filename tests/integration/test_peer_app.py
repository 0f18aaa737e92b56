"""The peer app as users run it: `diloco-grow peer` processes on 127.0.0.1.

Three real peers (hivemind DHT + zmq, one OS process group each); the third joins late
and must catch up by state transfer. Checked: identical θ_g hash on every peer after
every shared round, falling loss, `status --json`, a growth event committed by vote,
and a clean SIGTERM shutdown that leaves no p2pd behind. The first test is a private run
(run file, identity keys, certificates: as `diloco-grow demo` sets it up); the second an
open one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from diloco_grow.demo import admit_peers
from diloco_grow.metrics import read_jsonl

CLI = [sys.executable, "-m", "diloco_grow.cli"]
RUN = f"it{os.getpid()}"


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*CLI, *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_for(pred, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a peer died while waiting for {what} (code {p.returncode})")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ready_line(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        if line.startswith("ready "):
            return line.split()[1]
    return None


def rounds(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


H = 60  # ~5-8 s of tiny-model training per phase here: >= 10x the heartbeat and grace
FAST = ["--heartbeat-s", "0.3", "--matchmaking-s", "0.5", "--phase-timeout-s", "4"]


def common_args(*extra: str) -> list[str]:
    return ["peer", "--run", RUN, "--preset", "tiny", "--inner-steps", str(H), *FAST, *extra]


@pytest.mark.timeout(420)
def test_late_joiner_under_real_timing_growth_status_and_clean_exit(tmp_path, procs):
    """The resync-loop scenario: two founders with inner phases many heartbeats long, a
    third peer joins after two rounds. Nobody throws an inner phase away, the founders
    advance once per phase, θ_g agrees everywhere, and the loss never rises above its
    value at the join."""
    # --min-peers 2: the bootstrap's first round waits for the second founder however slow
    # its start-up, so both founders begin at step 0 (a later start would make it a joiner).
    common = common_args("--grow", "experts:2@6", "--min-peers", "2")
    admitted = admit_peers(tmp_path, RUN, 3)  # --run-file, --key, --cert per peer
    outs = [tmp_path / f"peer{i}" for i in range(3)]
    logs = [tmp_path / f"peer{i}.log" for i in range(3)]
    boot = [*common, *admitted[0], "--out-dir", str(outs[0])]
    procs.append(spawn([*boot, "--checkpoint-dir", str(tmp_path / "ckpt0")], logs[0]))
    maddr = wait_for(lambda: ready_line(logs[0]), 120, "bootstrap ready line", procs)
    assert maddr.startswith("/ip4/127.0.0.1/tcp/")
    procs.append(
        spawn([*common, *admitted[1], "--join", maddr, "--out-dir", str(outs[1])], logs[1])
    )
    wait_for(lambda: len(rounds(outs[0])) >= 2, 180, "two rounds on the bootstrap", procs)
    # The late joiner: downloads θ_g mid-round and joins the swarm's next round.
    procs.append(
        spawn([*common, *admitted[2], "--join", maddr, "--out-dir", str(outs[2])], logs[2])
    )
    wait_for(lambda: len(rounds(outs[2])) >= 5, 300, "five rounds on the late joiner", procs)

    def live_peers() -> list[dict] | None:
        # DHT reads may be partial for a moment; the command itself must always work.
        status = subprocess.run(
            [*CLI, "status", "--join", maddr, "--run-file", str(tmp_path / "run.json"), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stderr
        found = json.loads(status.stdout.strip().splitlines()[-1])["peers"]
        return found if len(found) == 3 else None

    peers = wait_for(live_peers, 200, "status --json listing all three peers", procs)
    for p in peers:
        assert {
            "peer_id",
            "step",
            "arch_epoch",
            "params_hash",
            "loss",
            "val_loss",
            "tokens_per_s",
        } <= set(p)
        assert p["step"] >= 3 and len(p["params_hash"]) == 16

    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p, log in zip(procs, logs, strict=True):
        try:
            code = p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"no clean exit after SIGTERM: {log.read_text()[-3000:]}"
            ) from None
        assert code == 0, log.read_text()[-2000:]
        assert "stopped" in log.read_text()
        # SIGTERM reached the app, which shut down its DHT: no p2pd left in the group.
        left = [q for q in psutil.process_iter(["cmdline"]) if _in_group(q, p.pid)]
        assert not left, f"orphans: {[q.info['cmdline'] for q in left]}"

    recs = [rounds(o) for o in outs]
    # θ_g is bit-identical on every peer after every round they took part in.
    by_step: dict[int, set[str]] = {}
    for rs in recs:
        for r in rs:
            by_step.setdefault(r["step"], set()).add(r["params_hash"])
    assert all(len(h) == 1 for h in by_step.values()), by_step
    # The founders advance exactly once per full inner phase: no phase cut short, thrown
    # away or resynced over. (The second founder, started while the first was training,
    # joins that first round late: it stops with the first, contributing what it has.)
    for rs in recs[:2]:
        assert [r["step"] for r in rs] == list(range(rs[0]["step"], rs[0]["step"] + len(rs)))
        assert all(r["inner_steps"] == H for r in rs[1:]), [r["inner_steps"] for r in rs]
        assert rs[-1]["discarded_phases"] == 0 and rs[-1]["resyncs"] == 0
    assert recs[0][0]["inner_steps"] == H
    # The joiner downloaded θ_g when joining (twice if the swarm committed a round during
    # its download: the second one shifts its progress, it loses nothing), trained and
    # contributed from its first round on, at the swarm's step (it did not start at 0),
    # and every later round had all three.
    joiner = recs[2]
    assert 1 <= joiner[-1]["resyncs"] <= 2 and joiner[-1]["discarded_phases"] == 0
    join_step = joiner[0]["step"] - 1
    assert join_step >= 2
    assert all(r["weight"] > 0 for r in joiner)
    # (The last rounds may race the SIGTERMs, which reach the peers one after the other.)
    assert all(r["members"] == 3 for r in joiner[:-1]), [r["members"] for r in joiner]
    # Validation loss after the join never climbs above its value at the join.
    val = {r["step"]: r["val_loss"] for r in recs[0]}
    after = [val[s] for s in sorted(val) if s > join_step]
    assert len(after) >= 5 and max(after) <= val[join_step], (val[join_step], after)
    # The growth vote (every peer votes experts x2 at step 6) committed once, for all.
    grown = [r for rs in recs for r in rs if "event" in r]
    assert {r["step"] for r in grown} == {6} and len(grown) == 3
    assert "growth step=6 experts x2" in logs[0].read_text()


@pytest.mark.timeout(360)
def test_target_tokens_slow_peer_does_not_pace_the_swarm(tmp_path, procs):
    """Three peers, one three times slower, agree on tokens per round: the round ends when
    the swarm has them, the slow peer contributes fewer steps with a matching weight."""
    target = 3 * 40 * 1024  # tokens per round: ~40 steps per peer if all were equally fast
    common = common_args("--open", "--target-tokens", str(target))
    outs = [tmp_path / f"peer{i}" for i in range(3)]
    logs = [tmp_path / f"peer{i}.log" for i in range(3)]
    # The bootstrap may train alone until the joiners are up (seconds on a loaded machine),
    # and two fresh joiners do not confirm a lone peer's state (lineage.target), so it may
    # then adopt theirs: it stays for more rounds, so that the joiners' 6 are shared.
    procs.append(spawn([*common, "--max-rounds", "10", "--out-dir", str(outs[0])], logs[0]))
    maddr = wait_for(lambda: ready_line(logs[0]), 120, "bootstrap ready line", procs)
    joiner = [*common, "--max-rounds", "6", "--join", maddr]
    procs.append(spawn([*joiner, "--out-dir", str(outs[1])], logs[1]))
    procs.append(spawn([*joiner, "--out-dir", str(outs[2]), "--slowdown", "3"], logs[2]))
    for p in procs:
        p.wait(timeout=330)
    # A peer that adopted another line repeats its steps: its latest record of a step counts.
    recs = [{r["step"]: r for r in rounds(o)} for o in outs]
    full = sorted(
        s
        for s in set.intersection(*(set(rs) for rs in recs))
        if all(rs[s]["members"] == 3 for rs in recs)
    )
    # A round right after a peer adopted the swarm's state is not a plain one: that peer's
    # weight also holds the steps it trained before adopting (Worker.shift keeps them, as
    # it does for a late joiner: peer.py), so the others may have needed a single step.
    plain = [
        s
        for s in full
        if all(s - 1 in rs and rs[s - 1]["resyncs"] == rs[s]["resyncs"] for rs in recs)
    ]
    assert len(plain) >= 3, [
        [(r["step"], r["members"], r["resyncs"]) for r in rounds(o)] for o in outs
    ]
    for s in full:
        for r in (rs[s] for rs in recs):  # weight is tokens, in whole steps
            assert r["weight"] >= r["inner_steps"] * 1024 and r["weight"] % 1024 == 0, r
    for s in plain:
        fast, slow = [rs[s] for rs in recs[:2]], recs[2][s]
        # Weight is what each peer trained this phase, nothing more or less ...
        for r in (*fast, slow):
            assert r["weight"] == r["inner_steps"] * 1024, r
        # ... the slow peer did far fewer steps than the fast peers in the same round ...
        assert slow["inner_steps"] <= 0.6 * min(f["inner_steps"] for f in fast), (
            slow["inner_steps"],
            [f["inner_steps"] for f in fast],
        )
        # ... and the swarm together reached the target (within a heartbeat's overshoot).
        total = sum(r["weight"] for r in [*fast, slow])
        assert target <= total <= 1.5 * target, total
    # Every round the three signed leaves one θ_g on all three. (Other steps may differ:
    # the bootstrap's solo steps from before it adopted the joiners' line.)
    for s in full:
        assert len({rs[s]["params_hash"] for rs in recs}) == 1, s


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) == pgid
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
