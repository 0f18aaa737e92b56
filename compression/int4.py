"""Blockwise absmax int4: the int8 scheme with codes in [-7, 7], two per byte.

With error feedback this is the low-bandwidth path (4 + 32/block_size bits per element), so
it shares the int8 core (same rounding, same scale rules, same determinism argument) and only
differs in how codes are stored: element 2i goes in the low nibble and 2i+1 in the high
nibble of byte i, each as the unsigned value q + 8 (so nibble 8 is zero; nibble 0, never
produced by the encoder, decodes to -8, which the scale cap in LAYOUTS accounts for). The
packing is arithmetic on values, not a reinterpretation of memory, so it does not depend on
the machine's byte order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from compression.blockwise import (
    absmax_dequantize,
    absmax_quantize,
    check_block_size,
    check_encoded,
    dtype_name,
    empty_1d,
    flat_fp32,
)
from compression.codec import LAYOUTS, Encoded


@dataclass(frozen=True)
class Int4Codec:
    """|x - x_hat| <= absmax/14 per block; 4.125 bits per element at block 256."""

    block_size: int = 256
    name: ClassVar[str] = "int4"
    qmax: ClassVar[int] = 7

    def __post_init__(self) -> None:
        # Even blocks keep every block starting on a byte boundary, so slices stay exact.
        check_block_size(self.name, self.block_size, even=True)

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = flat_fp32(x)
        packed = empty_1d((flat.size + 1) // 2, np.uint8)

        def store(codes_RB: np.ndarray, first: int, n_valid: int) -> None:
            # (q0 + 8) + 16 * (q1 + 8): an exact integer in [17, 255] computed in fp32
            pair = codes_RB[:, 1::2] * np.float32(16)
            pair += codes_RB[:, 0::2]
            pair += np.float32(136)
            nb = (n_valid + 1) // 2
            packed[first // 2 : first // 2 + nb] = pair.reshape(-1)[:nb]

        scales = absmax_quantize(
            flat, self.block_size, self.qmax, LAYOUTS[self.name].code_max, store
        )
        return Encoded(self.name, tuple(x.shape), dtype_name(x), self.block_size,
                       torch.from_numpy(packed), torch.from_numpy(scales))

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor:
        check_encoded(enc, self.name)
        if enc.block_size % 2:
            raise ValueError(f"int4 block_size must be even, got {enc.block_size}")
        p = enc.payload.numpy()

        def load(out_RB: np.ndarray, first: int, n_valid: int) -> None:
            nb = (n_valid + 1) // 2
            src = p[first // 2 : first // 2 + nb]
            pairs = out_RB.reshape(-1, 2)[:nb]  # row-major: (even, odd) element of each byte
            pairs[:, 0] = src & 15
            pairs[:, 1] = src >> 4
            pairs -= np.float32(8)

        out = absmax_dequantize(enc.scales.numpy(), enc.numel, enc.block_size, load)
        return torch.from_numpy(out).view(enc.shape).to(device)
