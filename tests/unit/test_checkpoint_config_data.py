"""Checkpoints (atomic, bit-exact resume), configuration errors and the data pipeline."""

from __future__ import annotations

import os

import pytest
import torch

from diloco_grow import checkpoint as ckpt
from diloco_grow.config import ConfigError, build_config, config_from_dict, load_config
from diloco_grow.data import BatchStream, load_corpus, val_batches
from diloco_grow.metrics import read_jsonl
from diloco_grow.simulate import SimSpec, simulate


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def small_cfg(**outer):
    return config_from_dict(
        {
            "preset": "tiny",
            "seed": 3,
            "inner": {"steps": 3, "batch_size": 4, "schedule": "cosine"},
            "outer": {"compression": "int8", **outer},
        }
    )


def test_resume_is_bit_exact(tmp_path, corpus):
    cfg = small_cfg()
    full = simulate(
        cfg,
        SimSpec(workers=2, outer_steps=4, out_dir=str(tmp_path / "full"), progress=False),
        corpus,
    )
    part = tmp_path / "part"
    # Interrupted after outer step 2 (checkpoint written), then resumed in a new call.
    simulate(
        cfg,
        SimSpec(workers=2, outer_steps=4, out_dir=str(part), stop_after=2, progress=False),
        corpus,
    )
    resumed = simulate(
        cfg,
        SimSpec(workers=2, outer_steps=4, out_dir=str(part), resume=True, progress=False),
        corpus,
    )
    assert resumed["params_hash"] == full["params_hash"]
    assert resumed["val_loss"] == full["val_loss"]
    steps = [r["step"] for r in read_jsonl(part / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_roundtrip_and_garbage(tmp_path, corpus):
    from diloco_grow.worker import GlobalState

    g = GlobalState.init(small_cfg())
    g.outer_step(torch.full_like(g.theta, 1e-3))
    tensors, meta = ckpt.global_tensors_meta(g)
    blob = ckpt.pack_state(tensors, meta)
    g2 = ckpt.global_from(*ckpt.unpack_state(blob))
    assert torch.equal(g2.theta, g.theta) and torch.equal(g2.outer.buf, g.outer.buf)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.unpack_state(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.unpack_state(blob[: len(blob) // 2])
    bad = dict(tensors, theta_g=torch.zeros(7))
    with pytest.raises(ckpt.CheckpointError, match="elements"):
        ckpt.global_from(*ckpt.unpack_state(ckpt.pack_state(bad, meta)))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "c.bin"
    ckpt.atomic_write(target, b"one")
    ckpt.atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["c.bin"]


@pytest.mark.parametrize(
    "d, msg",
    [
        ({"inner": {"lr": -1}}, "inner.lr"),
        ({"inner": {"steps": 0}}, "inner.steps"),
        ({"outer": {"compression": "zip"}}, "outer.compression"),
        ({"outer": {"compression": "topk", "block_size": 512}}, "outer.block_size"),
        ({"outer": {"momentum": 1.5}}, "outer.momentum"),
        ({"inner": {"bogus": 1}}, "unknown key"),
        ({"preset": "huge"}, "unknown preset"),
        ({"model": {"n_heads": 3}}, "model"),
        ({"seed": -1}, "seed"),
        ({"data": {"mode": "weird"}}, "data.mode"),
        ({"colour": "blue"}, "unknown top-level"),
    ],
)
def test_bad_config_values_give_clear_errors(d, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(d)


def test_toml_file_and_overrides(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('preset = "tiny"\nseed = 5\n[inner]\nsteps = 7\n[outer]\nlr = 0.5\n')
    cfg = load_config(p)
    assert (cfg.seed, cfg.inner.steps, cfg.outer.lr) == (5, 7, 0.5)
    cfg2 = build_config(p, None, {"inner.steps": 9, "outer.lr": None})
    assert (cfg2.inner.steps, cfg2.outer.lr) == (9, 0.5)
    (tmp_path / "bad.toml").write_text("inner = [")
    with pytest.raises(ConfigError, match="TOML"):
        load_config(tmp_path / "bad.toml")


def test_corpus_split_and_streams(corpus, tmp_path):
    assert corpus.train.size > 10_000_000 and corpus.val.size > 100_000
    a = BatchStream(corpus, seq_len=32, batch_size=2, seed=0, worker=0)
    b = BatchStream(corpus, seq_len=32, batch_size=2, seed=0, worker=1)
    xa, ya = a.next()
    assert xa.shape == (2, 32) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(xa, b.next()[0])
    a.position = 0
    assert torch.equal(a.next()[0], xa)  # the position is the whole stream state
    n0 = BatchStream(
        corpus, seq_len=32, batch_size=2, seed=0, worker=0, n_workers=2, mode="non-iid"
    )
    n1 = BatchStream(
        corpus, seq_len=32, batch_size=2, seed=0, worker=1, n_workers=2, mode="non-iid"
    )
    assert n0.hi <= n1.lo
    v1 = val_batches(corpus, seq_len=32, batch_size=2, n_batches=2)
    v2 = val_batches(corpus, seq_len=32, batch_size=2, n_batches=2)
    assert torch.equal(v1[0][0], v2[0][0])
    (tmp_path / "t.txt").write_text("hello world " * 2000)
    user = load_corpus(tmp_path / "t.txt")
    assert user.train.size + user.val.size == 24000
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "missing")
