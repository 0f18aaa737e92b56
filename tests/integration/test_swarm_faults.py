"""Faults in the middle of a round: a peer SIGKILLed or SIGSTOPped (its whole process group).

The survivors must finish that step among themselves (after aborting the attempt that
included the faulty peer), agree bit for bit, and never apply a partial round.
"""

from __future__ import annotations

import signal
import time

import pytest
from swarm_harness import Launcher, check_round


@pytest.fixture
def swarm(tmp_path):
    launcher = Launcher(tmp_path)
    yield launcher.start
    launcher.kill_all()


def _fault_test(swarm, tmp_path, victim: int, phase: str, sig: int) -> None:
    # The victim hangs at `phase` of step 1; we then kill or stop its whole process group.
    peers = swarm(3, extra={victim: ["--fault", f"1:{phase}"]}, common=["--min-peers", "2"])
    for p in peers[1:]:
        p.wait_for("ready")
    seed_of = {p.ready["peer_id"]: p.seed for p in peers}
    peers[victim].wait_for("fault")
    if phase == "mid_parts":
        time.sleep(1.0)  # its first PART arrives: one survivor can reduce, the other cannot
    peers[victim].signal_group(sig)
    survivors = [p for p in peers if p.seed != victim]
    for p in survivors:
        p.wait_for("done")
    # A survivor that waited for the victim's frames is honest: no survivor blames another,
    # on any evidence (the accused would sit out, and two survivors that shut each other
    # out with --min-peers 2 stall the step until the round timeout).
    for p in survivors:
        log = p.err_path.read_text()
        for q in survivors:
            assert f"blame peer={q.ready['peer_id']} " not in log, (p.seed, log[-3000:])
    check_round(tmp_path, peers, 0, [0, 1, 2])  # before the fault, all three agree
    for step in (1, 2):
        members = survivors[0].rounds()[step]["members"]
        assert all(p.rounds()[step]["members"] == members for p in survivors)
        # Either the round committed before the victim was needed (it sent DONE to a live
        # leader), or it was retried without it; never anything in between.
        check_round(tmp_path, survivors, step, sorted(seed_of[m] for m in members))
        assert len(members) == 2 or (step == 1 and phase == "before_commit")
    assert 1 not in peers[victim].rounds()


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "victim,phase",
    [
        (2, "after_parts"),  # in the default run: the real crash test stays in CI
        # Killed between its PARTs: one survivor holds every PART and waits for the
        # other's REDUCED, which waits for the victim's PART. Only the victim is blamed.
        (1, "mid_parts"),
        pytest.param(0, "before_commit", marks=pytest.mark.slow),
    ],
)
def test_sigkill_mid_round_survivors_retry_and_agree(swarm, tmp_path, victim, phase):
    _fault_test(swarm, tmp_path, victim, phase, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigstop_past_timeout_survivors_retry_and_agree(swarm, tmp_path):
    _fault_test(swarm, tmp_path, 1, "after_reduce", signal.SIGSTOP)
