"""The int8 codec: blockwise absmax, symmetric, round-to-nearest, one fp32 scale per block.

8 + 32/block_size bits per element: 8.125 at the default block of 256. Measured trade-off
(benchmarks/results/codec.md): block 128 (8.25 bits) cuts RMSE by 7% on Gaussian and 21% on
Student-t data, block 512 adds 7% / 26%. At 256, Gaussian RMSE is 0.54x bitsandbytes' dynamic
8-bit at its default block 4096 and 0.64x at block 256. Payload bytes are the codes in two's
complement; the quantisation core lives in blockwise.py.
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
class Int8Codec:
    """|x - x_hat| <= absmax/254 per block (absmax/127 only for |x| > ~3.37e38)."""

    block_size: int = 256
    name: ClassVar[str] = "int8"
    qmax: ClassVar[int] = 127

    def __post_init__(self) -> None:
        check_block_size(self.name, self.block_size)

    def encode(self, x: torch.Tensor) -> Encoded:
        flat = flat_fp32(x)
        q = empty_1d(flat.size, np.int8)

        def store(codes_RB: np.ndarray, first: int, n_valid: int) -> None:
            q[first : first + n_valid] = codes_RB.reshape(-1)[:n_valid]  # exact: |code| <= 127

        scales = absmax_quantize(
            flat, self.block_size, self.qmax, LAYOUTS[self.name].code_max, store
        )
        return Encoded(self.name, tuple(x.shape), dtype_name(x), self.block_size,
                       torch.from_numpy(q.view(np.uint8)), torch.from_numpy(scales))

    def decode(self, enc: Encoded, device: str | torch.device = "cpu") -> torch.Tensor:
        check_encoded(enc, self.name)
        q = enc.payload.numpy().view(np.int8)

        def load(out_RB: np.ndarray, first: int, n_valid: int) -> None:
            out_RB.reshape(-1)[:n_valid] = q[first : first + n_valid]

        out = absmax_dequantize(enc.scales.numpy(), enc.numel, enc.block_size, load)
        return torch.from_numpy(out).view(enc.shape).to(device)
