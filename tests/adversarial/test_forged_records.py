"""Forged DHT records (issue #9 items 2 and 6), against an honest swarm of three.

The hostile peer writes its records through its own, real `SwarmDHT`: they are signed and
pass every schema, and only their contents lie.
"""

from __future__ import annotations

import pytest
from attack_harness import AttackRun


@pytest.mark.timeout(420)
def test_record_claiming_step_1e15_takes_no_one_over(tmp_path, procs):
    """Item 2: at step 1 or later, once the three honest peers hold a round's state
    (attacks.swarm_is_up), the attacker's record claims step 10^15 on the swarm's own
    line with 1000 members, and its state server serves a θ_g of zeros at that step under
    the hash it claims. Honest peers must not download it (no "adopted ... from" it, no
    step near 10^15), and must keep committing and learning."""
    run = AttackRun(tmp_path, procs)
    step = run.attack("takeover@1", "takeover")
    problems = run.violations(step, member_offence=False)
    assert not problems, run.report(problems)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_attempt_bomb_does_not_split_or_stall_the_swarm(tmp_path, procs):
    """Item 6: at step 1 the attacker announces attempt 2^20 (the schemas' limit), which
    pulls everyone there, then withholds its part so that attempt fails. Attempt 2^20 + 1
    is unreadable everywhere. Honest peers must keep one θ_g per step and keep committing,
    without the attacker."""
    run = AttackRun(tmp_path, procs)
    step = run.attack("attempt_bomb@1", "attempt_bomb")
    problems = run.violations(step, member_offence=True)
    assert not problems, run.report(problems)
