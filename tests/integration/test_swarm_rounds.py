"""Real peer processes on 127.0.0.1 averaging int8 vectors through peers.Swarm.

Each peer is `swarm_worker.py` in its own session (process group), because SIGKILL of the
Python process would otherwise leave hivemind's DHT child and p2pd running; the fixture kills
every group at the end, whatever happened.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq

from compression.codec import get_codec
from compression.wire import pack, pack_message

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("swarm_worker", HERE / "swarm_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

NUMEL = 100_000
WEIGHTS = {0: 1.0, 1: 2.0, 2: 3.0}
FAST = ["--matchmaking-s", "1.0", "--phase-timeout", "4", "--round-timeout", "60"]


class Peer:
    """A worker process whose stdout JSON events are collected by a reader thread."""

    def __init__(self, seed: int, args: list[str], log_dir: Path) -> None:
        self.seed = seed
        self.err_path = log_dir / f"peer{seed}.err"
        cmd = [sys.executable, str(HERE / "swarm_worker.py"), "--seed", str(seed),
               "--weight", str(WEIGHTS[seed]), "--numel", str(NUMEL), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.err_path, "w"),
                                     text=True, start_new_session=True)
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
            if e["event"] == event:
                return e
        raise AssertionError(f"peer {self.seed}: no {event!r} event; log tail:\n"
                             + self.err_path.read_text()[-3000:])

    def rounds(self) -> dict[int, dict]:
        return {e["step"]: e for e in self.seen if e["event"] == "round"}

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture
def swarm(tmp_path):
    peers: list[Peer] = []

    def start(n: int, extra: dict[int, list[str]] | None = None, common: list[str] = ()) -> list:
        extra = extra or {}
        first = Peer(0, [*FAST, *common, *extra.get(0, []), "--wait-peers", str(n),
                         "--out", str(tmp_path)], tmp_path)
        peers.append(first)
        first.ready = first.wait_for("ready")
        maddr = first.ready["maddr"]
        for seed in range(1, n):
            peers.append(Peer(seed, [*FAST, *common, *extra.get(seed, []), "--join", maddr,
                                     "--wait-peers", str(n), "--out", str(tmp_path)], tmp_path))
        return peers

    yield start
    for p in peers:  # SIGCONT first so a stopped group can die; then kill the whole group
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


@pytest.mark.timeout(150)
def test_three_peers_agree_bit_for_bit_and_send_the_expected_bytes(swarm, tmp_path):
    # Peers 0 and 1 vote to grow at step 1 (2 of 3 = quorum); only peer 0 at step 2.
    peers = swarm(3, extra={0: ["--vote-step", "1", "--vote-step", "2"],
                            1: ["--vote-step", "1"]})
    done = [p.wait_for("done") for p in peers]
    block = get_codec("int8").block_size
    ideal = 2 * 2 / 3 * NUMEL * (8 + 32 / block) / 8  # reduce-scatter + all-gather, int8
    for step in range(3):
        check_round(tmp_path, peers, step, [0, 1, 2])
        for p in peers:
            r = p.rounds()[step]
            assert len(r["members"]) == 3 and r["attempts"] == 1
            # Data plus a few small control messages: within 3% of the ideal volume.
            assert ideal <= r["bytes_sent"] <= 1.03 * ideal, (r["bytes_sent"], ideal)
            assert ideal <= r["bytes_recv"] <= 1.03 * ideal, (r["bytes_recv"], ideal)
            assert r["committed"] == (worker.GROW if step == 1 else None)
    # The committed event is in the DHT history for joiners, once, from the round's leader.
    for d in done:
        assert [(h["arch_epoch"], h["step"], h["vote"]) for h in d["history"]] == [
            (0, 1, worker.GROW)]


@pytest.mark.timeout(150)
def test_a_peer_with_a_different_params_hash_is_told_to_resync(swarm, tmp_path):
    peers = swarm(3, extra={2: ["--bad-hash-step", "1"]}, common=["--min-peers", "2"])
    err = peers[2].wait_for("error")
    assert err["kind"] == "NeedResync" and err["step"] == 1, err
    for p in peers[:2]:
        p.wait_for("done")
    check_round(tmp_path, peers, 0, [0, 1, 2])
    for step in (1, 2):  # the others carried on without it, bit-identical
        check_round(tmp_path, peers[:2], step, [0, 1])


def _fault_test(swarm, tmp_path, victim: int, phase: str, sig: int) -> None:
    # The victim hangs at `phase` of step 1; we then kill or stop its whole process group.
    peers = swarm(3, extra={victim: ["--fault", f"1:{phase}"]}, common=["--min-peers", "2"])
    seed_of = {p.wait_for("ready")["peer_id"] if p.seed else p.ready["peer_id"]: p.seed
               for p in peers}
    peers[victim].wait_for("fault")
    peers[victim].signal_group(sig)
    survivors = [p for p in peers if p.seed != victim]
    for p in survivors:
        p.wait_for("done")
    check_round(tmp_path, peers, 0, [0, 1, 2])  # before the fault, all three agree
    for step in (1, 2):
        members = survivors[0].rounds()[step]["members"]
        assert all(p.rounds()[step]["members"] == members for p in survivors)
        # Either the round committed before the victim was needed (it sent DONE to a live
        # leader), or it was retried without it; never anything in between.
        check_round(tmp_path, survivors, step, sorted(seed_of[m] for m in members))
        assert len(members) == 2 or (step == 1 and phase == "before_commit")
    assert 1 not in peers[victim].rounds()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("victim,phase", [(2, "after_parts"), (0, "before_commit")])
def test_sigkill_mid_round_survivors_retry_and_agree(swarm, tmp_path, victim, phase):
    _fault_test(swarm, tmp_path, victim, phase, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigstop_past_timeout_survivors_retry_and_agree(swarm, tmp_path):
    _fault_test(swarm, tmp_path, 1, "after_reduce", signal.SIGSTOP)


def _malformed_frames(run: str) -> list[list[bytes]]:
    base = {"run": run, "epoch": 0, "step": 0, "attempt": 0, "from": "ab" * 10}
    part = {**base, "t": "PART", "rid": "00" * 8, "shard": 0}
    enc = get_codec("int8").encode(torch.randn(512))
    nan_frame = msgpack.packb({"v": 1, "codec": "int8", "shape": [256], "dtype": "float32",
                               "block": 256, "scales": struct.pack("<f", math.nan),
                               "payload": bytes(256)}, use_bin_type=True)
    two_d = get_codec("int8").encode(torch.randn(2, 256))
    join = {**base, "t": "JOIN", "endpoint": "tcp://127.0.0.1:9", "curve_key": "A" * 40,
            "weight": 1.0, "params_hash": "init", "numel": NUMEL, "codec": "int8",
            "block_size": 256, "vote": None}
    return [
        [os.urandom(100)],  # random bytes
        [os.urandom(64), os.urandom(64)],  # random header and payload
        [pack_message(part), pack(enc)[:-7]],  # truncated shard
        [pack_message(part), nan_frame],  # NaN scale
        [pack_message(part), pack(two_d)],  # wrong-shape (2-D) shard
        [pack_message(part), os.urandom(3 << 19)],  # 1.5 MiB: above the peer's frame limit
        [pack_message(join)],  # JOIN whose curve key is not the sender's
        [pack_message({**base, "t": "EVIL"})],  # unknown kind
        [pack_message({**part, "step": "one"}), pack(enc)],  # wrongly typed field
    ]


@pytest.mark.timeout(150)
def test_malformed_frames_are_dropped_and_change_nothing(swarm, tmp_path):
    peers = swarm(3, extra={0: ["--max-frame-bytes", str(1 << 20)]})
    victim = peers[0].ready
    frames = _malformed_frames("test")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    pub, sec = zmq.curve_keypair()  # an outsider: valid CURVE session, unknown key
    sock.curve_serverkey = victim["curve_key"].encode()
    sock.curve_publickey, sock.curve_secretkey = pub, sec
    sock.linger = 1000
    sock.connect(victim["endpoint"])
    try:
        for f in frames:  # queued now, read during the victim's first matchmaking
            sock.send_multipart(f)
        peers[0].wait_for("round")
        for f in frames:  # and again while it works on the next steps
            sock.send_multipart(f)
        for p in peers:
            p.wait_for("done")
    finally:
        sock.close()
        ctx.term()
    for step in range(3):
        check_round(tmp_path, peers, step, [0, 1, 2])
    done = [e for e in peers[0].seen if e["event"] == "done"][0]
    assert done["dropped"] >= 2 * len(frames), done
    log = peers[0].err_path.read_text()
    for reason in ("unparseable header", "scales contain NaN", "must be 1-D",
                   "payload of 1572864 bytes", "curve_key differs", "unknown message kind",
                   "field 'step'"):
        assert reason in log, f"no log line for {reason!r}"
