"""bitsandbytes' dynamic blockwise 8-bit quantisation as a codec (`bnb8`).

It is both an alternative to `int8` and the yardstick the issue measures us against. The
dynamic code table is a fixed function of the bitsandbytes version (create_dynamic_map), so
only the per-block absmax goes over the wire, exactly like our fp32 scales.

bitsandbytes is imported lazily, inside the methods: a missing or broken install must only
disable this codec, never the others (codec.py imports codec modules on demand).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import torch

from compression.blockwise import check_encoded, dtype_name, flat_tensor
from compression.codec import TINY, Encoded

BNB_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # what quantize_blockwise accepts


@cache
def _functional():  # noqa: ANN202 - returns the bitsandbytes.functional module
    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:  # ImportError, or a broken native library raising anything
        raise RuntimeError(f"codec 'bnb8' needs a working bitsandbytes: {e}") from e
    return bnbf


@cache
def _code(device: torch.device) -> torch.Tensor:
    return _functional().create_dynamic_map(signed=True).to(device)


@dataclass(frozen=True)
class Bnb8Codec:
    """Dynamic 8-bit (bitsandbytes) with one fp32 absmax per block: 8 + 32/block_size bits."""

    block_size: int = 4096  # bitsandbytes' and hivemind's default; 8.008 bits per element
    name: ClassVar[str] = "bnb8"

    def __post_init__(self) -> None:
        if self.block_size not in BNB_BLOCK_SIZES:
            raise ValueError(f"bnb8 block_size must be one of {BNB_BLOCK_SIZES}, "
                             f"got {self.block_size!r}")

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = flat_tensor(x)
        if flat.numel() == 0:
            empty = torch.empty(0, dtype=torch.uint8)
            return Encoded(self.name, tuple(x.shape), dtype_name(x), self.block_size,
                           empty, torch.empty(0, dtype=torch.float32))
        # bitsandbytes skips NaN when taking absmax, so check explicitly: a NaN must never
        # leave this peer disguised as a finite number.
        if bool(torch.isnan(flat).any()):
            raise ValueError("cannot encode non-finite values (NaN or Inf)")
        q, state = _functional().quantize_blockwise(
            flat, code=_code(flat.device), blocksize=self.block_size
        )
        absmax = state.absmax.float()
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError("cannot encode non-finite values (NaN or Inf)")
        # Same rule as int8: tiny blocks decode to exact zeros so that no product is denormal.
        absmax = absmax.masked_fill(absmax < TINY, 0.0)
        return Encoded(self.name, tuple(x.shape), dtype_name(x), self.block_size,
                       q.reshape(-1).cpu(), absmax.cpu().contiguous())

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor:
        check_encoded(enc, self.name)
        if enc.block_size not in BNB_BLOCK_SIZES:
            raise ValueError(f"bnb8 block_size {enc.block_size} not supported by bitsandbytes")
        device = torch.device(device)
        if enc.numel == 0:
            return torch.empty(enc.shape, dtype=torch.float32, device=device)
        out = _functional().dequantize_blockwise(
            enc.payload.to(device),
            absmax=enc.scales.to(device),
            code=_code(device),
            blocksize=enc.block_size,
        )
        return out.float().view(enc.shape)
