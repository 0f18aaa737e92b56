"""Launching swarm_worker.py peers for the integration tests, and checking their results.

Each peer runs in its own session (process group), because SIGKILL of the Python process
would otherwise leave hivemind's DHT child and p2pd running; `Launcher.kill_all` kills every
group (SIGCONT first, so that a stopped one can die), whatever the test did.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import swarm_worker as worker  # pytest puts this directory on sys.path
import torch

from compression.codec import get_codec

HERE = Path(__file__).resolve().parent

NUMEL = 100_000
WEIGHTS = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
FAST = [
    "--heartbeat-s",
    "0.3",
    "--matchmaking-s",
    "1.0",
    "--phase-timeout",
    "4",
    "--round-timeout",
    "60",
]


class Peer:
    """A worker process whose stdout JSON events are collected by a reader thread."""

    def __init__(self, seed: int, args: list[str], log_dir: Path, prefix: list[str] = ()) -> None:
        self.seed = seed
        self.err_path = log_dir / f"peer{seed}.err"
        cmd = [
            *prefix,  # e.g. `ip netns exec NS` for partition tests
            sys.executable,
            str(HERE / "swarm_worker.py"),
            "--seed",
            str(seed),
            "--weight",
            str(WEIGHTS[seed]),
            "--numel",
            str(NUMEL),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=open(self.err_path, "w"),
            text=True,
            start_new_session=True,
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self.ready: dict = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))

    def wait_for(self, event: str, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                e = self.events.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    break
                continue
            self.seen.append(e)
            if e["event"] == "ready":
                self.ready = e
            if e["event"] == event:
                return e
        raise AssertionError(
            f"peer {self.seed}: no {event!r} event; log tail:\n" + self.err_path.read_text()[-3000:]
        )

    def rounds(self) -> dict[int, dict]:
        return {e["step"]: e for e in self.seen if e["event"] == "round"}

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.seen if e["event"] == kind]

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


class Launcher:
    """Starts n peers (peer 0 first, the others joining it) and kills them all at the end."""

    def __init__(self, log_dir: Path, netns: object | None = None) -> None:
        self.log_dir = log_dir
        self.netns = netns  # tests/integration/netns.Netns: peer i runs in namespace i
        self.peers: list[Peer] = []

    def start(
        self, n: int, extra: dict[int, list[str]] | None = None, common: list[str] = ()
    ) -> list[Peer]:
        extra = extra or {}
        base = [*FAST, *common, "--wait-peers", str(n), "--out", str(self.log_dir)]
        first = self._peer(0, [*base, *extra.get(0, [])])
        first.wait_for("ready")
        for seed in range(1, n):
            self._peer(seed, [*base, *extra.get(seed, []), "--join", first.ready["maddr"]])
        return self.peers

    def _peer(self, seed: int, args: list[str]) -> Peer:
        prefix: list[str] = []
        if self.netns is not None:
            prefix = self.netns.cmd(seed, [])
            args = [*args, "--host", self.netns.ips[seed]]
        p = Peer(seed, args, self.log_dir, prefix)
        self.peers.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.peers:
            p.signal_group(signal.SIGCONT)
            p.signal_group(signal.SIGKILL)
            p.proc.wait(timeout=10)


def expected_mean(seeds: list[int], step: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-weighted fp32 mean of the inputs, and the worst-case int8 error per element."""
    block = get_codec("int8").block_size
    total = sum(WEIGHTS[s] for s in seeds)
    mean = torch.zeros(NUMEL)
    bound = torch.zeros(NUMEL)
    for s in seeds:
        x = worker.contribution(s, step, NUMEL)
        mean += WEIGHTS[s] / total * x
        bound += WEIGHTS[s] / total * _half_step(x, block)
    bound += _half_step(mean, block) * 1.01 + 1e-6  # the reducer re-encodes the mean once
    return mean.numpy(), bound.numpy()


def _half_step(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-x.numel()) % block
    absmax = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, block).amax(dim=1)
    return (absmax / 127 / 2).repeat_interleave(block)[: x.numel()]


def check_round(tmp_path: Path, peers: list[Peer], step: int, contributors: list[int]) -> None:
    hashes = {p.rounds()[step]["sha256"] for p in peers}
    assert len(hashes) == 1, f"step {step}: members disagree: {hashes}"
    got = np.load(tmp_path / f"{peers[0].seed}_{step}.npy")
    want, bound = expected_mean(contributors, step)
    err = np.abs(got - want)
    assert (err <= bound).all(), f"step {step}: error {err.max()} above the int8 bound"
