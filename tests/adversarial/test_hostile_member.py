"""A hostile member of the round (issue #9 items 1 and 8), against an honest swarm of three.

Real processes on 127.0.0.1: three `diloco-grow peer`s (one twice as slow) and the hostile
peer (tests/adversarial/hostile_peer.py), which trains with them honestly until its θ_g is
at step 1 and then misbehaves at every round it gets into.
"""

from __future__ import annotations

import pytest
from attack_harness import AttackRun


@pytest.mark.timeout(420)
def test_poisoned_part_and_reduced_shard_are_refused(tmp_path, procs):
    """Item 1: from step 1 on the attacker sends PARTs whose every code is -128 at the
    largest scale the wire allows, announces weight 1e30 (the schema's cap), and as the
    reducer of its own shard sends a REDUCED of the same kind. Honest θ_g must stay finite
    and equal, keep learning, and the attacker must not be a member of later rounds."""
    run = AttackRun(tmp_path, procs)
    step = run.attack("poison@1,heavy@1,bad_reduce@1", "poison")
    problems = run.violations(step, member_offence=True)
    assert not problems, run.report(problems)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_member_that_stalls_every_attempt_sits_out_the_retries(tmp_path, procs):
    """Item 8: from step 1 on the attacker joins every attempt and then withholds its
    PARTs, ABORTs at once, or sends a shard one block short, in turn. Each attempt aborts;
    the swarm must retry without it and keep committing."""
    run = AttackRun(tmp_path, procs)
    step = run.attack("stall@1", "stall")
    problems = run.violations(step, member_offence=True)
    assert not problems, run.report(problems)
