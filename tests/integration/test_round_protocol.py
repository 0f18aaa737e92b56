"""Round protocol v2 at realistic ratios: real peer processes (hivemind DHT + zmq on
127.0.0.1, or in network namespaces), inner phases many times longer than the heartbeat
(0.3 s) and the matchmaking grace, peers of different speeds, and faults injected at the
transitions of the round's state machine (rounds.py): a leader that stalls after every vote
is in, a member that stalls with its vote half sent, a peer SIGSTOPped past two heartbeats,
and a 3-vs-1 network partition that heals.

The "training" of swarm_worker.py is a sleep that reports tokens and an ETA like a real
peer, so these tests check the protocol's timing without burning the machine's 2 cores.
"""

from __future__ import annotations

import signal
import time

import pytest
from swarm_harness import Launcher, check_round

HB = 0.3  # swarm_harness.FAST heartbeat
DEAD_AFTER = 2 * HB


@pytest.fixture
def launcher(tmp_path):
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.kill_all()


def _no_errors(peers) -> None:
    for p in peers:
        assert not p.of("error"), (p.seed, p.of("error"))


@pytest.mark.timeout(180)
def test_leader_stalls_after_all_votes_one_theta_per_step(launcher, tmp_path):
    # Whoever leads step 1 stalls 6 s (> phase timeout 4 s) after holding every DONE.
    stall = ["--fault", "1:leader_before_commit:6"]
    peers = launcher.start(
        3, common=["--inner-s", "3", "--rounds", "4", *stall, "--min-peers", "2"]
    )
    for p in peers:
        p.wait_for("done", timeout=150)
    _no_errors(peers)
    faults = [p for p in peers if p.of("fault")]
    assert len(faults) == 1  # exactly the leader of step 1
    for step in range(4):  # one θ_g per step on every peer, all three in every round
        check_round(tmp_path, peers, step, [0, 1, 2])
        assert all(len(p.rounds()[step]["members"]) == 3 for p in peers)
    # The others did not wait for the stalled leader to commit step 1 (no leader decides).
    others = [p for p in peers if p is not faults[0]]
    stalled_at = faults[0].of("fault")[0]
    assert all(p.rounds()[1]["t"] < faults[0].rounds()[1]["t"] - 3 for p in others), stalled_at


@pytest.mark.timeout(180)
def test_member_stalls_with_its_vote_half_sent_one_theta_per_step(launcher, tmp_path):
    # Peer 2 sends DONE to one member, then stalls past the phase timeout: that member can
    # commit, the other is stuck and must learn the outcome instead of retrying without it.
    peers = launcher.start(
        3,
        extra={2: ["--fault", "1:mid_done:7"]},
        common=["--inner-s", "3", "--rounds", "4", "--min-peers", "2", "--resync"],
    )
    for p in peers:
        p.wait_for("done", timeout=150)
    assert peers[2].of("fault")
    _no_errors(peers)
    for step in range(4):
        check_round(tmp_path, peers, step, [0, 1, 2])
    stuck = [p for p in peers if "asking the members" in p.err_path.read_text()]
    assert stuck, "nobody was left without every vote: the fault did not bite"
    assert any("a member committed it" in p.err_path.read_text() for p in stuck)


@pytest.mark.timeout(180)
def test_sigstop_past_two_heartbeats_others_go_on_and_it_rejoins(launcher, tmp_path):
    # Peer 2 is slower (6 s phases vs 3 s); we freeze it (its whole process group, DHT
    # included) for three heartbeats while the others wait for it at step 2.
    peers = launcher.start(
        3,
        extra={2: ["--inner-s", "6"]},
        common=["--inner-s", "3", "--rounds", "6", "--resync"],
    )
    victim, others = peers[2], peers[:2]
    victim.wait_for("ready")
    phase = next(
        e for e in iter(lambda: victim.wait_for("phase", timeout=60), None) if e["step"] == 2
    )
    time.sleep(max(0.0, phase["t"] + 3.3 - time.time()))
    victim.signal_group(signal.SIGSTOP)
    stopped = time.time()
    time.sleep(3 * HB)
    victim.signal_group(signal.SIGCONT)
    for p in peers:
        p.wait_for("done", timeout=150)
    ids = {p.ready["peer_id"]: p.seed for p in peers}
    # The others ran step 2 without it as soon as its heartbeat was two beats old (plus the
    # round itself), not at its ETA (~2.7 s after the stop) nor after a long timeout.
    for p in others:
        r = p.rounds()[2]
        assert sorted(ids[m] for m in r["members"]) == [0, 1]
        assert r["t"] - stopped < DEAD_AFTER + 1.0, r["t"] - stopped
        assert not p.of("resync") and not p.of("error")
    # It noticed it was behind, adopted the majority's θ_g (no one else resynced) ...
    assert [e["step"] for e in victim.of("resync")] == [3]
    # ... and every later round had all three, bit-identical.
    for step in (3, 4, 5):
        check_round(tmp_path, peers, step, [0, 1, 2])
        assert all(len(p.rounds()[step]["members"]) == 3 for p in peers)


def _wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _drain(peers) -> None:
    for p in peers:  # move what arrived into p.seen without waiting for anything else
        while not p.events.empty():
            e = p.events.get()
            p.seen.append(e)
            if e["event"] == "ready":
                p.ready = e


@pytest.mark.timeout(300)
def test_partition_3_vs_1_heals_to_the_majority_line(tmp_path):
    import netns

    why = netns.available()
    if why is not None:
        pytest.skip(why)
    with netns.Netns(4) as net:
        launcher = Launcher(tmp_path, net)
        try:
            peers = launcher.start(4, common=["--inner-s", "3", "--rounds", "16", "--resync"])
            majority, lone = peers[:3], peers[3]
            ids = {}

            def rounds_of(p) -> dict[int, dict]:
                _drain(peers)
                return p.rounds()

            _wait_until(lambda: all(1 in rounds_of(p) for p in peers), 90, "two full rounds")
            ids = {p.ready["peer_id"]: p.seed for p in peers}
            assert all(len(p.rounds()[1]["members"]) == 4 for p in peers)
            net.partition({0, 1, 2}, {3})
            cut = max(max(rounds_of(p)) for p in peers)
            # Both sides keep training: the lone peer commits alone (nobody else is live
            # for it), the majority without it. The lone side even runs ahead.
            _wait_until(
                lambda: max(rounds_of(lone)) >= cut + 3 and max(rounds_of(peers[0])) >= cut + 2,
                90,
                "both sides to commit rounds while partitioned",
            )
            net.heal()
            for p in peers:
                p.wait_for("done", timeout=150)
        finally:
            launcher.kill_all()
    # The majority never resynced or failed; the lone peer adopted the majority's line.
    for p in majority:
        assert not p.of("resync") and not p.of("error"), (p.seed, p.of("error"))
    resyncs = lone.of("resync")
    assert resyncs and all(ids[r["source"]] in (0, 1, 2) for r in resyncs)
    # During the split: separate rounds, each side consistent with itself.
    split = [s for s in lone.rounds() if len(lone.rounds()[s]["members"]) == 1]
    assert split, "the lone peer committed nothing alone: the partition did not bite"
    # After the heal: every step the majority committed has one θ_g, and the last rounds
    # include all four peers again, bit-identical.
    for s in majority[0].rounds():
        hashes = {p.rounds()[s]["sha256"] for p in majority if s in p.rounds()}
        assert len(hashes) == 1, (s, hashes)
    last = max(majority[0].rounds())
    final = [p.rounds()[last] for p in peers]
    assert all(len(r["members"]) == 4 for r in final), [len(r["members"]) for r in final]
    assert len({r["sha256"] for r in final}) == 1
