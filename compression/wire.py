"""The wire format: msgpack frames for `Encoded` tensors and for small control messages.

Everything arriving here came from an untrusted peer. `unpack` therefore checks the frame
size before parsing, parses with msgpack limits (no ext types, bounded lengths and nesting),
checks every field, and checks that payload and scale lengths are exactly what the declared
shape, codec and block size need *before* any tensor is allocated. Scales must be finite and
inside the range that keeps decoding finite and free of denormals; float payloads must be
finite and topk positions must be valid (compression/topk.py). Any problem raises `WireError`
(a ValueError) saying what was wrong; nothing here ever unpickles.

Frame (version 1): {"v": 1, "codec": str, "shape": [int], "dtype": str, "block": int,
"scales": bin (little-endian fp32), "payload": bin}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack
import numpy as np
import torch

from compression import topk
from compression.bnb import BNB_BLOCK_SIZES
from compression.codec import (
    FLOAT_DTYPES,
    LAYOUTS,
    Encoded,
    n_scales,
    payload_nbytes,
)

VERSION = 1
_FRAME_KEYS = frozenset({"v", "codec", "shape", "dtype", "block", "scales", "payload"})
_FLT_MAX = float(np.finfo(np.float32).max)


class WireError(ValueError):
    """Malformed, oversized or unsafe network data; the message says what was wrong."""


@dataclass(frozen=True)
class WireLimits:
    max_frame_bytes: int = 256 << 20
    max_elements: int = 1 << 28
    max_ndim: int = 8
    max_block_size: int = 1 << 20
    codecs: tuple[str, ...] = tuple(LAYOUTS)
    dtypes: tuple[str, ...] = tuple(FLOAT_DTYPES)


def _fail(msg: str) -> NoReturn:
    raise WireError(msg)


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise WireError(f"msgpack ext type {code} is not allowed")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _loads(data: object, max_bytes: int, max_len: int) -> Any:
    """Bounded msgpack parse: every container/str/bin length is capped before allocation."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        _fail(f"expected bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        _fail(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
            max_str_len=size, max_bin_len=size, max_array_len=max_len, max_map_len=max_len,
            max_ext_len=0,  # also rejects msgpack's built-in Timestamp extension
        )
    except WireError:
        raise
    except msgpack.StackError:
        _fail("msgpack nesting too deep")
    except msgpack.ExtraData:
        _fail("trailing bytes after the msgpack object")
    except msgpack.FormatError:
        _fail("not valid msgpack (reserved type byte)")
    except Exception as e:  # msgpack raises several unrelated types (ValueError, UnicodeError..)
        _fail(f"invalid msgpack frame: {type(e).__name__}: {e}")


def pack(enc: Encoded) -> bytes:
    """Serialise an Encoded (scales as little-endian fp32, payload as raw bytes)."""
    frame = {
        "v": VERSION,
        "codec": enc.codec,
        "shape": list(enc.shape),
        "dtype": enc.dtype,
        "block": enc.block_size,
        "scales": enc.scales.numpy().astype("<f4", copy=False).tobytes(),
        "payload": memoryview(enc.payload.numpy()),  # msgpack copies it once into the frame
    }
    return msgpack.packb(frame, use_bin_type=True)


def unpack(data: bytes, limits: WireLimits = WireLimits()) -> Encoded:
    """Parse and fully validate one frame; raises only WireError."""
    # A frame holds one small map and a shape list: tiny container limits stop length bombs.
    frame = _loads(data, limits.max_frame_bytes, max_len=max(len(_FRAME_KEYS), limits.max_ndim))
    if not isinstance(frame, dict):
        _fail(f"frame must be a map, got {type(frame).__name__}")
    if set(frame) != _FRAME_KEYS:
        _fail(f"frame keys {sorted(map(str, frame))} != {sorted(_FRAME_KEYS)}")
    version = frame["v"]
    if not _is_int(version) or version != VERSION:
        _fail(f"unsupported frame version {version!r} (this peer speaks {VERSION})")
    codec = frame["codec"]
    if not isinstance(codec, str) or codec not in limits.codecs:
        _fail(f"codec {codec!r} not allowed; allowed: {list(limits.codecs)}")
    dtype = frame["dtype"]
    if not isinstance(dtype, str) or dtype not in limits.dtypes:
        _fail(f"dtype {dtype!r} not allowed; allowed: {list(limits.dtypes)}")
    shape = _check_shape(frame["shape"], limits)
    numel = 1
    for d in shape:
        numel *= d
    if numel > limits.max_elements:
        _fail(f"shape {shape} has {numel} elements, limit is {limits.max_elements}")
    block = _check_block(codec, frame["block"], limits)
    payload_b, scales_b = frame["payload"], frame["scales"]
    if not isinstance(payload_b, bytes) or not isinstance(scales_b, bytes):
        _fail("payload and scales must be msgpack bin")
    want_p, want_s = payload_nbytes(codec, numel, block), 4 * n_scales(codec, numel, block)
    if len(payload_b) != want_p:
        _fail(f"payload has {len(payload_b)} bytes; {codec} of shape {shape} needs {want_p}")
    if len(scales_b) != want_s:
        _fail(f"scales have {len(scales_b)} bytes; {codec} of shape {shape} with block "
              f"{block} needs {want_s}")
    # Lengths are now exact and bounded by the frame size: allocating is safe.
    scales = _check_scales(codec, np.frombuffer(scales_b, dtype="<f4"))
    _check_payload(codec, payload_b, numel, block)
    payload = torch.frombuffer(bytearray(payload_b), dtype=torch.uint8) if want_p else (
        torch.empty(0, dtype=torch.uint8))
    try:
        return Encoded(codec, shape, dtype, block, payload, scales)
    except ValueError as e:  # defensive: the checks above should make this unreachable
        _fail(f"inconsistent frame: {e}")


def _check_shape(shape: object, limits: WireLimits) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        _fail(f"shape must be a list of at most {limits.max_ndim} ints, got {shape!r}")
    for d in shape:
        if not _is_int(d) or not 0 <= d <= limits.max_elements:
            _fail(f"bad dimension {d!r} in shape (need an int in [0, max_elements="
                  f"{limits.max_elements}])")
    return tuple(shape)


def _check_block(codec: str, block: object, limits: WireLimits) -> int:
    if not _is_int(block):
        _fail(f"block size must be an int, got {block!r}")
    if not LAYOUTS[codec].scaled:
        if block != 1:
            _fail(f"{codec} has no blocks; block size must be 1, got {block}")
    elif not 2 <= block <= limits.max_block_size:
        _fail(f"block size {block} outside [2, {limits.max_block_size}]")
    elif codec == "int4" and block % 2:
        _fail(f"int4 block size must be even, got {block}")
    elif codec == "bnb8" and block not in BNB_BLOCK_SIZES:
        _fail(f"bnb8 block size must be one of {BNB_BLOCK_SIZES}, got {block}")
    elif codec in topk.K_OF and not topk.K_OF[codec] <= block <= topk.MAX_BLOCK:
        _fail(f"{codec} block size must lie in [{topk.K_OF[codec]}, {topk.MAX_BLOCK}], "
              f"got {block}")
    return block


def _check_scales(codec: str, s: np.ndarray) -> torch.Tensor:
    lay = LAYOUTS[codec]
    if s.size:
        if not np.isfinite(s).all():
            _fail("scales contain NaN or Inf")
        ok = (s == 0) | ((s >= lay.min_scale) & (s <= _FLT_MAX / lay.code_max))
        if not ok.all():
            bad = float(s[~ok][0])
            _fail(f"scale {bad!r} outside {{0}} U [{lay.min_scale!r}, "
                  f"{_FLT_MAX / lay.code_max!r}] for {codec}")
    return torch.from_numpy(s.astype(np.float32))  # copy: native order, writable


def _check_payload(codec: str, payload_b: bytes, numel: int, block: int) -> None:
    # Passthrough codecs carry floats directly; NaN/Inf there would poison the average.
    if codec in ("none", "fp16"):
        vals = np.frombuffer(payload_b, dtype="<f4" if codec == "none" else "<f2")
        if not np.isfinite(vals).all():
            _fail(f"{codec} payload contains NaN or Inf")
    # topk positions must stay inside their blocks and decode the same in any write order.
    elif codec in topk.K_OF:
        try:
            topk.check_payload(np.frombuffer(payload_b, dtype=np.uint8), numel, block, codec)
        except ValueError as e:
            _fail(str(e))


# ---- generic control messages (used by peers/) -------------------------------------------

_SCALARS = (bytes, str, int, float, bool, type(None))


def _check_tree(obj: object, depth: int, max_depth: int) -> None:
    if isinstance(obj, _SCALARS):
        return
    if depth >= max_depth:
        _fail(f"message nested deeper than {max_depth} levels")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                _fail(f"message map keys must be str, got {type(k).__name__}")
            _check_tree(v, depth + 1, max_depth)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_tree(v, depth + 1, max_depth)
    else:
        _fail(f"message value of type {type(obj).__name__} is not allowed")


def pack_message(obj: dict, max_depth: int = 32) -> bytes:
    """Serialise a map of plain values (str keys; bytes/int/float/str/bool/None/list/dict)."""
    if not isinstance(obj, dict):
        _fail(f"message must be a dict, got {type(obj).__name__}")
    _check_tree(obj, 0, max_depth)
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except Exception as e:  # e.g. ints beyond 64 bits
        _fail(f"cannot pack message: {type(e).__name__}: {e}")


def unpack_message(data: bytes, max_bytes: int = 1 << 20, max_depth: int = 8) -> dict:
    """Parse a control message with bounded size and depth; raises only WireError."""
    size = memoryview(data).nbytes if isinstance(data, (bytes, bytearray, memoryview)) else 0
    # Every element costs at least one byte, so lengths above the frame size are lies.
    obj = _loads(data, max_bytes, max_len=max(size, 1))
    if not isinstance(obj, dict):
        _fail(f"message must be a map, got {type(obj).__name__}")
    _check_tree(obj, 0, max_depth)
    return obj
