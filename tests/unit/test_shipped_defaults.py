"""The outer settings we ship are tuned (issue #10; README "Quality").

The sweep (benchmarks/bench_quality.py) found outer lr 0.7 with momentum 0.6 best once a
run has a thousand or more inner steps per worker, and a linear momentum ramp over the
first 10 outer steps (μ_t = 0.6·min(1, (t+1)/10)) better at 300, 1200 and 3200 steps
per worker; at 1200 steps (M=4, H=50) the shipped settings give 1.9612 against FedAvg's
2.0425 (lr 1, momentum 0), the unramped 0.6's 2.0195 and the old 0.9's 2.0985. Without
the ramp FedAvg led for the first few hundred steps (momentum re-applies the large early
pseudo-gradients); with it the shipped settings lead FedAvg on the fast test's budget too
(3.0409 vs 3.0783), which is what the fast test pins. (There the unramped 0.6 is better
still, 2.9501: the ramp pays off over more outer steps.) If a change to the defaults, the
model or the data breaks these, rerun the sweep before shipping it.
"""

from __future__ import annotations

import pytest

from diloco_grow.config import OuterConfig, config_from_dict
from diloco_grow.data import load_corpus
from diloco_grow.simulate import SimSpec, simulate

SHIPPED = OuterConfig()


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def final_val_loss(tmp_path, corpus, name: str, workers: int, H: int, outer_steps: int,
                   **outer: float | int) -> float:
    """The sweep's setting (tiny, seq_len 32, batch 4, inner lr 2e-3 cosine, int8)."""
    cfg = config_from_dict({
        "preset": "tiny",
        "seed": 0,
        "model": {"seq_len": 32},
        "inner": {"lr": 2e-3, "batch_size": 4, "warmup_steps": 50, "steps": H},
        "data": {"val_batches": 16},
        "outer": {"compression": "int8", **outer},
    })
    spec = SimSpec(workers=workers, outer_steps=outer_steps, out_dir=str(tmp_path / name),
                   progress=False)
    return simulate(cfg, spec, corpus)["val_loss"]


def test_shipped_outer_defaults_beat_fedavg_the_old_momentum_and_a_small_outer_lr(
    tmp_path, corpus
):
    assert SHIPPED.optimizer == "sgd" and SHIPPED.nesterov and SHIPPED.momentum_warmup_steps
    run = {"workers": 2, "H": 10, "outer_steps": 10}
    shipped = final_val_loss(tmp_path, corpus, "shipped", **run)
    fedavg = final_val_loss(tmp_path, corpus, "fedavg", lr=1.0, momentum=0.0, **run)
    # The defaults before issue #10: constant momentum 0.9.
    old = final_val_loss(tmp_path, corpus, "momentum0.9", momentum=0.9,
                         momentum_warmup_steps=0, **run)
    small_lr = final_val_loss(tmp_path, corpus, "lr0.1", lr=0.1, **run)
    assert shipped < fedavg and shipped < old and shipped < small_lr, (
        shipped, fedavg, old, small_lr)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three runs of 4 x 1200 inner steps: about 6 min on 2 cores
def test_shipped_outer_defaults_beat_fedavg_over_1200_steps(tmp_path, corpus):
    run = {"workers": 4, "H": 50, "outer_steps": 24}  # the sweep's budget
    shipped = final_val_loss(tmp_path, corpus, "shipped", **run)
    fedavg = final_val_loss(tmp_path, corpus, "fedavg", lr=1.0, momentum=0.0, **run)
    small_lr = final_val_loss(tmp_path, corpus, "lr0.1", lr=0.1, **run)
    assert shipped < fedavg and shipped < small_lr, (shipped, fedavg, small_lr)
