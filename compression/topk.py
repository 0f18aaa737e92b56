"""Block-local top-k with 2-bit values (SparseLoCo / DeMo style): `topk` at 0.4375 bits per element.

Each block of `block_size` (<= 256) elements sends its K largest-magnitude entries: K
one-byte positions, then K 2-bit codes packed four to a byte, plus the block's absmax as its
fp32 scale. `topk` (K = 8): 10 + 4 bytes per 256 elements, 73x fewer than fp32. It only makes
sense with error feedback (compression/feedback.py): the dropped entries are not lost, only
delayed -- on the worker. A reducer that re-encodes the mean of M such contributions with K = 8
drops most of it for good (the mean has up to 8M non-zeros per block), so `topk_m32` sends
`topk`'s bytes but its reducers send the mean as `topk32` (K = 32, 1.375 bits per element):
the union of four contributions fits (LAYOUTS[...].reduced_as). `topk_s32` is `topk_m32` with
a mean over the members that sent each coordinate instead of over all of them
(LAYOUTS[...].mean_over_senders, peers.robust.mean_over_senders). `topk_s16` halves both:
K = 4 sent (0.28 bits per element), the mean over senders as `topk16` (K = 16), so it moves
about 1.7x fewer bytes per round than `topk_s32` and buys a shorter H at the same ratio.

Why a fixed number of bytes per block (LAYOUTS["topk"].block_bytes), even for the short last
block: byte ranges stay whole blocks, so Encoded.slice / concat / shard_bounds cut it exactly
like int8, and a slice is byte-identical to encoding the sub-range.

Encoding, and why it is the same on every machine:
- Ties: the K largest of key = (bit pattern of |x|) * 256 + (255 - position) are kept. The
  bits of a non-negative float order like its value, and the position term makes keys unique,
  so the kept set does not depend on how torch.topk breaks ties: equal |x| keep the lowest
  positions. NaN and Inf have larger keys than any finite value, so checking the kept entries
  for finiteness checks the whole block.
- Code: bit 0 is the magnitude (1: the scale, 0: half of it), bit 1 the sign; |x|/scale is
  rounded to the nearer of 1/2 and 1, so a sent entry is within scale/4 of x.
- An entry with |x| < scale/4 would land further from x as +-scale/2 than as 0, so it is not
  sent: its slot repeats the nearest sent slot before it (or the first one after it). The same
  padding fills the slots a block cannot use (fewer than K non-zeros, a last block shorter
  than K), and a block with absmax below TINY sends scale 0 and all-zero bytes. A full block
  therefore has at most K non-zeros, exactly K unless some of its top K are below scale/4.
- Positions go out in ascending order.

Decoding is zeros everywhere, then each slot's code (+-0.5 or +-1) times its block's scale:
one exact IEEE fp32 multiply per kept element, bit-identical everywhere. Scales are 0 or in
[TINY, FLT_MAX], so products are normal floats (or zero) and never overflow.

Untrusted payloads (check_payload, run by wire.unpack and by decode): positions must lie
inside their block (the last block may be short), be non-decreasing, and a repeated position
must repeat its code. Duplicates are then idempotent writes of one value, so the decoded
vector never depends on write order; a conflicting duplicate is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import numpy as np
import torch

from compression.blockwise import CHUNK_ELEMS, check_encoded, dtype_name, flat_fp32
from compression.codec import LAYOUTS, TINY, Encoded

# entries sent per block, by codec name (a multiple of 4: the codes fill whole bytes)
K_OF = {"topk": 8, "topk32": 32, "topk_m32": 8, "topk_s32": 8, "topk16": 16, "topk_s16": 4}
K = K_OF["topk"]
MAX_BLOCK = 256  # a position must fit one byte
_CODE_VALUES = np.array([0.5, 1.0, -0.5, -1.0], dtype=np.float32)  # indexed by the 2-bit code
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)  # slot 4i+j lives in bits 2j..2j+1 of byte i

for _name, _k in K_OF.items():  # codec.py cannot import us (import cycle): check it agrees
    if LAYOUTS[_name].block_bytes != _k + _k // 4:
        raise ImportError(f"LAYOUTS[{_name!r}].block_bytes disagrees with compression/topk.py")


def check_block(block_size: object, name: str = "topk") -> int:
    k = K_OF[name]
    if not isinstance(block_size, int) or not k <= block_size <= MAX_BLOCK:
        raise ValueError(f"{name} block_size must be an int in [{k}, {MAX_BLOCK}], "
                         f"got {block_size!r}")
    return block_size


@cache
def _tiebreak(block: int) -> np.ndarray:
    return (255 - np.arange(block)).astype(np.int64)


def _encode_rows(x_RB: np.ndarray, out_RB: np.ndarray, scales_R: np.ndarray, K: int) -> None:
    """Encode whole blocks (rows) into their payload rows and scales, K entries each."""
    key = (x_RB.view(np.int32) & np.int32(0x7FFFFFFF)).astype(np.int64)
    key <<= 8
    key += _tiebreak(x_RB.shape[1])
    top = torch.topk(torch.from_numpy(key), K, dim=1, sorted=False).indices.numpy()
    top.sort(axis=1)
    v = np.take_along_axis(x_RB, top, axis=1)
    a = np.abs(v)
    scale = a.max(axis=1)  # the block's absmax is always among its top K; NaN propagates
    if not np.isfinite(scale).all():
        raise ValueError("cannot encode non-finite values (NaN or Inf)")
    scale[scale < TINY] = 0.0  # tiny blocks become exact zeros, as in int8
    ratio = np.zeros_like(a)
    np.divide(a, scale[:, None], out=ratio, where=scale[:, None] > 0)
    sent = ratio >= np.float32(0.25)
    code = (v < 0).astype(np.uint8) * np.uint8(2) + (ratio >= np.float32(0.75))
    # Padding: an unsent slot repeats the nearest sent slot before it, or the first after it.
    slot = np.where(sent, np.arange(K), -1)
    np.maximum.accumulate(slot, axis=1, out=slot)
    slot = np.where(slot < 0, sent.argmax(axis=1)[:, None], slot)
    idx = np.take_along_axis(top, slot, axis=1).astype(np.uint8)
    code = np.take_along_axis(code, slot, axis=1)
    empty = scale == 0
    idx[empty] = 0
    code[empty] = 0
    out_RB[:, :K] = idx
    quads = code.reshape(-1, K // 4, 4) << _SHIFTS
    out_RB[:, K:] = quads[..., 0] | quads[..., 1] | quads[..., 2] | quads[..., 3]
    scales_R[:] = scale


def check_payload(payload: np.ndarray, numel: int, block_size: int, name: str = "topk"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Validate a topk payload (1-D uint8, right length); returns (positions, codes), each
    [n_blocks, K]. Raises ValueError on a position outside its block, positions out of order,
    or a repeated position with a different code."""
    K = K_OF[name]
    nb = -(-numel // block_size)
    rows = payload.reshape(nb, K + K // 4)
    idx = rows[:, :K]
    code = ((rows[:, K:, None] >> _SHIFTS) & np.uint8(3)).reshape(nb, K)
    if nb:
        last = numel - (nb - 1) * block_size
        if int(idx.max()) >= block_size or int(idx[-1].max()) >= last:
            raise ValueError("topk position outside its block")
        step = np.diff(idx.astype(np.int16), axis=1)
        if (step < 0).any():
            raise ValueError("topk positions not in ascending order")
        if ((step == 0) & (code[:, 1:] != code[:, :-1])).any():
            raise ValueError("topk position repeated with a different code")
    return idx, code


@dataclass(frozen=True)
class TopkCodec:
    """K = 8 largest |x| per block, each within absmax/4; (8 + 2 + 4) bytes per block."""

    block_size: int = 256
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        check_block(self.block_size, self.name)

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = flat_fp32(x)
        b = self.block_size
        nfull, tail = divmod(flat.size, b)
        nb = nfull + (tail > 0)
        k = K_OF[self.name]
        payload = np.empty((nb, k + k // 4), dtype=np.uint8)
        scales = np.empty(nb, dtype=np.float32)
        main = flat[: nfull * b].reshape(nfull, b)
        rows = max(1, CHUNK_ELEMS // b)  # bounds the int64 keys to 8 MB at a time
        for r0 in range(0, nfull, rows):
            r1 = min(nfull, r0 + rows)
            _encode_rows(main[r0:r1], payload[r0:r1], scales[r0:r1], k)
        if tail:
            # Zero padding sorts after every real element (zeros tie, lower positions win)
            # and is never sent, so the last block matches encoding just these elements.
            padded = np.zeros((1, b), dtype=np.float32)
            padded[0, :tail] = flat[nfull * b :]
            _encode_rows(padded, payload[nfull:], scales[nfull:], k)
        return Encoded(self.name, tuple(x.shape), dtype_name(x), b,
                       torch.from_numpy(payload.reshape(-1)), torch.from_numpy(scales))

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor:
        check_encoded(enc, self.name)
        b = check_block(enc.block_size, self.name)
        n = enc.numel
        idx, code = check_payload(enc.payload.numpy(), n, b, self.name)
        nb = idx.shape[0]
        vals = _CODE_VALUES[code] * enc.scales.numpy()[:, None]  # the one multiply
        out = np.zeros(nb * b, dtype=np.float32)
        pos = idx + (np.arange(nb, dtype=np.int64) * b)[:, None]
        out[pos.reshape(-1)] = vals.reshape(-1)
        return torch.from_numpy(out[:n]).view(enc.shape).to(device)


@dataclass(frozen=True)
class Topk32Codec(TopkCodec):
    """K = 32 per block: (32 + 8 + 4) bytes per 256 elements, 1.375 bits per element."""

    name: ClassVar[str] = "topk32"


@dataclass(frozen=True)
class TopkM32Codec(TopkCodec):
    """`topk`'s encoding under its own name, so that rounds encode its mean as `topk32`."""

    name: ClassVar[str] = "topk_m32"


@dataclass(frozen=True)
class TopkS32Codec(TopkCodec):
    """`topk_m32` whose reducers average each coordinate over the members that sent it
    (Layout.mean_over_senders), so a coordinate one member sent is not diluted by M."""

    name: ClassVar[str] = "topk_s32"


@dataclass(frozen=True)
class Topk16Codec(TopkCodec):
    """K = 16 per block: (16 + 4 + 4) bytes per 256 elements, 0.75 bits per element."""

    name: ClassVar[str] = "topk16"


@dataclass(frozen=True)
class TopkS16Codec(TopkCodec):
    """K = 4 per block, (4 + 1 + 4) bytes per 256 elements; reducers average each coordinate
    over its senders and send the mean as `topk16` (four members' K = 4 fit its K = 16)."""

    name: ClassVar[str] = "topk_s16"
