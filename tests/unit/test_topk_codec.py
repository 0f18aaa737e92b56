"""topk: which entries survive, how close they decode, exact bytes, slicing, wire, feedback,
and the averaging paths (LocalAverager, simulate) running on it."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import topk
from compression.codec import LAYOUTS, TINY, Encoded, concat, get_codec, payload_nbytes
from compression.codec import shard_bounds as bounds_of
from compression.feedback import ErrorFeedback
from compression.wire import WireError, pack, unpack
from diloco_grow.local_averager import LocalAverager, weighted_mean_encoded
from diloco_grow.outer import make_codec
from peers.robust import RobustConfig

K = topk.K


def reference_encode(x: torch.Tensor, block: int) -> tuple[bytes, list[float]]:
    """The format, written out one block at a time in plain Python (slow, obvious)."""
    flat = x.reshape(-1).float().tolist()
    payload, scales = bytearray(), []
    for b0 in range(0, len(flat), block):
        blk = flat[b0 : b0 + block]
        blk = blk + [0.0] * (block - len(blk))
        top = sorted(sorted(range(block), key=lambda i: (-abs(blk[i]), i))[:K])
        f32 = np.float32
        scale = max(f32(abs(blk[i])) for i in top)
        scale = f32(0.0) if scale < TINY else scale
        sent = {}  # position -> code of the entries that are sent
        for i in top:
            r = f32(abs(blk[i])) / scale if scale > 0 else f32(0.0)
            if r >= 0.25:
                sent[i] = 2 * (blk[i] < 0) + (r >= 0.75)
        first = min(sent, default=0)
        filled = []  # an unsent slot repeats the nearest sent slot before it, else the first
        for j in range(K):
            before = [i for i in top[: j + 1] if i in sent]
            pos = before[-1] if before else first
            filled.append((pos, sent.get(pos, 0)))
        payload += bytes(p for p, _ in filled)
        for q in range(K // 4):
            payload.append(sum(c << (2 * j) for j, (_, c) in enumerate(filled[4 * q : 4 * q + 4])))
        scales.append(float(scale))
    return bytes(payload), scales


def per_block(v: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-v.numel()) % block
    return torch.cat([v.reshape(-1), v.new_zeros(pad)]).view(-1, block)


def check_decoding(x: torch.Tensor, block: int) -> Encoded:
    """Every sent entry is one of the block's top K (ties: lowest position) and within
    scale/4 of x; every other entry decodes to exactly 0; at most K per block."""
    codec = get_codec("topk", block)
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert y.shape == x.shape and y.dtype == torch.float32
    xb, yb = per_block(x.float(), block), per_block(y, block)
    scale = enc.scales[:, None]
    order = np.argsort(-xb.abs().numpy(), axis=1, kind="stable")[:, :K]
    in_top = torch.zeros_like(xb, dtype=torch.bool)
    in_top.scatter_(1, torch.from_numpy(order), True)
    assert bool((yb[~in_top] == 0).all())
    assert bool(((yb != 0).sum(1) <= K).all())
    err = (xb - yb).abs()
    assert bool((err[in_top] <= (scale / 4 * (1 + 1e-6) + 1e-30).expand_as(xb)[in_top]).all())
    sent = yb != 0
    mags = (yb[sent] / scale.expand_as(yb)[sent]).abs()
    assert bool(((mags == 0.5) | (mags == 1.0)).all())
    assert bool((torch.sign(yb[sent]) == torch.sign(xb[sent])).all())
    # an entry of the top K at or above ~scale/4 is never dropped
    big = in_top & (xb.abs() > scale * (0.25 * (1 + 1e-6)))
    assert bool((yb[big] != 0).all())
    return enc


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3000),
    log_scale=st.floats(-35, 36),  # (37 can overflow fp32 to inf, which does not encode)
    block=st.sampled_from([8, 64, 100, 256]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_bounds(n, log_scale, block, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) ** 3 * 10.0 ** (log_scale * torch.rand(n, generator=g))
    check_decoding(x, block)


def test_exactly_k_nonzeros_when_the_top_k_are_large():
    g = torch.Generator().manual_seed(1)
    n = 256 * 40 + 77
    # every |x| within [0.3, 1] of its block's magnitude: the whole top K is sent
    mag = 10.0 ** torch.randint(-20, 20, (n // 256 + 1,), generator=g).float()
    x = (torch.rand(n, generator=g) * 0.7 + 0.3) * mag.repeat_interleave(256)[:n]
    x *= torch.randint(0, 2, (n,), generator=g) * 2 - 1
    enc = check_decoding(x, 256)
    nnz = (per_block(get_codec("topk").decode(enc), 256) != 0).sum(1)
    assert nnz[:-1].tolist() == [K] * 40 and nnz[-1].item() == K
    short = check_decoding(x[: 256 * 3 + 5], 256)  # a last block shorter than K
    assert (per_block(get_codec("topk").decode(short), 256) != 0).sum(1).tolist() == [K] * 3 + [5]
    gauss = torch.randn(1 << 16, generator=g)
    y = get_codec("topk").decode(get_codec("topk").encode(gauss))
    assert (per_block(y, 256) != 0).sum(1).eq(K).all()


def test_small_entries_are_dropped_and_zero_blocks_are_exact():
    codec = get_codec("topk")
    x = torch.zeros(256)
    x[[3, 50, 90]] = torch.tensor([1.0, -0.6, 0.2])  # 0.2 < 1/4 of the absmax
    y = codec.decode(codec.encode(x))
    assert y.nonzero().view(-1).tolist() == [3, 50]
    assert y[3] == 1.0 and y[50] == -0.5
    for z in [torch.zeros(1000), torch.full((300,), 1e-35), torch.tensor([1e-40, -1e-42] * 200)]:
        enc = codec.encode(z)
        assert not enc.payload.any() and not enc.scales.any()
        assert torch.equal(codec.decode(enc), torch.zeros_like(z))


def test_matches_the_reference_bytes_with_many_ties():
    g = torch.Generator().manual_seed(7)
    for block in [8, 64, 256]:
        for n in [1, 5, 9, block, 3 * block + 3]:
            for x in [torch.randint(-3, 4, (n,), generator=g).float(),
                      torch.randn(n, generator=g),
                      torch.randint(-1, 2, (n,), generator=g).float() * 1e-3]:
                enc = get_codec("topk", block).encode(x)
                payload, scales = reference_encode(x, block)
                assert bytes(enc.payload.numpy()) == payload, (block, n, x)
                assert enc.scales.tolist() == scales


def test_ties_keep_the_lowest_positions_deterministically():
    codec = get_codec("topk")
    x = torch.ones(256)
    x[200] = 2.0
    enc = codec.encode(x)
    assert enc.payload[:K].tolist() == [0, 1, 2, 3, 4, 5, 6, 200]
    alt = torch.tensor([1.0, -1.0] * 128)
    y = codec.decode(codec.encode(alt))
    assert torch.equal(y[:K], alt[:K]) and not y[K:].any()
    big = torch.randint(-2, 3, (100_003,)).float()
    a, b = codec.encode(big), codec.encode(big.clone())
    assert torch.equal(a.payload, b.payload) and torch.equal(a.scales, b.scales)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # torch.topk's work split must not matter
        c = codec.encode(big)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.payload, c.payload)


def test_decode_is_one_multiply_per_kept_element():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=g) * 1e-30
    codec = get_codec("topk")
    enc = codec.encode(x)
    y = codec.decode(enc)
    idx, code = topk.check_payload(enc.payload.numpy(), enc.numel, 256)
    want = np.zeros(enc.scales.numel() * 256, dtype=np.float32)
    for b in range(enc.scales.numel()):
        for i, c in zip(idx[b], code[b], strict=True):
            want[b * 256 + int(i)] = np.float32([0.5, 1.0, -0.5, -1.0][c]) * enc.scales[b].numpy()
    assert np.array_equal(y.numpy().view(np.int32), want[: x.numel()].view(np.int32))
    assert torch.equal(codec.decode(enc).view(torch.int32), y.view(torch.int32))


@pytest.mark.parametrize("block", [8, 100, 256])
@pytest.mark.parametrize("n", [0, 1, 255, 257, 5000, 10_001])
def test_slices_are_exact_and_concat_restores_the_whole(block, n):
    codec = get_codec("topk", block)
    x = torch.randn(n)
    enc = codec.encode(x)
    assert enc.align == block
    assert enc.payload.numel() == payload_nbytes("topk", n, block) == -(-n // block) * 10
    y = codec.decode(enc)
    for shards in [1, 2, 3, 7]:
        parts = [enc.slice(lo, hi) for lo, hi in bounds_of(n, enc.align, shards)]
        for (lo, hi), p in zip(bounds_of(n, enc.align, shards), parts, strict=True):
            direct = codec.encode(x[lo:hi])
            assert torch.equal(p.payload, direct.payload) and torch.equal(p.scales, direct.scales)
            assert pack(p) == pack(direct)
            assert torch.equal(codec.decode(p), y[lo:hi])
        whole = concat(parts)
        assert torch.equal(whole.payload, enc.payload) and torch.equal(whole.scales, enc.scales)


def test_layout_registry_and_block_sizes():
    assert LAYOUTS["topk"].block_bytes == topk.K + topk.K // 4 == 10
    assert LAYOUTS["topk32"].block_bytes == 40 and LAYOUTS["topk_m32"].reduced_as == "topk32"
    assert get_codec("topk").block_size == 256
    enc = get_codec("topk").encode(torch.randn(1 << 16))
    assert 8 * enc.nbytes / enc.numel == (10 + 4) * 8 / 256  # 0.4375 bits per element
    for bad in [7, 257, 1024, 2.0]:
        with pytest.raises(ValueError, match="block_size"):
            get_codec("topk", bad)  # type: ignore[arg-type]
    assert make_codec("topk", 128).block_size == 128  # outer.block_size applies to topk
    with pytest.raises(ValueError, match="payload"):
        Encoded("topk", (300,), "float32", 256, torch.zeros(10, dtype=torch.uint8),
                torch.zeros(2))


def test_decode_validates_directly_built_encodings():
    codec = get_codec("topk", 64)
    good = codec.encode(torch.randn(100))
    p = good.payload.clone()
    p[10:18] = torch.arange(33, 41, dtype=torch.uint8)  # the last block holds only 36
    bad = Encoded("topk", (100,), "float32", 64, p, good.scales)
    with pytest.raises(ValueError, match="outside"):
        codec.decode(bad)


# ---- wire --------------------------------------------------------------------------------


def topk_frame(n: int = 1000, block: int = 256, seed: int = 0) -> dict:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return msgpack.unpackb(pack(get_codec("topk", block).encode(x)))


def with_payload(d: dict, block_row: int, row: list[int]) -> bytes:
    p = bytearray(d["payload"])
    p[block_row * 10 : block_row * 10 + 10] = bytes(row)
    return msgpack.packb({**d, "payload": bytes(p)}, use_bin_type=True)


def codes(*c: int) -> list[int]:
    return [c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6, c[4] | c[5] << 2 | c[6] << 4 | c[7] << 6]


def test_wire_round_trip_and_decoded_bits():
    for n, block in [(0, 256), (1, 256), (1000, 256), (999, 8), (12_345, 100)]:
        enc = get_codec("topk", block).encode(torch.randn(n))
        back = unpack(pack(enc))
        assert (back.codec, back.shape, back.block_size) == ("topk", (n,), block)
        assert torch.equal(back.payload, enc.payload) and torch.equal(back.scales, enc.scales)
        a = get_codec("topk", block).decode(enc)
        assert torch.equal(a.view(torch.int32), get_codec("topk", block).decode(back).view(
            torch.int32))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        # (shape [1001] is still 4 blocks: a valid frame of another vector, which the round
        # rejects for its shape; peers/rounds.check_shard)
        ({"shape": [1025]}, "payload"),
        ({"shape": [768]}, "payload"),
        ({"block": 128}, "payload"),
        ({"block": 512}, "block"),
        ({"block": 4}, "block"),
        ({"payload": b"\x00" * 39}, "payload"),
        ({"scales": b"\x00" * 12}, "scales"),
    ],
)
def test_wire_rejects_lengths_that_disagree_with_shape_and_block(override, match):
    d = topk_frame(1000)
    with pytest.raises(WireError, match=match):
        unpack(msgpack.packb({**d, **override}, use_bin_type=True))


def test_wire_rejects_a_huge_shape_claim_before_allocating():
    import tracemalloc

    d = topk_frame(1000)
    data = msgpack.packb({**d, "shape": [10**8], "block": 8}, use_bin_type=True)
    tracemalloc.start()
    with pytest.raises(WireError, match="payload"):
        unpack(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1e-40, 2.0**-101])
def test_wire_rejects_unsafe_scales(bad):
    d = topk_frame(1000)
    s = np.frombuffer(d["scales"], dtype="<f4").copy()
    s[1] = bad
    with pytest.raises(WireError, match="scale"):
        unpack(msgpack.packb({**d, "scales": s.tobytes()}, use_bin_type=True))


@pytest.mark.parametrize(
    ("block_row", "row", "match"),
    [
        (3, [0, 1, 2, 3, 4, 5, 6, 232, *codes(0, 0, 0, 0, 0, 0, 0, 0)], "outside"),  # 232 left
        (3, [0, 1, 2, 3, 4, 5, 6, 255, *codes(0, 0, 0, 0, 0, 0, 0, 0)], "outside"),
        (0, [5, 1, 2, 3, 4, 6, 7, 8, *codes(0, 0, 0, 0, 0, 0, 0, 0)], "order"),
        (0, [1, 1, 2, 3, 4, 6, 7, 8, *codes(0, 3, 0, 0, 0, 0, 0, 0)], "repeated"),
        (1, [9, 9, 9, 9, 9, 9, 9, 9, *codes(1, 1, 1, 1, 1, 1, 1, 2)], "repeated"),
    ],
)
def test_wire_rejects_bad_positions(block_row, row, match):
    with pytest.raises(WireError, match=match):
        unpack(with_payload(topk_frame(1000), block_row, row))


def test_repeated_positions_with_one_code_decode_as_one_write():
    d = topk_frame(1000)
    s = np.frombuffer(d["scales"], dtype="<f4")
    enc = unpack(with_payload(d, 1, [7, 7, 7, 9, 9, 200, 200, 200, *codes(3, 3, 3, 0, 0, 1, 1, 1)]))
    y = get_codec("topk").decode(enc)[256:512]
    assert y.nonzero().view(-1).tolist() == [7, 9, 200]
    assert y[7] == -s[1] and y[9] == s[1] / 2 and y[200] == s[1]


def test_largest_accepted_frame_decodes_finite():
    d = topk_frame(1000)
    big = np.full(4, np.finfo(np.float32).max, dtype="<f4")
    row = [0, 1, 2, 3, 4, 5, 6, 7, *codes(3, 3, 3, 3, 3, 3, 3, 3)]
    p = bytes(row) * 4
    enc = unpack(msgpack.packb({**d, "scales": big.tobytes(), "payload": p}, use_bin_type=True))
    y = get_codec("topk").decode(enc)
    assert bool(torch.isfinite(y).all()) and y.min().item() == -np.finfo(np.float32).max


# ---- error feedback and averaging ----------------------------------------------------------


def test_error_feedback_sums_track_the_inputs():
    g = torch.Generator().manual_seed(5)
    n, rounds, block = 4096, 300, 256
    codec = get_codec("topk", block)
    ef = ErrorFeedback(codec)
    mu = torch.randn(n, generator=g)  # what every round pushes on average
    sum_in = torch.zeros(n, dtype=torch.float64)
    sum_out = torch.zeros(n, dtype=torch.float64)
    peaks = []
    for t in range(rounds):
        x = mu + torch.randn(n, generator=g)
        enc = ef.compress(x)
        sum_in += x.double()
        sum_out += codec.decode(enc).double()
        if t in (rounds // 3, rounds - 1):
            peaks.append(ef.residual.abs().max().item())
    # what was sent is exactly the input minus what is still owed (fp32 bookkeeping aside)
    assert torch.allclose(sum_in - sum_out, ef.residual.double(), atol=1e-3)
    # the residual stays bounded: it does not grow with the number of rounds
    assert peaks[1] < 2 * peaks[0] + 1 and peaks[1] < 100
    # so the average of what was sent converges to the average input
    assert (sum_out / rounds - mu.double()).abs().max().item() < 0.5
    assert (sum_in / rounds - sum_out / rounds).abs().max().item() < 100 / rounds


@pytest.mark.parametrize("robust", [True, False])
def test_local_averager_gives_everyone_the_same_bits(robust):
    g = torch.Generator().manual_seed(11)
    n, workers = 50_000, 4
    rcfg = RobustConfig(enabled=robust)
    codec = get_codec("topk")
    common = torch.randn(n, generator=g)
    efs = [ErrorFeedback(codec) for _ in range(workers)]
    contribs = [(ef.compress(common + 0.3 * torch.randn(n, generator=g)), 1.0 + w)
                for w, ef in enumerate(efs)]
    avg = LocalAverager("topk", 256, rcfg)
    res = avg.average(contribs, step=0, params_hash="x")
    assert avg.rejected == {} and avg.clipped == set()
    # what a member of a real round does: decode each reducer's frame off the wire
    again = torch.empty(n)
    for lo, hi in bounds_of(n, 256, workers):
        shard = weighted_mean_encoded([e.slice(lo, hi) for e, _ in contribs],
                                      [w for _, w in contribs], "topk", 256, rcfg)
        again[lo:hi] = codec.decode(unpack(pack(shard)))
    assert torch.equal(res.mean.view(torch.int32), again.view(torch.int32))
    res2 = LocalAverager("topk", 256, rcfg).average(contribs, step=0, params_hash="x")
    assert torch.equal(res.mean.view(torch.int32), res2.mean.view(torch.int32))
    assert bool(((per_block(res.mean, 256) != 0).sum(1) <= K).all())
    # bytes on the wire: ~0.4375 bits per element each way, a few frame headers on top
    ideal = 2 * (workers - 1) / workers * n * 14 / 256
    assert ideal <= res.bytes_sent <= ideal + 2 * workers * 100


def test_simulate_two_outer_steps_on_tiny(tmp_path):
    from diloco_grow.config import config_from_dict
    from diloco_grow.data import load_corpus
    from diloco_grow.metrics import read_jsonl
    from diloco_grow.simulate import SimSpec, simulate

    cfg = config_from_dict({
        "preset": "tiny",
        "inner": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "outer": {"compression": "topk", "lr": 0.7, "momentum": 0.9, "error_feedback": True},
    })
    summary = simulate(cfg, SimSpec(workers=2, outer_steps=2, out_dir=str(tmp_path),
                                    progress=False), load_corpus())
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(recs) == 2 and all(np.isfinite(r["val_loss"]) for r in recs)
    assert summary["val_loss"] == recs[-1]["val_loss"]
    assert recs[-1]["rejected"] == [] and recs[-1]["n_params"] > 0
    n_params = recs[-1]["n_params"]
    per_round = n_params * 14 / 256 * (2 - 1) / 2 * 2  # two workers: half out, half back
    assert per_round <= recs[-1]["bytes_sent_per_worker"] / 2 <= per_round + 1000


def test_topk_m32_reducers_keep_the_union_of_four_contributions():
    """topk re-encodes the mean of 4 sparse parts with K = 8 and drops most of it;
    topk_m32 sends the same bytes per contribution, and its mean (topk32, K = 32) has room
    for every element some contribution sent: only those below a quarter of the block's
    absmax (where the 2-bit code rounds to 0) are dropped."""
    g = torch.Generator().manual_seed(5)
    n, workers = 256 * 64, 4
    xs = [torch.randn(n, generator=g) for _ in range(workers)]
    kept = {}
    for name in ("topk", "topk_m32"):
        codec = get_codec(name)
        contribs = [(codec.encode(x), 1.0) for x in xs]
        assert all(len(pack(e)) == len(pack(contribs[0][0])) for e, _ in contribs)
        res = LocalAverager(name, 256, RobustConfig(enabled=False)).average(
            contribs, step=0, params_hash="x")
        exact = sum(codec.decode(e) for e, _ in contribs) / workers
        kept[name] = float((res.mean != 0).sum()) / float((exact != 0).sum())
        if name == "topk_m32":
            # within the 2-bit rounding of the mean everywhere: scale/4 per element
            scale = per_block(exact, 256).abs().amax(1, keepdim=True)
            assert bool(((per_block(res.mean - exact, 256)).abs() <= scale / 4 + 1e-6).all())
    assert kept["topk_m32"] > 0.9 and kept["topk"] < 0.35


def test_topk_s32_averages_each_coordinate_over_its_senders():
    """topk_s32 sends topk_m32's bytes and encodes the mean as topk32 too, but divides each
    coordinate by the weight fraction of the members that sent it. With disjoint supports
    (every coordinate sent by one member of four) that is exactly 4× topk_m32's mean: the
    factor is a power of two, so the topk32 encoding scales with it bit for bit."""
    assert LAYOUTS["topk_s32"].mean_over_senders and not LAYOUTS["topk_m32"].mean_over_senders
    assert LAYOUTS["topk_s32"].reduced_as == "topk32"
    assert LAYOUTS["topk_s32"].block_bytes == LAYOUTS["topk_m32"].block_bytes
    n, workers = 256 * 16, 4
    g = torch.Generator().manual_seed(7)
    xs = []
    for w in range(workers):  # member w owns positions 8w..8w+7 of every block
        x = torch.zeros(n // 256, 256)
        x[:, 8 * w : 8 * w + 8] = torch.randn(n // 256, 8, generator=g)
        xs.append(x.reshape(-1))
    means = {}
    for name in ("topk_m32", "topk_s32"):
        codec = get_codec(name)
        encs = [(codec.encode(x), 1.0) for x in xs]
        assert len(pack(encs[0][0])) == len(pack(get_codec("topk_m32").encode(xs[0])))
        means[name] = LocalAverager(name, 256).average(encs, step=0, params_hash="x").mean
    assert torch.equal(means["topk_s32"], 4 * means["topk_m32"])
    # a coordinate all four sent is their plain mean (factor exactly 1), not 4×
    same = {name: LocalAverager(name, 256).average(
        [(get_codec(name).encode(xs[0]), 1.0)] * workers, step=0, params_hash="x").mean
        for name in ("topk_m32", "topk_s32")}
    assert torch.equal(same["topk_s32"], same["topk_m32"])
    assert same["topk_s32"].count_nonzero() > 0


def test_topk_s16_sends_four_per_block_and_its_mean_keeps_four_members_union():
    """topk_s16: K = 4 per block on the way out ((4 + 1) payload bytes + a 4-byte scale per
    256 elements), the mean over senders as topk16 on the way back. Four members with
    disjoint top-4 supports fill exactly 16 slots, so the reduced mean keeps every sent
    element, each at its sender's decoded value (one sender per coordinate: factor 1)."""
    assert LAYOUTS["topk_s16"].reduced_as == "topk16" and LAYOUTS["topk_s16"].mean_over_senders
    assert (LAYOUTS["topk_s16"].block_bytes, LAYOUTS["topk16"].block_bytes) == (5, 20)
    n, workers = 256 * 16, 4
    g = torch.Generator().manual_seed(11)
    codec = get_codec("topk_s16")
    xs = []
    for w in range(workers):  # member w's four largest live at positions 4w..4w+3
        x = 0.01 * torch.randn(n // 256, 256, generator=g)
        x[:, 4 * w : 4 * w + 4] = 1.0 + torch.rand(n // 256, 4, generator=g)
        xs.append(x.reshape(-1))
    encs = [(codec.encode(x), 1.0) for x in xs]
    assert encs[0][0].payload.numel() == (n // 256) * 5
    sent = [codec.decode(e) for e, _ in encs]
    assert all(int(s.reshape(-1, 256).count_nonzero(1).max()) == 4 for s in sent)
    mean = LocalAverager("topk_s16", 256).average(encs, step=0, params_hash="x").mean
    union = sum(sent)  # disjoint supports: the senders' mean of a coordinate is its value
    assert torch.equal(mean != 0, union != 0)
    scale = per_block(union, 256).abs().amax(1, keepdim=True)
    assert bool((per_block(mean - union, 256).abs() <= scale / 4 + 1e-6).all())
