"""An admitted run with strangers in its DHT: real peer processes on 127.0.0.1.

Two admitted peers (run file, identity key, the owner's certificate) average three rounds.
Two strangers join the same DHT with valid hivemind nodes and their own RSA keys: one has
no certificate, one an expired certificate of this run's owner. Both publish heartbeats,
announce rounds and send JOINs straight to the admitted peers' data planes. Checked: the
admitted peers' ZAP handlers refuse them (no frame of theirs is even parsed), their records
and announcements are ignored, and the admitted peers commit every round together with
identical hashes.
"""

from __future__ import annotations

import os
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from swarm_harness import FAST, Launcher, check_round

from peers.admission import RunFile, public_hex, sign
from peers.identity import load_or_create, peer_id_of_key

RUN = f"adm{os.getpid()}"


@pytest.mark.timeout(120)
def test_strangers_cannot_join_an_admitted_run(tmp_path):
    owner = Ed25519PrivateKey.generate()
    run_file = tmp_path / "run.json"
    RunFile(RUN, public_hex(owner)).save(run_file)
    ids, args = {}, {}
    for seed in range(4):
        key = tmp_path / f"peer{seed}.key"
        ids[seed] = peer_id_of_key(load_or_create(key))
        args[seed] = ["--run", RUN, "--key", str(key)]
    for seed in (0, 1):  # admitted for a day
        cert = tmp_path / f"peer{seed}.cert"
        sign(owner, RUN, ids[seed], int(time.time()) + 86400).save(cert)
        args[seed] += ["--run-file", str(run_file), "--cert", str(cert), "--inner-s", "1.5"]
    expired = tmp_path / "peer3.cert"
    sign(owner, RUN, ids[3], int(time.time()) - 60).save(expired)
    # Strangers: a DHT node each, reading everyone (they apply no policy); JOINs straight to
    # every data plane they see for 4 s, then rounds of their own until NeedResync.
    stranger = ["--stranger", "--wait-peers", "3", "--probe-s", "4", "--rounds", "1"]
    args[2] += stranger
    args[3] += [*stranger, "--cert", str(expired)]

    launcher = Launcher(tmp_path)
    try:
        base = [*FAST, "--out", str(tmp_path)]
        admitted = [launcher._peer(0, [*base, *args[0], "--wait-peers", "2"])]
        maddr = admitted[0].wait_for("ready")["maddr"]
        join = ["--join", maddr]
        admitted.append(launcher._peer(1, [*base, *args[1], *join, "--wait-peers", "2"]))
        strangers = [launcher._peer(s, [*base, *args[s], *join]) for s in (2, 3)]
        probes = [s.wait_for("probe", timeout=90) for s in strangers]
        done = [p.wait_for("done", timeout=90) for p in admitted]
    finally:
        launcher.kill_all()

    both = sorted([ids[0], ids[1]])
    for step in range(3):  # every round: the two admitted peers, bit-identical
        check_round(tmp_path, admitted, step, [0, 1])
        for p in admitted:
            assert sorted(p.rounds()[step]["members"]) == both
    for probe in probes:  # the strangers saw the admitted peers and JOINed them directly
        assert {ids[0], ids[1]} <= set(probe["to"]) and probe["sent"] > 0, probe
    for p, d in zip(admitted, done, strict=True):
        # Refused at the handshake: nothing of theirs reached the parser (dropped stays 0).
        assert d["denied"] >= 2 and d["dropped"] == 0, d
        assert sorted(d["peers"]) == both, d  # their records are ignored
        log = p.err_path.read_text()
        assert f"ignoring peer {ids[2]}: no certificate" in log
        assert f"ignoring peer {ids[3]}: certificate expired" in log
        assert log.count(f"ignoring peer {ids[2]}") == 1  # once, not on every read
