"""Baseline codecs: `none` (raw fp32) and `fp16` (half precision, saturating).

They exist so that benchmarks and quality runs can compare int8/int4 against uncompressed
and cheaply compressed rounds through exactly the same code paths (Encoded, wire, shards).
Both use block_size 1 and no scales; bytes are little-endian as produced by torch on every
supported machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.blockwise import check_encoded, dtype_name, flat_tensor
from compression.codec import Encoded

FP16_MAX = torch.finfo(torch.float16).max


def _check_block(name: str, block_size: int) -> None:
    if block_size != 1:
        raise ValueError(f"{name} has no blocks; block_size must be 1, got {block_size!r}")


def _check_finite(flat: torch.Tensor) -> None:
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot encode non-finite values (NaN or Inf)")


@dataclass(frozen=True)
class NoneCodec:
    """fp32 passthrough: 32 bits per element, exact."""

    block_size: int = 1
    name: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        _check_block(self.name, self.block_size)

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = flat_tensor(x)
        _check_finite(flat)
        payload = flat.cpu().clone().view(torch.uint8)  # clone: never alias the caller's tensor
        return Encoded(self.name, tuple(x.shape), dtype_name(x), 1, payload,
                       torch.empty(0, dtype=torch.float32))

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor:
        check_encoded(enc, self.name)
        return enc.payload.view(torch.float32).to(device, copy=True).view(enc.shape)


@dataclass(frozen=True)
class Fp16Codec:
    """fp16: 16 bits per element; values beyond +-65504 saturate instead of becoming inf."""

    block_size: int = 1
    name: ClassVar[str] = "fp16"

    def __post_init__(self) -> None:
        _check_block(self.name, self.block_size)

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = flat_tensor(x)
        _check_finite(flat)
        half = flat.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).cpu()
        return Encoded(self.name, tuple(x.shape), dtype_name(x), 1, half.view(torch.uint8),
                       torch.empty(0, dtype=torch.float32))

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor:
        check_encoded(enc, self.name)
        # fp16 -> fp32 is exact (every half, subnormals included, is a normal float32)
        return enc.payload.view(torch.float16).to(device).float().view(enc.shape)
