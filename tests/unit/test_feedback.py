"""Error feedback: nothing is lost over rounds; state survives checkpoints and growth."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.codec import get_codec
from compression.feedback import ErrorFeedback

QMAX = {"int8": 127, "int4": 7}


@pytest.mark.parametrize("name", ["int8", "int4"])
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 700),
    rounds=st.integers(1, 40),
    log_scale=st.floats(-6, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_running_sums_track_within_one_step(name, n, rounds, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    codec = get_codec(name, 64)
    ef = ErrorFeedback(codec)
    sum_in = torch.zeros(n, dtype=torch.float64)
    sum_out = torch.zeros(n, dtype=torch.float64)
    peak = 0.0
    for _ in range(rounds):
        # heavy tails + a per-round scale so the residual is sometimes the dominant term
        x = torch.randn(n, generator=g) ** 3 * 10.0 ** (log_scale * torch.rand(1, generator=g))
        enc = ef.compress(x)
        sum_in += x.double()
        sum_out += codec.decode(enc).double()
        peak = max(peak, x.abs().max().item())
    # sum_in - sum_out is the current residual, which is at most half a step of the last
    # round's blocks; fp32 bookkeeping adds ~1 ulp of the largest value per round.
    step = enc.scales.repeat_interleave(64)[:n].double()
    drift = (sum_in - sum_out).abs()
    assert bool((drift <= step / 2 * (1 + 1e-5) + rounds * peak * 2e-7 + 1e-30).all())
    assert torch.allclose(drift, ef.residual.double().abs(), rtol=1e-4, atol=rounds * peak * 2e-7)


def test_first_round_equals_plain_encoding_and_residual_is_the_error():
    codec = get_codec("int8")
    x = torch.randn(3, 500)
    ef = ErrorFeedback(codec)
    enc = ef.compress(x)
    assert torch.equal(enc.payload, codec.encode(x).payload)
    assert ef.residual.shape == x.shape
    assert torch.equal(ef.residual, x - codec.decode(enc))


def test_lossless_codec_keeps_zero_residual_and_half_inputs_work():
    ef = ErrorFeedback(get_codec("none"))
    for _ in range(3):
        ef.compress(torch.randn(100))
    assert torch.equal(ef.residual, torch.zeros(100))
    ef8 = ErrorFeedback(get_codec("int8"))
    ef8.compress(torch.randn(100).bfloat16())
    assert ef8.residual.dtype == torch.float32


def test_input_is_not_modified_and_shape_mismatch_is_rejected():
    ef = ErrorFeedback(get_codec("int4"))
    x = torch.randn(300)
    x0 = x.clone()
    ef.compress(x)
    ef.compress(x)
    assert torch.equal(x, x0)
    with pytest.raises(ValueError, match="remap"):
        ef.compress(torch.randn(301))


def test_state_dict_round_trip_continues_identically():
    codec = get_codec("int8", 64)
    a = ErrorFeedback(codec)
    assert a.state_dict() == {}
    xs = [torch.randn(1000) for _ in range(4)]
    a.compress(xs[0])
    a.compress(xs[1])
    b = ErrorFeedback(codec)
    b.load_state_dict(a.state_dict())
    for x in xs[2:]:
        assert torch.equal(a.compress(x).payload, b.compress(x).payload)
    assert torch.equal(a.residual, b.residual)
    b.load_state_dict({})
    assert b.residual is None
    with pytest.raises(ValueError):
        b.load_state_dict({"residual": torch.tensor([float("nan")])})
    with pytest.raises(ValueError):
        b.load_state_dict({"residual": torch.zeros(3), "extra": torch.zeros(1)})


def test_remap_follows_index_map():
    ef = ErrorFeedback(get_codec("int8"))
    ef.remap(torch.tensor([0, 1]))  # no residual yet: nothing to do
    assert ef.residual is None
    ef.residual = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(2, 2)
    ef.remap(torch.tensor([0, 1, -1, 3, 3, 2, -1]))
    assert torch.equal(ef.residual, torch.tensor([1.0, 2.0, 0.0, 4.0, 4.0, 3.0, 0.0]))
    ef.compress(torch.zeros(7))  # the grown residual is used by the next round
    for bad in [torch.tensor([7]), torch.tensor([-2]), torch.tensor([0.5]), torch.zeros(2, 2)]:
        with pytest.raises(ValueError):
            ef.remap(bad)


def test_decayed_accumulator_keeps_the_discounted_sums():
    """SparseLoCo's e <- β·e + x: after T rounds the residual is exactly what the
    discounted inputs sent nothing of, Σ β^(T-t)·x_t − Σ β^(T-t)·sent_t (fp64 reference),
    and with the sparse codec most of it stays local, which is the point."""
    g = torch.Generator().manual_seed(3)
    codec = get_codec("topk", 256)
    beta = 0.9
    ef = ErrorFeedback(codec, decay=beta)
    n = 4096
    acc_in = torch.zeros(n, dtype=torch.float64)
    acc_sent = torch.zeros(n, dtype=torch.float64)
    for _ in range(12):
        x = torch.randn(n, generator=g)
        sent = codec.decode(ef.compress(x)).double()
        acc_in = beta * acc_in + x.double()
        acc_sent = beta * acc_sent + sent
        assert int((sent != 0).sum()) <= n // 32  # top-8 of 256 per block
    err = (ef.residual.double() - (acc_in - acc_sent)).abs().max().item()
    assert err < 1e-4
    # Most of the discounted inputs are still local (1/32 of the entries leave per round).
    assert 0.5 * acc_in.norm() < ef.residual.norm() < acc_in.norm()


def test_decay_one_is_classic_error_feedback_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(1000, generator=g) for _ in range(5)]
    plain, one = ErrorFeedback(get_codec("int4", 64)), ErrorFeedback(get_codec("int4", 64), 1.0)
    for x in xs:
        assert torch.equal(plain.codec.decode(plain.compress(x)), one.codec.decode(one.compress(x)))
    assert torch.equal(plain.residual, one.residual)


def test_decay_changes_only_what_the_residual_carries():
    g = torch.Generator().manual_seed(5)
    codec = get_codec("int8", 64)
    x1, x2 = torch.randn(300, generator=g), torch.randn(300, generator=g)
    ef = ErrorFeedback(codec, decay=0.5)
    ef.compress(x1)
    r1 = ef.residual.clone()
    enc = ef.compress(x2)
    assert torch.equal(codec.decode(enc), codec.decode(codec.encode(x2 + 0.5 * r1)))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_decay_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match="decay must lie in"):
        ErrorFeedback(get_codec("int8", 64), decay=bad)
