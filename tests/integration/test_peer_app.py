"""The peer app as users run it: `diloco-grow peer` processes on 127.0.0.1.

Three real peers (hivemind DHT + zmq, one OS process group each); the third joins late
and must catch up by state transfer. Checked: identical θ_g hash on every peer after
every shared round, falling loss, `status --json`, a growth event committed by vote,
and a clean SIGTERM shutdown that leaves no p2pd behind.
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


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:  # whatever a failed test left: the whole group, p2pd included
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.mark.timeout(400)
def test_three_peers_late_joiner_growth_status_and_clean_exit(tmp_path, procs):
    common = [
        "peer",
        "--run",
        RUN,
        "--preset",
        "tiny",
        "--inner-steps",
        "10",
        "--matchmaking-s",
        "1.5",
        "--round-timeout-s",
        "40",
        "--grow",
        "experts:2@5",
    ]
    outs = [tmp_path / f"peer{i}" for i in range(3)]
    logs = [tmp_path / f"peer{i}.log" for i in range(3)]
    procs.append(
        spawn(
            [*common, "--out-dir", str(outs[0]), "--checkpoint-dir", str(tmp_path / "ckpt0")],
            logs[0],
        )
    )
    maddr = wait_for(lambda: ready_line(logs[0]), 120, "bootstrap ready line", procs)
    assert maddr.startswith("/ip4/127.0.0.1/tcp/")
    procs.append(spawn([*common, "--join", maddr, "--out-dir", str(outs[1])], logs[1]))
    wait_for(lambda: len(rounds(outs[0])) >= 2, 180, "two rounds on the bootstrap", procs)
    # The late joiner: must download θ_g (and the architecture) instead of starting fresh.
    procs.append(spawn([*common, "--join", maddr, "--out-dir", str(outs[2])], logs[2]))
    wait_for(
        lambda: sum(r["members"] == 3 for r in rounds(outs[2])) >= 3,
        240,
        "three 3-member rounds on the late joiner",
        procs,
    )

    def live_peers() -> list[dict] | None:
        # DHT reads may be partial for a moment; the command itself must always work.
        status = subprocess.run(
            [*CLI, "status", "--join", maddr, "--run", RUN, "--json"],
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
            "tokens_per_s",
            "bytes_sent",
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
    assert len(recs[0]) >= 5
    # The late joiner's first round is already at the swarm's step (it did not start at 0).
    assert recs[2][0]["step"] > 2
    assert recs[2][0]["params_hash"] in by_step[recs[2][0]["step"]]
    # Growth committed by vote at outer step 5 (the bootstrap was there; the others joined
    # later and received the grown architecture with the state).
    grown = [r for r in recs[0] if "event" in r]
    assert len(grown) == 1 and grown[0]["step"] == 5 and grown[0]["event"]["kind"] == "experts"
    assert recs[0][-1]["n_params"] > recs[0][0]["n_params"]
    assert recs[1][-1]["n_params"] == recs[2][-1]["n_params"] == recs[0][-1]["n_params"]
    assert all(r["arch_epoch"] == 1 for r in recs[2])
    # Loss falls on the swarm.
    vals = [r["val_loss"] for r in recs[0] if r.get("val_loss") is not None]
    assert vals[-1] < vals[0] - 0.5
    assert (tmp_path / "ckpt0" / "peer.safetensors").is_file()


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) == pgid
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
