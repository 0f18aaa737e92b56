"""Growth inside the DiLoCo loop: `simulate --grow`, state remapping, post-growth resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diloco_grow.config import config_from_dict
from diloco_grow.data import load_corpus
from diloco_grow.growth import GrowthEvent, flat_index_map, parse_schedule
from diloco_grow.metrics import growth_marks, plot_runs, read_jsonl
from diloco_grow.simulate import SimSpec, simulate
from diloco_grow.worker import GlobalState, Worker


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def cfg():
    return config_from_dict(
        {"preset": "tiny", "inner": {"steps": 3, "batch_size": 4}, "outer": {"compression": "int8"}}
    )


def test_simulate_grow_records_events_and_resumes_after_growth(tmp_path, corpus):
    schedule = tuple(parse_schedule("experts:2@2:alpha=0,depth:2@3:zero_output"))
    full = simulate(
        cfg(),
        SimSpec(
            workers=2, outer_steps=5, out_dir=str(tmp_path / "a"), grow=schedule, progress=False
        ),
        corpus,
    )
    recs = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    events = [r["event"] for r in recs if "event" in r]
    assert [(e["kind"], e["outer_step"]) for e in events] == [("experts", 2), ("depth", 3)]
    for e in events:
        assert e["n_params_after"] > e["n_params_before"]
        assert {"alpha", "seed", "hash", "factor", "val_loss_before", "val_loss_after"} <= set(e)
    # Function-preserving growth (α=0, zero_output): the loss does not jump.
    for e in events:
        assert abs(e["val_loss_after"] - e["val_loss_before"]) < 1e-4
    steps = [r for r in recs if "event" not in r]
    assert all("n_params" in r for r in steps)
    # The plot marks both events, where they happened, with the parameter counts.
    marks = growth_marks([tmp_path / "a" / "metrics.jsonl"], x="tokens")
    assert [label.split("\n")[0] for _, label in marks] == ["experts x2", "depth x2"]
    assert [at for at, _ in marks] == [r["tokens"] for r in recs if "event" in r]
    assert plot_runs([tmp_path / "a" / "metrics.jsonl"], tmp_path / "a.png").stat().st_size > 0
    assert steps[-1]["n_params"] == events[-1]["n_params_after"]
    assert steps[-1]["arch_epoch"] == 2

    # Interrupted after growth (step 4), resumed: identical to the uninterrupted run.
    spec = SimSpec(
        workers=2, outer_steps=5, out_dir=str(tmp_path / "b"), grow=schedule, progress=False
    )
    simulate(cfg(), SimSpec(**{**spec.__dict__, "stop_after": 4}), corpus)
    resumed = simulate(cfg(), SimSpec(**{**spec.__dict__, "resume": True}), corpus)
    assert resumed["params_hash"] == full["params_hash"]


def test_outer_momentum_and_residual_follow_the_index_map(corpus):
    c = cfg()
    g = GlobalState.init(c)
    w = Worker(c, g, corpus)
    w.inner_phase(3)
    enc, _ = w.contribution(g)
    g.outer_step(torch.randn_like(g.theta) * 1e-3)
    old_mom, old_res = g.outer.buf.clone(), w.feedback.residual.clone()
    ev = GrowthEvent(kind="experts", factor=2, alpha=0.01, seed=3)
    index_map = g.grow(ev)
    w.follow_growth(g, index_map)
    assert torch.equal(index_map, flat_index_map(c.model, ev))
    keep = index_map >= 0
    assert torch.equal(g.outer.buf[keep], old_mom[index_map[keep]])
    assert torch.equal(w.feedback.residual[keep], old_res[index_map[keep]])
    assert g.outer.buf.numel() == g.theta.numel() == sum(p.numel() for p in w.model.parameters())
    assert g.history[-1]["hash"] == ev.hash() and g.arch_epoch == 1
    # Training continues on the grown model with a fresh AdamW.
    assert len(w.inner.opt.state) == 0
    stats = w.inner_phase(3)
    assert stats.loss == stats.loss  # finite, not NaN


def test_cli_simulate_json_and_grow(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diloco_grow.cli",
            "simulate",
            "--workers",
            "2",
            "--inner-steps",
            "2",
            "--outer-steps",
            "3",
            "--preset",
            "tiny",
            "--compression",
            "int4",
            "--out",
            str(tmp_path),
            "--grow",
            "experts:2@2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    # The growth is announced on stderr (stdout stays one JSON line), once.
    grew = [ln for ln in out.stderr.splitlines() if ln.startswith("growth ")]
    assert len(grew) == 1 and grew[0].startswith("growth step=2 experts x2: params "), grew
    assert "alpha=0.01" in grew[0]
    assert "torch threads: 1 for 2 worker(s)" in out.stderr  # OMP_NUM_THREADS=1 (conftest)
    for key in (
        "val_loss",
        "train_loss",
        "tokens",
        "bytes_sent_per_worker",
        "n_params",
        "outer_steps",
        "wall_s",
    ):
        assert key in summary
    assert summary["outer_steps"] == 3 and summary["tokens"] == 2 * 3 * 2 * 16 * 64
    bad = subprocess.run(
        [sys.executable, "-m", "diloco_grow.cli", "simulate", "--grow", "experts:1@2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
