"""The demo as a user runs it: growth is visible on its screen and on its plot.

A real 2-peer swarm (`diloco-grow demo`, one peer joining late) votes to double the
experts at outer step 3. The demo's own stdout must carry the growth line (kind, factor,
params before -> after, step), the peers' logs must too, and the plot must mark it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from diloco_grow.metrics import growth_marks


@pytest.mark.timeout(400)
def test_demo_prints_and_plots_the_growth_event(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "diloco_grow.cli",
            "demo",
            "--peers",
            "2",
            "--minutes",
            "1.0",
            "--inner-steps",
            "5",
            "--grow",
            "experts:2@3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=360,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps_with_disagreeing_hashes"] == []
    assert summary["rounds"] > 3

    # On the demo's screen: exactly one growth line, for step 3, with the parameter counts
    # of the tiny preset before and after doubling its experts (default alpha 0.01).
    grew = [ln for ln in proc.stdout.splitlines() if ln.startswith("growth ")]
    assert grew == ["growth step=3 experts x2: params 262,976 -> 460,096 (alpha=0.01, seed=0)"], (
        proc.stdout[-3000:]
    )
    assert summary["growth"] == grew
    # Every peer printed the same line in its own log when the event committed.
    for log in ("peer0.log", "peer1.log"):
        text = (out / log).read_text()
        if "round step=3 " in text:  # the late peer may have joined after step 3
            assert grew[0] in text, log

    # The plot marks it (one mark although both peers logged the event).
    paths = [out / f"peer{i}" / "metrics.jsonl" for i in range(2)]
    assert growth_marks([p for p in paths if p.exists()], x="step") == [
        (3, "experts x2\n0.26M→0.46M")
    ]
    assert (out / "loss.png").stat().st_size > 10_000
