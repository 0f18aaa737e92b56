"""A memory flood on the data plane (issue #9 item 7), against an honest swarm of three."""

from __future__ import annotations

import pytest
from attack_harness import AttackRun, RssSampler

MIB = 1 << 20
FLOOD = (40, 16)  # messages x MiB: the numbers
MAX_GROWTH = 150 * MIB


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_flood_from_an_unknown_key_does_not_grow_a_training_peer(tmp_path, procs):
    """Once at step 1, from a fresh CURVE key nobody admitted, the attacker sends 40
    messages of 16 MiB (well-formed PARTs for a far-future step) to one honest peer while
    it trains. Its resident memory must grow by less than 150 MiB over the flood and the
    next round (when it reads its inbox), and the swarm must go on as before."""
    run = AttackRun(tmp_path, procs)
    run.start("flood@1", "--flood-count", str(FLOOD[0]), "--flood-mib", str(FLOOD[1]))
    rss = RssSampler({p.name: p.proc.pid for p in run.honest})
    rss.start()
    ev = run.wait_attack("flood")
    sent = run.wait_for(
        lambda: next((e for e in run.hostile.events() if e["event"] == "flood_sent"), None),
        120,
        "the flood to leave the attacker",
    )
    run.wait_rounds_after(ev["step"])
    rss.halt.set()
    run.stop()
    target = next(p for p in run.honest if p.peer_id == ev["target"])
    before = rss.peak(target.name, ev["time"] - 10, ev["time"])
    during = rss.peak(target.name, ev["time"], sent["time"] + 20)
    problems = run.violations(ev["step"], member_offence=False)
    if during - before >= MAX_GROWTH:
        problems.append(
            f"{target.name} grew by {(during - before) / MIB:.0f} MiB over the flood "
            f"({before / MIB:.0f} -> {during / MIB:.0f} MiB; limit {MAX_GROWTH / MIB:.0f})"
        )
    assert not problems, run.report(problems)
