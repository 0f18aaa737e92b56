"""Sparse codecs through a real swarm: 3 peer processes (hivemind DHT + zmq on 127.0.0.1)
average top-k contributions, and every member must end up with exactly the mean that the
in-process arithmetic (diloco_grow.local_averager) computes from the same inputs.

`topk_m32` sends topk's bytes (8 of 256 per block) but its reducers encode the mean as
`topk32`: the mean of three sparse parts keeps more than 8 non-zeros in a block, which
plain `topk` (mean re-encoded with K = 8) can never have. `topk_s32` is `topk_m32` whose
reducers average each coordinate over the members that sent it: the swarm's reducers must
compute exactly what the in-process arithmetic does.
"""

from __future__ import annotations

import numpy as np
import pytest
from swarm_harness import NUMEL, WEIGHTS, Launcher, worker

from compression.codec import concat, get_codec, reduced_name, shard_bounds
from compression.topk import K_OF
from compression.wire import pack
from diloco_grow.local_averager import LocalAverager, weighted_mean_encoded

N_PEERS, ROUNDS = 3, 2
CONTROL_BYTES = 8 << 10  # JOIN, BEGIN, DONE, ... headers of one first-attempt round


@pytest.fixture
def swarm(tmp_path):
    launcher = Launcher(tmp_path)
    yield launcher.start
    launcher.kill_all()


def _nnz_per_block(x: np.ndarray, block: int) -> np.ndarray:
    pad = (-x.size) % block
    return (np.pad(x, (0, pad)) != 0).reshape(-1, block).sum(axis=1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec_name", ["topk", "topk_m32", "topk_s32", "topk_s16"])
def test_sparse_means_are_bit_identical_and_equal_the_local_arithmetic(swarm, tmp_path, codec_name):
    peers = swarm(
        N_PEERS,
        common=["--codec", codec_name, "--rounds", str(ROUNDS), "--linger", "0.5"],
    )
    for p in peers:
        p.wait_for("done", timeout=90)
    seed_of = {p.ready["peer_id"]: p.seed for p in peers}
    codec = get_codec(codec_name)
    block = codec.block_size
    mean_codec = get_codec(reduced_name(codec_name), block)
    k_sent, k_mean = K_OF[codec_name], K_OF[reduced_name(codec_name)]
    assert (k_sent, k_mean) == {"topk": (8, 8), "topk_s16": (4, 16)}.get(codec_name, (8, 32))

    for step in range(ROUNDS):
        rounds = [p.rounds()[step] for p in peers]
        # (c) every member committed this round on its first attempt, all three together.
        for r in rounds:
            assert r["attempts"] == 1, (step, r)
            assert sorted(r["members"]) == sorted(seed_of), (step, r["members"])
        members = rounds[0]["members"]  # the round's member order (sorted by peer id)
        assert all(r["members"] == members for r in rounds)

        # (a) bit-identical means on every member: the reported hash and the saved vector.
        assert len({r["sha256"] for r in rounds}) == 1, f"step {step}: members disagree"
        got = [np.load(tmp_path / f"{p.seed}_{step}.npy") for p in peers]
        for g in got[1:]:
            assert g.tobytes() == got[0].tobytes()
        got = got[0]

        # (b) ... equal to the in-process arithmetic on the same inputs, in member order.
        seeds = [seed_of[m] for m in members]
        encs = [codec.encode(worker.contribution(s, step, NUMEL)) for s in seeds]
        weights = [WEIGHTS[s] for s in seeds]
        local = LocalAverager(codec_name, block).average(
            list(zip(encs, weights, strict=True)), step=step, params_hash="x"
        )
        want = local.mean.numpy()
        assert want.tobytes() == got.tobytes(), (
            f"step {step}: swarm mean differs from LocalAverager at "
            f"{int((want != got).sum())} of {NUMEL} elements"
        )
        # ... and shard by shard from weighted_mean_encoded (the reducer's encoding).
        bounds = shard_bounds(NUMEL, encs[0].align, len(seeds))
        shards = [
            weighted_mean_encoded([e.slice(lo, hi) for e in encs], weights, codec_name, block)
            for lo, hi in bounds
        ]
        assert {s.codec for s in shards} == {reduced_name(codec_name)}
        assert mean_codec.decode(concat(shards)).numpy().tobytes() == got.tobytes()

        # The mean's sparsity tells which codec the reducers encoded it with.
        nnz = _nnz_per_block(got, block)
        assert nnz.max() <= k_mean
        if codec_name == "topk":
            assert nnz.max() <= 8
        else:  # the union of three top-Ks survives: impossible for plain topk
            assert (nnz > k_sent).mean() > 0.9, np.bincount(nnz)  # (here: every block)
        assert np.count_nonzero(got) > 0

        # Bytes: member k sent its PARTs to the other two reducers and its reduced shard
        # (in the reduced codec) to the other two members, and received the converse;
        # on top of that only a few small control messages (observed: under 3 KiB).
        for k, pid in enumerate(members):
            r = next(q for q in peers if q.ready["peer_id"] == pid).rounds()[step]
            others = [j for j in range(N_PEERS) if j != k]
            sent = sum(len(pack(encs[k].slice(*bounds[j]))) for j in others)
            sent += len(others) * len(pack(shards[k]))
            recv = sum(len(pack(encs[j].slice(*bounds[k]))) + len(pack(shards[j])) for j in others)
            assert sent <= r["bytes_sent"] <= sent + CONTROL_BYTES, (pid, sent, r)
            assert recv <= r["bytes_recv"] <= recv + CONTROL_BYTES, (pid, recv, r)
