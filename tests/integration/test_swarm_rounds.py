"""Real peer processes on 127.0.0.1 averaging int8 vectors through peers.Swarm: agreement,
bytes on the wire, growth votes, θ_g-hash disagreement, malformed frames, leaving a round.
(Faults mid-round are in test_swarm_faults.py; the peer launcher is swarm_harness.py.)
"""

from __future__ import annotations

import math
import os
import struct
import threading
import time

import msgpack
import pytest
import torch
import zmq
from swarm_harness import NUMEL, Launcher, check_round, worker

from compression.codec import get_codec
from compression.wire import pack, pack_message


@pytest.fixture
def swarm(tmp_path):
    launcher = Launcher(tmp_path)
    yield launcher.start
    launcher.kill_all()


@pytest.mark.timeout(150)
def test_three_peers_agree_bit_for_bit_and_send_the_expected_bytes(swarm, tmp_path):
    # Peers 0 and 1 vote to grow at step 1 (2 of 3 = quorum); only peer 0 at step 2.
    peers = swarm(3, extra={0: ["--vote-step", "1", "--vote-step", "2"], 1: ["--vote-step", "1"]})
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
            (0, 1, worker.GROW)
        ]


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


def _malformed_frames(run: str) -> list[list[bytes]]:
    base = {"run": run, "epoch": 0, "step": 0, "attempt": 0, "from": "ab" * 10}
    part = {**base, "t": "PART", "rid": "00" * 8, "shard": 0}
    enc = get_codec("int8").encode(torch.randn(512))
    nan_frame = msgpack.packb(
        {
            "v": 1,
            "codec": "int8",
            "shape": [256],
            "dtype": "float32",
            "block": 256,
            "scales": struct.pack("<f", math.nan),
            "payload": bytes(256),
        },
        use_bin_type=True,
    )
    two_d = get_codec("int8").encode(torch.randn(2, 256))
    join = {
        **base,
        "t": "JOIN",
        "endpoint": "tcp://127.0.0.1:9",
        "curve_key": "A" * 40,
        "weight": 1.0,
        "params_hash": "init",
        "numel": NUMEL,
        "codec": "int8",
        "block_size": 256,
        "vote": None,
    }
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
    for reason in (
        "unparseable header",
        "scales contain NaN",
        "must be 1-D",
        "payload of 1572864 bytes",
        "curve_key differs",
        "unknown message kind",
        "field 'step'",
    ):
        assert reason in log, f"no log line for {reason!r}"


@pytest.mark.timeout(60)
def test_shutdown_from_another_thread_leaves_a_waiting_round():
    from peers.errors import RoundFailed
    from peers.swarm import Swarm, SwarmConfig

    # Alone with min_peers=2, all_reduce would wait until its deadline; shutdown cuts it short.
    swarm = Swarm(SwarmConfig(run="leave", matchmaking_s=0.5, round_timeout_s=60, min_peers=2))
    swarm.start()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            swarm.all_reduce(
                get_codec("int8").encode(torch.randn(1024)),
                1.0,
                arch_epoch=0,
                step=0,
                params_hash="init",
            )
        except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(2.0)
    started = time.monotonic()
    swarm.shutdown()
    t.join(timeout=10)
    assert not t.is_alive() and time.monotonic() - started < 10
    assert len(outcome) == 1 and isinstance(outcome[0], RoundFailed), outcome
    assert swarm.dht.dht is None  # the DHT process (and its p2pd) is gone
