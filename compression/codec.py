"""The codec interface: what an encoding is, how codecs are found, how encodings are cut up.

An `Encoded` is the unit that crosses the network: a flat uint8 payload plus one fp32 scale per
block. Rounds cut the flat pseudo-gradient into shards (`shard_bounds`), send `Encoded.slice`s
to reducers and glue the reduced shards back together (`concat`); slicing at block boundaries
is exact, so a slice is byte-identical to encoding the sub-range directly.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class Layout:
    """How a codec lays elements out in bytes; shared by slicing, concat and wire validation."""

    bits: int  # payload bits per element (int4 packs two elements per byte); 0: see block_bytes
    scaled: bool  # one fp32 scale per block_size elements
    code_max: float  # largest |code| a payload element decodes to before scaling (caps scales)
    # Smallest non-zero scale: with it, every non-zero product code*scale is a normal float,
    # so decoding never meets denormals (whose flush-to-zero handling differs by machine).
    min_scale: float
    # Sparse codecs (topk) spend a fixed number of payload bytes on every block, the short
    # last block included, instead of `bits` per element: byte ranges stay whole blocks, so
    # slicing at block boundaries is as exact as it is for int8. 0: the payload is per element.
    block_bytes: int = 0
    # The codec a reducer encodes the mean with ("": this one). The mean of M sparse
    # contributions has up to M times their non-zeros; re-encoding it sparse again drops
    # most of it, and no error-feedback buffer gets that back.
    reduced_as: str = ""
    # Reducers divide each coordinate of the mean by the weight fraction of the members
    # whose contribution is non-zero there (peers.robust.mean_over_senders): a sparse
    # contribution's zeros mean "not sent", not "zero", and averaging them in dilutes it.
    mean_over_senders: bool = False

    def payload_range(self, start: int, end: int, block_size: int) -> tuple[int, int]:
        """The payload bytes [lo, hi) that hold elements [start, end) (start block-aligned)."""
        if self.block_bytes:
            return (start // block_size * self.block_bytes,
                    -(-end // block_size) * self.block_bytes)
        return start * self.bits // 8, (end * self.bits + 7) // 8


# Blocks whose absmax is below this encode as exact zeros (absolute error < 1e-30, far below
# any fp32 parameter update); it keeps scales and their reciprocals normal, finite floats.
TINY = 2.0**-100

LAYOUTS: dict[str, Layout] = {
    # byte 0x80 (-128) is never produced but is legal on the wire, hence code_max 128
    "int8": Layout(bits=8, scaled=True, code_max=128.0, min_scale=2.0**-110),
    "int4": Layout(bits=4, scaled=True, code_max=8.0, min_scale=2.0**-110),  # nibble 0 -> -8
    # bitsandbytes' dynamic map lies in [-1, 1]; its smallest non-zero |code| is ~5.5e-7
    "bnb8": Layout(bits=8, scaled=True, code_max=1.0, min_scale=TINY),
    # K one-byte positions + K two-bit codes per block (compression/topk.py): K = 4, 8, 16, 32;
    # topk_m32 and topk_s32 send topk's bytes, and their reducers send the mean as topk32.
    "topk": Layout(bits=0, scaled=True, code_max=1.0, min_scale=TINY, block_bytes=10),
    "topk32": Layout(bits=0, scaled=True, code_max=1.0, min_scale=TINY, block_bytes=40),
    "topk_m32": Layout(bits=0, scaled=True, code_max=1.0, min_scale=TINY, block_bytes=10,
                       reduced_as="topk32"),
    # topk_m32's bytes, but each coordinate is averaged over the members that sent it
    "topk_s32": Layout(bits=0, scaled=True, code_max=1.0, min_scale=TINY, block_bytes=10,
                       reduced_as="topk32", mean_over_senders=True),
    # half of everything: K = 4 sent, the mean over senders as topk16 (4 members' union fits)
    "topk16": Layout(bits=0, scaled=True, code_max=1.0, min_scale=TINY, block_bytes=20),
    "topk_s16": Layout(bits=0, scaled=True, code_max=1.0, min_scale=TINY, block_bytes=5,
                       reduced_as="topk16", mean_over_senders=True),
    "fp16": Layout(bits=16, scaled=False, code_max=0.0, min_scale=0.0),
    "none": Layout(bits=32, scaled=False, code_max=0.0, min_scale=0.0),
}

# name -> (module, class); imported on first use so that a broken optional backend
# (bitsandbytes) can never break the other codecs, and codec.py has no import cycle.
_REGISTRY: dict[str, tuple[str, str]] = {
    "int8": ("compression.int8", "Int8Codec"),
    "int4": ("compression.int4", "Int4Codec"),
    "bnb8": ("compression.bnb", "Bnb8Codec"),
    "topk": ("compression.topk", "TopkCodec"),
    "topk32": ("compression.topk", "Topk32Codec"),
    "topk_m32": ("compression.topk", "TopkM32Codec"),
    "topk_s32": ("compression.topk", "TopkS32Codec"),
    "topk16": ("compression.topk", "Topk16Codec"),
    "topk_s16": ("compression.topk", "TopkS16Codec"),
    "fp16": ("compression.passthrough", "Fp16Codec"),
    "none": ("compression.passthrough", "NoneCodec"),
}


def payload_nbytes(codec: str, numel: int, block_size: int) -> int:
    return LAYOUTS[codec].payload_range(0, numel, block_size)[1]


def n_scales(codec: str, numel: int, block_size: int) -> int:
    return -(-numel // block_size) if LAYOUTS[codec].scaled else 0


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True, eq=False)
class Encoded:
    """One encoded tensor. Constructed only in a self-consistent state (checked here)."""

    codec: str
    shape: tuple[int, ...]
    dtype: str
    block_size: int
    payload: torch.Tensor  # 1-D contiguous CPU uint8
    scales: torch.Tensor  # 1-D contiguous CPU float32; empty for unscaled codecs

    def __post_init__(self) -> None:
        if self.codec not in LAYOUTS:
            raise ValueError(f"unknown codec {self.codec!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        p, s = self.payload, self.scales
        if p.dtype != torch.uint8 or p.dim() != 1 or not p.is_contiguous():
            raise ValueError("payload must be a 1-D contiguous uint8 tensor")
        if s.dtype != torch.float32 or s.dim() != 1 or not s.is_contiguous():
            raise ValueError("scales must be a 1-D contiguous float32 tensor")
        n = self.numel
        want = payload_nbytes(self.codec, n, self.block_size)
        if p.numel() != want:
            raise ValueError(f"payload has {p.numel()} bytes, {self.codec} of {n} needs {want}")
        if s.numel() != n_scales(self.codec, n, self.block_size):
            raise ValueError(f"scales has {s.numel()} entries, expected "
                             f"{n_scales(self.codec, n, self.block_size)}")

    @property
    def numel(self) -> int:
        return numel_of(self.shape)

    @property
    def nbytes(self) -> int:
        return self.payload.numel() + 4 * self.scales.numel()

    @property
    def align(self) -> int:
        """Slice boundaries must be multiples of this (a block, and a whole byte for int4;
        block_bytes codecs are whole bytes per block)."""
        return math.lcm(self.block_size, 2) if LAYOUTS[self.codec].bits == 4 else self.block_size

    def slice(self, start: int, end: int) -> Encoded:
        """Flat elements [start, end) as a 1-D encoding, identical to encoding x[start:end]."""
        n = self.numel
        if not 0 <= start <= end <= n:
            raise ValueError(f"slice [{start}, {end}) out of range for {n} elements")
        a = self.align
        # start == n happens for trailing empty shards (shard_bounds clamps them to numel)
        if (start % a and start != n) or (end % a and end != n):
            raise ValueError(f"slice [{start}, {end}) not aligned to {a} elements")
        if start == end:
            start = end = 0  # an empty range holds no bytes (and no partial block)
        lo, hi = LAYOUTS[self.codec].payload_range(start, end, self.block_size)
        payload = self.payload[lo:hi]
        if LAYOUTS[self.codec].scaled:
            scales = self.scales[start // self.block_size : -(-end // self.block_size)]
        else:
            scales = self.scales
        return Encoded(self.codec, (end - start,), self.dtype, self.block_size, payload, scales)


@runtime_checkable
class Codec(Protocol):
    name: str
    block_size: int

    def encode(self, x: torch.Tensor) -> Encoded: ...

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor: ...


def codec_names() -> list[str]:
    return list(_REGISTRY)


def reduced_name(name: str) -> str:
    """The codec a reducer encodes the mean of `name`-encoded contributions with."""
    return LAYOUTS[name].reduced_as or name


def get_codec(name: str, block_size: int | None = None) -> Codec:
    """A codec by registry name; block_size None means the codec's measured default."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(_REGISTRY)}")
    module, attr = _REGISTRY[name]
    cls = getattr(importlib.import_module(module), attr)
    return cls() if block_size is None else cls(block_size=block_size)


def shard_bounds(numel: int, align: int, n_shards: int) -> list[tuple[int, int]]:
    """n_shards contiguous [start, end) ranges covering 0..numel, starts aligned to `align`.

    Whole aligned units are dealt out as evenly as possible (the first shards get one extra
    unit), so shards differ by at most `align` elements; with fewer units than shards the
    trailing shards are empty, [numel, numel).
    """
    if numel < 0 or align < 1 or n_shards < 1:
        raise ValueError(f"bad shard_bounds({numel}, {align}, {n_shards})")
    units = -(-numel // align)
    base, extra = divmod(units, n_shards)
    bounds, unit = [], 0
    for i in range(n_shards):
        nxt = unit + base + (1 if i < extra else 0)
        bounds.append((min(unit * align, numel), min(nxt * align, numel)))
        unit = nxt
    return bounds


def concat(encs: list[Encoded]) -> Encoded:
    """Inverse of slicing consecutive 1-D ranges: glue shards back into one flat encoding."""
    if not encs:
        raise ValueError("concat of no encodings")
    first = encs[0]
    for e in encs:
        if (e.codec, e.dtype, e.block_size) != (first.codec, first.dtype, first.block_size):
            raise ValueError("concat needs encodings with one codec, dtype and block_size")
    parts = [e for e in encs if e.numel > 0]
    for e in parts[:-1]:
        if e.numel % e.align:
            raise ValueError(f"non-final part has {e.numel} elements, not a multiple of {e.align}")
    total = sum(e.numel for e in parts)
    payload = torch.cat([e.payload for e in encs])
    scales = torch.cat([e.scales for e in encs])
    return Encoded(first.codec, (total,), first.dtype, first.block_size, payload, scales)
