"""The quality sweep's bookkeeping: run keys (resume) and which sync run a DiLoCo run is
compared with. Pure functions, no training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "bench_quality", ROOT / "benchmarks/bench_quality.py"
)
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)


def _target_row() -> dict:
    # The int8 target run, as the committed results file holds it.
    rows = (ROOT / "benchmarks/results/quality_target.jsonl").read_text().splitlines()
    return next(json.loads(r) for r in rows if '"codec": "int8"' in r)


def test_cpu_keys_are_unchanged_so_old_results_resume() -> None:
    row = _target_row()
    assert "device" not in row
    assert bq.run_key(row) == row["key"] == "87556bdae3931d50"


def test_a_gpu_run_is_another_run() -> None:
    row = _target_row()
    assert bq.run_key({**row, "device": "cuda"}) != row["key"]
    assert bq.run_key({**row, "device": "cpu"}) == row["key"]


def _row(arm: str, loss: float, device: str | None = None, **kw) -> dict:
    r = {"arm": arm, "preset": "tiny", "seq_len": 32, "batch_size": 4, "steps": 100,
         "workers": 4, "seed": 0, "inner_lr": 2e-3, "inner_warmup": 10, "val_loss": loss,
         "bytes_sent_per_worker": 1000 if arm == "sync" else 10, **kw}
    if device:
        r["device"] = device
    return r


def test_gap_is_to_the_best_sync_run_of_the_same_budget_and_device() -> None:
    rows = [
        _row("sync", 2.0), _row("sync", 1.9, inner_lr=4e-3),  # CPU: tuned = 1.9
        _row("sync", 1.5, device="cuda"),                     # GPU: another corpus/rounding
        _row("sync", 1.0, steps=200),                         # another budget
        _row("diloco", 1.995), _row("diloco", 1.65, device="cuda"),
    ]
    bq.compare(rows)
    cpu, gpu = rows[4], rows[5]
    assert cpu["sync_val_loss"] == 1.9 and cpu["sync_lr"] == 4e-3
    assert abs(cpu["gap_pct"] - 5.0) < 1e-9 and cpu["bytes_ratio"] == 100
    assert gpu["sync_val_loss"] == 1.5 and abs(gpu["gap_pct"] - 10.0) < 1e-9


def test_grid_marks_gpu_runs_and_leaves_cpu_runs_bare() -> None:
    ap_args = ["--steps", "100", "--H", "10", "--sync-lr", "2e-3"]
    for device, expect in (("cpu", None), ("cuda", "cuda")):
        args = bq.parse_args(ap_args + ["--device", device])
        runs = bq.grid(args)
        assert {r["arm"] for r in runs} == {"sync", "diloco"}
        assert all(r.get("device") == expect for r in runs)



def test_momentum_ramp_is_keyed_only_when_set() -> None:
    row = _target_row()
    assert "outer_momentum_warmup" not in row  # ran before the ramp existed: without one
    assert bq.run_key({**row, "outer_momentum_warmup": 0}) == row["key"]
    assert bq.run_key({**row, "outer_momentum_warmup": 10}) != row["key"]
    assert bq.run_config(row)["outer"]["momentum_warmup_steps"] == 0
    assert bq.run_config({**row, "outer_momentum_warmup": 10})["outer"][
        "momentum_warmup_steps"] == 10


def test_grid_ramps_only_sgd_with_momentum() -> None:
    args = bq.parse_args(["--steps", "100", "--H", "10", "--outer-momentum", "0.6", "0",
                          "--outer-opt", "sgd", "adam", "--momentum-warmup", "10"])
    ramps = {(r["outer_opt"], r["outer_momentum"]): r["outer_momentum_warmup"]
             for r in bq.grid(args) if r["arm"] == "diloco"}
    assert ramps == {("sgd", 0.6): 10, ("sgd", 0.0): 0, ("adam", 0.6): 0, ("adam", 0.0): 0}


def _dl(loss: float, seed: int, **kw) -> dict:
    base = {"H": 10, "codec": "int8", "outer_opt": "sgd", "outer_lr": 0.7,
            "outer_momentum": 0.6, "outer_warmup": 0, "outer_momentum_warmup": 10}
    return _row("diloco", loss, seed=seed, **{**base, **kw})


def test_seed_means_pool_a_setting_against_each_seeds_own_sync() -> None:
    rows = [
        _row("sync", 2.0, seed=0), _row("sync", 1.0, seed=1),
        _dl(2.1, 0), _dl(1.02, 1),                         # +5 % and +2 %: mean +3.5 %
        _dl(2.2, 0, outer_lr=1.0), _dl(1.0, 1, outer_lr=1.0),  # +10 % and 0 %: mean +5 %
        _dl(2.02, 0, outer_lr=0.5),                        # one seed only: not pooled
    ]
    bq.compare(rows)
    text = bq.table(rows)
    head, means = text.split("Mean over seeds")
    assert "| seed |" in head.splitlines()[0]
    assert sum(1 for line in head.splitlines() if line.startswith("| 4 | 100 |")) == 7
    lines = [line for line in means.splitlines() if line.startswith("| 4 |")]
    assert len(lines) == 2  # lr 0.5 ran on one seed
    assert "| 0.7 |" in lines[0] and "| 2 | +3.50% | +2.00% … +5.00% |" in lines[0]
    assert "| 1 |" in lines[1] and "| 2 | +5.00% | +0.00% … +10.00% |" in lines[1]


def test_one_seed_keeps_the_table_without_a_seed_column() -> None:
    rows = [_row("sync", 2.0), _dl(2.1, 0)]
    bq.compare(rows)
    text = bq.table(rows)
    assert "seed" not in text.splitlines()[0] and "Mean over seeds" not in text
    assert text.splitlines()[-1].endswith("| +5.00% | 100 |")


def test_ef_decay_is_keyed_only_below_one_and_reaches_the_worker() -> None:
    from diloco_grow.config import config_from_dict

    row = _target_row()
    assert bq.run_key({**row, "ef_decay": 1.0}) == row["key"]  # old rows still resume
    assert bq.run_key({**row, "ef_decay": 0.95}) != row["key"]
    assert "error_feedback_decay" not in bq.run_config(row)["outer"]
    cfg = config_from_dict(bq.run_config({**row, "ef_decay": 0.95}))
    assert cfg.outer.error_feedback_decay == 0.95
    args = bq.parse_args(["--steps", "100", "--H", "10", "--codecs", "topk_m32", "none",
                          "--ef-decay", "0.9"])
    decays = {r["codec"]: r["ef_decay"] for r in bq.grid(args) if r["arm"] == "diloco"}
    assert decays == {"topk_m32": 0.9, "none": 1.0}  # nothing to feed back without a codec
    bq.compare(rows := [_row("sync", 2.0), _dl(2.1, 0, codec="topk_m32", ef_decay=0.9)])
    assert "| topk_m32 (EF β 0.9) |" in bq.table(rows)


def test_another_val_set_is_another_run_and_another_baseline() -> None:
    row = _target_row()
    assert row["val_batches"] == bq.VAL_BATCHES
    assert bq.run_key({**row, "val_batches": 64}) != row["key"]
    # A DiLoCo run on 64 val batches is compared with the sync run on 64, even though the
    # sync run on the default 16 scored lower.
    rows = [_row("sync", 1.0, val_batches=16), _row("sync", 2.0, val_batches=64),
            _dl(2.1, 0, val_batches=64)]
    bq.compare(rows)
    assert rows[2]["sync_val_loss"] == 2.0 and abs(rows[2]["gap_pct"] - 5.0) < 1e-9
    # The table says which val set each row was measured on once a file holds two.
    lines = bq.table(rows).splitlines()
    assert "val batches" in lines[0] and lines[0].count("|") == lines[1].count("|")
    assert "val batches" not in bq.table(rows[1:]).splitlines()[0]


def test_inner_clip_is_keyed_only_when_set_reaches_both_arms_and_sync_is_tuned_over_it() -> None:
    row = _target_row()
    assert bq.run_key({**row, "inner_clip": 1.0}) == row["key"]  # old rows still resume
    assert bq.run_key({**row, "inner_clip": 2.0}) != row["key"]
    assert bq.run_config({**row, "inner_clip": 2.0})["inner"]["clip"] == 2.0
    args = bq.parse_args(["--steps", "100", "--H", "10", "--inner-clip", "2"])
    assert {r["inner_clip"] for r in bq.grid(args)} == {2.0}
    assert {r["arm"] for r in bq.grid(args)} == {"sync", "diloco"}
    # The clip is a sync hyperparameter like its lr: the baseline is the best over both.
    rows = [_row("sync", 2.0), _row("sync", 1.9, inner_clip=2.0),
            _dl(1.995, 0, inner_clip=2.0)]
    bq.compare(rows)
    assert rows[2]["sync_val_loss"] == 1.9
    assert "| 0.002 (clip 2) |" in bq.table(rows)
