"""The control for the adversarial suite: the same swarm and the same hostile client, which
this time attacks nobody. Every rule the attack tests check must hold, so a failure there
is the attack's doing, not the harness's or the machine's."""

from __future__ import annotations

import pytest
from attack_harness import AttackRun


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_without_an_attack_every_rule_holds(tmp_path, procs):
    run = AttackRun(tmp_path, procs)
    run.start("none@1")
    step = run.wait_attack("none")["step"]
    assert run.wait_rounds_after(step), run.report()
    run.stop()
    problems = run.violations(step, member_offence=False) + run.kept_out(after_step=step + 1)
    assert not problems, run.report(problems)
