"""Blockwise absmax int4: the int8 scheme with codes in [-7, 7], two per byte.

With error feedback this is the low-bandwidth path (4 + 32/block_size bits per element), so
it shares the int8 core (same rounding, same scale rules, same determinism argument) and only
differs in how codes are stored: element 2i goes in the low nibble and 2i+1 in the high
nibble of byte i, each as the unsigned value q + 8 (so nibble 8 is zero; nibble 0, never
produced by the encoder, decodes to -8, which the scale cap in LAYOUTS accounts for).
A byte order independent formula is used (no int16 reinterpretation), so every machine
produces and reads the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.codec import LAYOUTS, Encoded
from compression.int8 import (
    absmax_dequantize,
    absmax_quantize,
    check_block_size,
    check_encoded,
    dtype_name,
    flat_fp32,
)


@dataclass(frozen=True)
class Int4Codec:
    """Blockwise absmax int4: |x - x_hat| <= absmax/14 per block."""

    block_size: int = 256
    name: ClassVar[str] = "int4"
    qmax: ClassVar[int] = 7

    def __post_init__(self) -> None:
        # Even blocks keep every block starting on a byte boundary, so slices stay exact.
        check_block_size(self.name, self.block_size, even=True)

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = flat_fp32(x)
        n = flat.numel()
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)

        def store(codes_RB: torch.Tensor, first: int, n_valid: int) -> None:
            # (q0 + 8) + 16 * (q1 + 8), computed in fp32 on values already in cache; the
            # result is an exact integer in [17, 255], so the uint8 conversion is exact.
            pair = torch.add(codes_RB[:, 0::2], codes_RB[:, 1::2], alpha=16).add_(136)
            nb = (n_valid + 1) // 2
            packed[first // 2 : first // 2 + nb].copy_(pair.view(-1)[:nb])

        scales = absmax_quantize(
            flat, self.block_size, self.qmax, LAYOUTS[self.name].code_max, store
        )
        return Encoded(self.name, tuple(x.shape), dtype_name(x), self.block_size,
                       packed.cpu(), scales.cpu())

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor:
        check_encoded(enc, self.name)
        if enc.block_size % 2:
            raise ValueError(f"int4 block_size must be even, got {enc.block_size}")
        device = torch.device(device)
        p = enc.payload.to(device)

        def load(out_RB: torch.Tensor, first: int, n_valid: int) -> None:
            nb = (n_valid + 1) // 2
            src = p[first // 2 : first // 2 + nb]
            pairs = out_RB.view(-1, 2)[:nb]  # row-major: (even, odd) element of each byte
            pairs[:, 0].copy_(torch.bitwise_and(src, 15))
            pairs[:, 1].copy_(torch.bitwise_right_shift(src, 4))
            pairs.sub_(8.0)

        return absmax_dequantize(enc.scales, enc.numel, enc.block_size, device, load).view(
            enc.shape
        )
