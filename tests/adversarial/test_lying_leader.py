"""A hostile leader (issue #9 item 5), against an honest swarm of three.

The hostile peer picks the attempts it leads: leadership is a hash of the attempt number,
and a higher announced attempt pulls every peer of the step to it. As leader it lies in
BEGIN, which followers check only for their own entry.
"""

from __future__ import annotations

import pytest
from attack_harness import AttackRun


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_leader_that_splits_the_vote_then_orders_resyncs_is_caught(tmp_path, procs):
    """At step 1 the attacker leads and sends half the followers a BEGIN in which every
    other member voted experts x2 (a split growth: they grow, the rest do not, and the
    digests still agree). From step 2 on it leads every attempt and answers the JOINs with
    RESYNC, so the followers download state from it and the step never commits. Honest
    peers must hold one θ_g per step and never grow, never adopt state from it, keep
    committing, and the attacker must not be a member after its offence."""
    run = AttackRun(tmp_path, procs)
    step = run.attack("lead@1,split_votes@1-1,resync_all@2", "split_votes", "resync_all")
    problems = run.violations(step, member_offence=True)
    assert not problems, run.report(problems)
