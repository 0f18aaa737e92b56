"""The outer settings we ship are tuned (issue #10; benchmarks/results/quality_*.md).

On a fixed seed and a small budget, DiLoCo with the shipped [outer] defaults beats FedAvg
(outer lr 1, no momentum) and a timid outer lr of 0.1 with the shipped momentum. If a
change to the defaults, the model or the data loses this, rerun the sweep
(benchmarks/bench_quality.py) before shipping it.
"""

from __future__ import annotations

import dataclasses

import pytest

from diloco_grow.config import OuterConfig, config_from_dict
from diloco_grow.data import load_corpus
from diloco_grow.simulate import SimSpec, simulate

SHIPPED = OuterConfig()


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def final_val_loss(tmp_path, corpus, name: str, **outer: float) -> float:
    cfg = config_from_dict({
        "preset": "tiny",
        "seed": 0,
        "model": {"seq_len": 32},
        "inner": {"lr": 2e-3, "batch_size": 4, "warmup_steps": 10, "steps": 10},
        "data": {"val_batches": 8},
        "outer": {"compression": "int8", **outer},
    })
    spec = SimSpec(workers=2, outer_steps=8, out_dir=str(tmp_path / name), progress=False)
    return simulate(cfg, spec, corpus)["val_loss"]


def test_shipped_outer_defaults_beat_fedavg_and_a_small_outer_lr(tmp_path, corpus):
    # the shipped settings come from OuterConfig's defaults, not from this test
    assert dataclasses.asdict(SHIPPED)["optimizer"] == "sgd"
    shipped = final_val_loss(tmp_path, corpus, "shipped")
    fedavg = final_val_loss(tmp_path, corpus, "fedavg", lr=1.0, momentum=0.0)
    small_lr = final_val_loss(tmp_path, corpus, "lr0.1", lr=0.1)
    assert shipped < fedavg and shipped < small_lr, (shipped, fedavg, small_lr)
