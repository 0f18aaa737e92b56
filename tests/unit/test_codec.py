"""Codecs: error bounds, edge values, dtypes, slicing/sharding and determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.codec import Encoded, codec_names, concat, get_codec, shard_bounds

FLT_MAX = torch.finfo(torch.float32).max
QMAX = {"int8": 127, "int4": 7}
ALL = ["int8", "int4", "topk", "topk32", "topk_m32", "topk_s32", "topk16", "topk_s16",
       "bnb8", "fp16", "none"]


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element absmax of its block (zero padding does not change a block's absmax)."""
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    return blocks.abs().amax(1).repeat_interleave(block)[: flat.numel()]


def assert_within_bound(name: str, x: torch.Tensor, block: int = 256) -> None:
    codec = get_codec(name, block)
    y = codec.decode(codec.encode(x))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert bool(torch.isfinite(y).all())
    am = block_absmax(x, block)
    err = (x.reshape(-1).float() - y.reshape(-1)).abs()
    # absmax/(2*qmax) plus fp32 rounding of x*inv (relative 1e-5) plus the TINY flush (1e-30)
    bound = am / (2 * QMAX[name]) * (1 + 1e-5) + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("name", ["int8", "int4"])
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3000),
    log_scale=st.floats(-35, 37),
    block=st.sampled_from([16, 64, 256, 1024]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_error_bound_per_block(name, n, log_scale, block, seed):
    g = torch.Generator().manual_seed(seed)
    # Heavy-tailed values with per-block scale changes, so blocks differ a lot.
    x = torch.randn(n, generator=g) ** 3 * 10.0 ** (log_scale * torch.rand(n, generator=g))
    assert_within_bound(name, x, block)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_edge_values(name):
    codec = get_codec(name)
    zeros = torch.zeros(1000)
    assert torch.equal(codec.decode(codec.encode(zeros)), zeros)
    for c in [1.0, -3.5, 1e-20, 2.5e37]:
        assert_within_bound(name, torch.full((777,), c))
    # denormals alone flush to exact zero; next to normals they quantise within the bound
    den = torch.tensor([1e-40, -1e-42, 1.4e-45, 0.0] * 100)
    assert torch.equal(codec.decode(codec.encode(den)), torch.zeros(400))
    assert_within_bound(name, torch.cat([den, torch.tensor([1e-3])]))
    huge = torch.tensor([3e38, -3e38, 1.0, 0.0, -2e38] * 60)
    assert_within_bound(name, huge)
    # beyond FLT_MAX/128 the scale is capped: still finite, error under twice the bound
    top = torch.tensor([FLT_MAX, -FLT_MAX, 1e38])
    y = codec.decode(codec.encode(top))
    assert bool(torch.isfinite(y).all())
    assert bool(((top - y).abs() <= FLT_MAX / QMAX[name]).all())


@pytest.mark.parametrize("name", ALL)
def test_shapes_lengths_and_empty(name):
    codec = get_codec(name)
    for shape in [(), (1,), (3,), (255,), (257,), (1001,), (0,), (0, 5), (4, 0, 3), (7, 33)]:
        x = torch.randn(shape)
        enc = codec.encode(x)
        y = codec.decode(enc)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert enc.numel == x.numel()
        assert enc.nbytes == enc.payload.numel() + 4 * enc.scales.numel()
        if name == "none":
            assert torch.equal(x, y)
    # non-contiguous input encodes its logical (row-major) order
    t = torch.randn(40, 30).t()
    assert torch.equal(codec.encode(t).payload, codec.encode(t.contiguous()).payload)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(name, dtype):
    codec = get_codec(name)
    x = torch.randn(1000).to(dtype)
    enc = codec.encode(x)
    assert enc.dtype == str(dtype).removeprefix("torch.")
    assert torch.equal(enc.payload, codec.encode(x.float()).payload)
    assert codec.decode(enc).dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_non_finite_input_rejected(name):
    codec = get_codec(name)
    for bad in [float("nan"), float("inf"), -float("inf")]:
        x = torch.randn(600)
        x[300] = bad
        with pytest.raises(ValueError, match="non-finite"):
            codec.encode(x)
    with pytest.raises(ValueError):
        codec.encode(torch.arange(10))


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 5000), cuts=st.lists(st.integers(0, 40), min_size=2, max_size=2))
def test_slice_equals_encoding_of_sub_range(name, n, cuts):
    codec = get_codec(name, 64 if name in ("int8", "int4", "topk", "bnb8") else None)
    x = torch.randn(n)
    enc = codec.encode(x)
    a = enc.align
    start = min(min(cuts) * a, n)
    end = n if max(cuts) == 40 else min(max(cuts) * a, n)
    part = enc.slice(start, end)
    direct = codec.encode(x[start:end])
    assert torch.equal(part.payload, direct.payload)
    assert torch.equal(part.scales, direct.scales)
    assert part.shape == (end - start,)
    assert torch.equal(codec.decode(part), codec.decode(enc)[start:end])


def test_slice_rejects_misaligned():
    enc = get_codec("int8", 64).encode(torch.randn(1000))
    with pytest.raises(ValueError, match="aligned"):
        enc.slice(10, 128)
    with pytest.raises(ValueError, match="aligned"):
        enc.slice(0, 100)
    with pytest.raises(ValueError, match="range"):
        enc.slice(0, 1001)


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 10**6), align=st.integers(1, 4096), n=st.integers(1, 17))
def test_shard_bounds(numel, align, n):
    b = shard_bounds(numel, align, n)
    assert len(b) == n and b[0][0] == 0 and b[-1][1] == numel
    for (_, e0), (s1, _) in zip(b[:-1], b[1:], strict=True):
        assert e0 == s1
    for s, e in b:
        assert s <= e and (s % align == 0 or s == numel)
    sizes = [e - s for s, e in b]
    full = [sz for sz, (_, e) in zip(sizes, b, strict=True) if e != numel]
    assert not full or max(full) - min(full) <= align  # balanced to one unit


@pytest.mark.parametrize("name", ALL)
def test_concat_inverts_sharding(name):
    codec = get_codec(name)
    x = torch.randn(10_001)
    enc = codec.encode(x)
    for n in [1, 3, 7, 100]:
        shards = [enc.slice(s, e) for s, e in shard_bounds(enc.numel, enc.align, n)]
        whole = concat(shards)
        assert torch.equal(whole.payload, enc.payload) and torch.equal(whole.scales, enc.scales)
        assert whole.shape == (10_001,)
    with pytest.raises(ValueError):
        concat([])
    if name in ("int8", "int4", "topk"):
        with pytest.raises(ValueError, match="multiple"):
            concat([codec.encode(x[:100]), codec.encode(x[100:])])


def test_registry_and_validation():
    assert set(codec_names()) == set(ALL)
    with pytest.raises(ValueError, match="unknown codec"):
        get_codec("int3")
    with pytest.raises(ValueError):
        get_codec("int4", 255)
    with pytest.raises(ValueError):
        get_codec("bnb8", 100)
    with pytest.raises(ValueError):
        get_codec("none", 256)
    assert get_codec("int8").block_size == 256
    with pytest.raises(ValueError, match="payload"):
        Encoded("int8", (10,), "float32", 256, torch.zeros(9, dtype=torch.uint8),
                torch.zeros(1))


def test_decode_is_deterministic_and_accurate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1 << 16, generator=g)
    errs = {}
    for name in ["int8", "int4", "bnb8"]:
        codec = get_codec(name)
        enc = codec.encode(x)
        a, b = codec.decode(enc), codec.decode(enc)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bitwise, -0.0 included
        errs[name] = (x - a).pow(2).mean().sqrt().item()
        assert 8 * enc.nbytes / x.numel() <= (8.25 if name != "int4" else 4.25)
    assert errs["int8"] < errs["bnb8"] < errs["int4"]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_large_tensors_chunks_and_big_buffers_match_small_path(name):
    # > CHUNK_ELEMS elements and > HUGE_MIN_BYTES of output: several chunks, mmap buffers
    codec = get_codec(name)
    x = torch.randn((1 << 21) + 333) * torch.rand(1).item() * 10
    enc = codec.encode(x)
    y = codec.decode(enc)
    assert_within_bound(name, x[-5000:])
    for a, b in [(0, 4096), ((1 << 20) - 512, (1 << 20) + 512), ((1 << 21) - 256, x.numel())]:
        part = codec.encode(x[a:b])
        assert torch.equal(enc.slice(a, b).payload, part.payload)
        assert torch.equal(y[a:b], codec.decode(part))
    # the worker pool changes nothing: one thread gives the same bytes and the same floats
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        enc1 = codec.encode(x)
        assert torch.equal(enc1.payload, enc.payload) and torch.equal(enc1.scales, enc.scales)
        assert torch.equal(codec.decode(enc1).view(torch.int32), y.view(torch.int32))
    finally:
        torch.set_num_threads(threads)
    x[(1 << 20) + 7] = float("nan")  # an error inside a worker's chunk reaches the caller
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["int8", "int4", "topk"])
def test_cuda_matches_cpu(name):
    codec = get_codec(name)
    x = torch.randn(100_003)
    enc_cpu, enc_gpu = codec.encode(x), codec.encode(x.cuda())
    assert torch.equal(enc_cpu.scales, enc_gpu.scales)
    assert torch.equal(enc_cpu.payload, enc_gpu.payload)
    y_cpu = codec.decode(enc_cpu)
    y_gpu = codec.decode(enc_cpu, device="cuda")
    assert y_gpu.device.type == "cuda"
    assert torch.equal(y_cpu.view(torch.int32), y_gpu.cpu().view(torch.int32))
