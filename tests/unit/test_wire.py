"""Wire format: exact round trips, and hostile input only ever raises WireError."""

from __future__ import annotations

import math
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression.codec import Encoded, codec_names, get_codec
from compression.wire import WireError, WireLimits, pack, pack_message, unpack, unpack_message

# every registered codec; test_codec pins the registry against its own explicit list
ALL = codec_names()


def frame_of(name: str = "int8", n: int = 1000, **override) -> bytes:
    codec = get_codec(name, 64 if name in ("int8", "int4") else None)
    d = msgpack.unpackb(pack(codec.encode(torch.randn(n))))
    d.update(override)
    return msgpack.packb(d, use_bin_type=True)


def rejects(data: object, match: str | None = None, **kw) -> None:
    with pytest.raises(WireError, match=match):
        unpack(data, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL)
def test_round_trip_is_exact(name):
    codec = get_codec(name)
    for shape in [(0,), (1,), (3, 333), (5, 0), (4097,)]:
        enc = codec.encode(torch.randn(shape))
        back = unpack(pack(enc))
        assert (back.codec, back.shape, back.dtype, back.block_size) == (
            enc.codec, enc.shape, enc.dtype, enc.block_size)
        assert torch.equal(back.payload, enc.payload) and torch.equal(back.scales, enc.scales)
        a, b = codec.decode(enc), codec.decode(back)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    # slices (views into a larger payload) pack to exactly what encoding the range gives
    x = torch.randn(10_000)
    assert pack(codec.encode(x).slice(4096, 10_000)) == pack(codec.encode(x[4096:]))


def test_frame_overhead_is_small():
    enc = get_codec("int8").encode(torch.randn(1 << 16))
    assert len(pack(enc)) - enc.nbytes < 100


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"v": 2}, "version"),
        ({"v": True}, "version"),
        ({"codec": "int3"}, "codec"),
        ({"codec": 5}, "codec"),
        ({"dtype": "float64"}, "dtype"),
        ({"shape": [1 << 30]}, "elements"),  # a 1 G-element claim with a 1 KB payload
        ({"shape": [1 << 20, 1 << 20]}, "elements"),
        ({"shape": [-1]}, "dimension"),
        ({"shape": [1.5]}, "dimension"),
        ({"shape": "1000"}, "shape"),
        ({"shape": [999]}, "payload"),
        ({"shape": [1001]}, "payload"),
        ({"block": 32}, "scales"),
        ({"block": 1}, "block"),
        ({"block": "64"}, "block"),
        ({"payload": "x" * 1000}, "bin"),
        ({"scales": b"\x00" * 60}, "scales"),
        ({"extra": 1}, "keys"),
    ],
)
def test_lying_fields_are_rejected(override, match):
    rejects(frame_of(**override), match)


def test_missing_key_and_non_map():
    d = msgpack.unpackb(frame_of())
    del d["scales"]
    rejects(msgpack.packb(d), "keys")
    rejects(msgpack.packb([1, 2, 3]), "map")
    rejects("not bytes", "bytes")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1e-40, 3.3e38, 2.0**-120])
def test_unsafe_scales_are_rejected(bad):
    d = msgpack.unpackb(frame_of("int8", 1000))
    s = np.frombuffer(d["scales"], dtype="<f4").copy()
    s[3] = bad
    d["scales"] = s.tobytes()
    rejects(msgpack.packb(d), "scale")


def test_passthrough_non_finite_payload_rejected():
    for name, dt in [("none", "<f4"), ("fp16", "<f2")]:
        d = msgpack.unpackb(frame_of(name, 10))
        p = np.frombuffer(d["payload"], dtype=dt).copy()
        p[2] = np.inf
        d["payload"] = p.tobytes()
        rejects(msgpack.packb(d), "NaN or Inf")


def test_limits_are_enforced():
    data = frame_of("int8", 1000)
    rejects(data, "exceeds", limits=WireLimits(max_frame_bytes=len(data) - 1))
    rejects(data, "elements", limits=WireLimits(max_elements=999))
    rejects(data, "codec", limits=WireLimits(codecs=("int4",)))
    rejects(frame_of("int8", 1000, shape=[1] * 9), "max_array_len")


def test_huge_length_claims_fail_fast_with_bounded_memory():
    # bin32 header claiming 1 GiB, array32/map32 headers claiming 4 G entries, all truncated
    claims = [b"\xc6\x40\x00\x00\x00" + b"x" * 100, b"\xdd\xff\xff\xff\xff\x00",
              b"\xdf\xff\xff\xff\xff\xa1a\x00",
              b"\x87\xa1v\x01\xa7payload\xc6\x40\x00\x00\x00abc"]
    tracemalloc.start()
    for data in claims:
        rejects(data)
        with pytest.raises(WireError):
            unpack_message(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_ext_types_and_deep_nesting_rejected():
    for data in [msgpack.packb(msgpack.ExtType(1, b"abc")),
                 msgpack.packb({"v": msgpack.Timestamp(1, 0)}, use_bin_type=True),
                 b"\x91" * 100_000 + b"\xc0",  # 100k nested arrays
                 b"\x81\xa1a" * 50_000 + b"\xc0"]:  # 50k nested maps
        rejects(data)
        with pytest.raises(WireError):
            unpack_message(data)


def test_decoded_values_are_always_finite_for_accepted_frames():
    # worst case allowed on the wire: largest legal scales and every byte value (0x80 too)
    for name, cap in [("int8", 3.4028234e38 / 128), ("int4", 3.4028234e38 / 8)]:
        d = msgpack.unpackb(frame_of(name, 512))
        d["payload"] = bytes(range(256)) * (len(d["payload"]) // 256)
        d["scales"] = np.full(8, cap, dtype="<f4").tobytes()
        enc = unpack(msgpack.packb(d))
        assert bool(torch.isfinite(get_codec(name).decode(enc)).all())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_wire_error(data):
    for fn in (unpack, unpack_message):
        try:
            fn(data)
        except WireError:
            pass


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(ALL), cut=st.floats(0, 1), flip=st.integers(0, 10**6),
       byte=st.integers(0, 255))
def test_truncated_and_corrupted_frames_only_wire_error(name, cut, flip, byte):
    data = frame_of(name, 300)
    with pytest.raises(WireError):
        unpack(data[: int(cut * (len(data) - 1))])
    corrupted = bytearray(data)
    corrupted[flip % len(data)] = byte
    try:
        enc = unpack(bytes(corrupted))
    except WireError:
        return
    y = get_codec(enc.codec, enc.block_size).decode(enc)  # accepted => decodes, finite
    assert bool(torch.isfinite(y).all())


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8)
    | st.binary(max_size=8) | st.floats(allow_nan=False),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids,
                                                               max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(["v", "codec", "shape", "dtype", "block", "scales", "payload"]),
       value=_values)
def test_any_field_value_only_wire_error(key, value):
    try:
        unpack(frame_of("int4", 100, **{key: value}))
    except WireError:
        pass


@settings(max_examples=60, deadline=None)
@given(msg=st.dictionaries(st.text(max_size=6), _values, max_size=5))
def test_message_round_trip(msg):
    assert unpack_message(pack_message(msg), max_depth=16) == msg


def test_message_limits_and_types():
    deep: dict = {"a": 1}
    for _ in range(10):
        deep = {"d": deep}
    data = pack_message(deep)
    with pytest.raises(WireError, match="deeper"):
        unpack_message(data, max_depth=8)
    assert unpack_message(data, max_depth=11) == deep
    with pytest.raises(WireError, match="exceeds"):
        unpack_message(pack_message({"b": b"x" * 2000}), max_bytes=1000)
    with pytest.raises(WireError, match="map"):
        unpack_message(msgpack.packb([1]))
    with pytest.raises(WireError, match="keys"):
        unpack_message(msgpack.packb({b"k": 1}))
    for bad in [{"x": object()}, {1: 2}, [1], {"x": 2**70}, {"x": torch.zeros(1)}]:
        with pytest.raises(WireError):
            pack_message(bad)  # type: ignore[arg-type]
    assert unpack_message(pack_message({"f": math.inf}))["f"] == math.inf


def test_encoded_rejects_inconsistent_construction():
    with pytest.raises(ValueError):
        Encoded("int4", (3,), "float32", 64, torch.zeros(1, dtype=torch.uint8), torch.zeros(1))
