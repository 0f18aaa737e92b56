"""Blockwise absmax quantisation core shared by the int8 and int4 codecs.

Each block of `block_size` consecutive elements is stored as q = round(x / s) with
s = absmax(block) / qmax, so |x - q*s| <= s/2 = absmax/(2*qmax).

Why it is fast on CPU, and stays fast on a busy machine (all measured on a shared 2-core VM):
- The tensor is walked in chunks of 1M elements; every pass after the first reads the chunk
  from cache (~2x over whole-tensor ops).
- Chunks are spread over a small thread pool (torch.get_num_threads() workers) and each chunk
  runs plain NumPy kernels, which are single-threaded and release the GIL. torch's intra-op
  OpenMP puts a barrier after every op; with other processes on the cores, every barrier waits
  for a descheduled thread and int8 ran 10x slower with 2 threads than with 1. Here a slow
  worker only delays its own chunk.
- Large outputs live in transparent huge pages (see empty_1d).
Encoding and decoding always run on the CPU: a CUDA input is copied over first, so there is
exactly one implementation and nothing device-specific can change the decoded bits.

Why decode is bit-identical everywhere: it is float(q) * s, one IEEE fp32 multiply per
element, no reductions or fused ops. Scales are 0 or normal floats <= FLT_MAX / code_max, so
no product is ever denormal (flush-to-zero modes cannot differ) or infinite.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import cache

import numpy as np
import torch

from compression.codec import FLOAT_DTYPES, TINY, Encoded

CHUNK_ELEMS = 1 << 20  # measured: 2^18..2^20 best; 2^22 (16 MB) falls out of cache
HUGE_MIN_BYTES = 4 << 20  # below this, page faults are cheap and malloc reuses memory anyway
FLT_MAX = np.float32(np.finfo(np.float32).max)

# store(codes_RB, first_elem, n_valid): write rounded fp32 codes of whole rows into a payload
Store = Callable[[np.ndarray, int, int], None]
# load(out_RB, first_elem, n_valid): fill rows with the fp32 codes read from a payload
Load = Callable[[np.ndarray, int, int], None]


def empty_1d(n: int, dtype: type[np.generic]) -> np.ndarray:
    """Uninitialised 1-D array; large ones are backed by transparent huge pages.

    On the VM we measured, first-touch 4 KiB page faults on a fresh 64 MB output cost ~80 ms,
    four times the decoding itself; with 2 MiB pages decode went 885 -> 3500 MB/s on one
    thread. Falls back to np.empty where madvise is unavailable (non-Linux).
    """
    nbytes = n * np.dtype(dtype).itemsize
    if nbytes < HUGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(n, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP disabled: still a valid, 4 KiB-paged buffer
        pass
    return np.frombuffer(buf, dtype=dtype)  # keeps buf alive; unmapped when freed


def flat_tensor(x: torch.Tensor) -> torch.Tensor:
    """x as a flat contiguous fp32 tensor on its device (no copy when it already is one)."""
    if x.dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"cannot encode dtype {x.dtype}; expected float32/float16/bfloat16")
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def flat_fp32(x: torch.Tensor) -> np.ndarray:
    """x as a flat contiguous fp32 CPU array (no copy when it already is one)."""
    return flat_tensor(x).cpu().numpy()


def dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def check_block_size(name: str, block_size: int, even: bool = False) -> None:
    if not isinstance(block_size, int) or not 2 <= block_size <= 1 << 20:
        raise ValueError(f"{name} block_size must be an int in [2, 2^20], got {block_size!r}")
    if even and block_size % 2:
        raise ValueError(f"{name} block_size must be even, got {block_size}")


def check_encoded(enc: Encoded, name: str) -> None:
    if enc.codec != name:
        raise ValueError(f"{name} codec cannot decode a {enc.codec!r} encoding")


@cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    del pid  # part of the cache key only: a forked child must not reuse the parent's threads
    return ThreadPoolExecutor(workers, thread_name_prefix="compression")


def _run_chunks(n_rows: int, rows: int, job: Callable[[int, int], None]) -> None:
    """job(r0, r1) for consecutive row ranges, spread over the pool; re-raises job errors."""
    starts = range(0, n_rows, rows)
    workers = max(1, min(torch.get_num_threads(), os.cpu_count() or 1, len(starts)))
    if workers == 1:
        for r0 in starts:
            job(r0, min(n_rows, r0 + rows))
        return
    pool = _pool(workers, os.getpid())
    futures = [pool.submit(job, r0, min(n_rows, r0 + rows)) for r0 in starts]
    wait(futures)  # all writes finish before we return or raise
    for f in futures:
        f.result()


def _quantize_rows(x_RB: np.ndarray, qmax: int, code_max: float, scales_R: np.ndarray
                   ) -> np.ndarray:
    absmax = np.maximum(x_RB.max(axis=1), -x_RB.min(axis=1))  # NaN propagates
    if not np.isfinite(absmax).all():
        raise ValueError("cannot encode non-finite values (NaN or Inf)")
    scale = absmax / np.float32(qmax)
    # Cap so q*s stays finite for every code the wire allows; only |x| > ~3.37e38 is affected.
    cap = FLT_MAX / np.float32(code_max)
    capped = bool((scale > cap).any())
    np.minimum(scale, cap, out=scale)
    scale[absmax < TINY] = 0.0  # tiny blocks become exact zeros (keeps 1/s finite, normal)
    inv = np.zeros_like(scale)
    np.divide(np.float32(1.0), scale, out=inv, where=scale > 0)
    scales_R[:] = scale
    codes = np.multiply(x_RB, inv[:, None])
    np.rint(codes, out=codes)  # round half to even
    if capped:  # a capped block may round to qmax + 1
        np.clip(codes, -qmax, qmax, out=codes)
    return codes


def absmax_quantize(x: np.ndarray, block: int, qmax: int, code_max: float, store: Store
                    ) -> np.ndarray:
    """Quantise flat fp32 x blockwise, handing rounded codes to `store`; returns fp32 scales."""
    n = x.size
    nfull, tail = divmod(n, block)
    scales = np.empty(nfull + (tail > 0), dtype=np.float32)
    main = x[: nfull * block].reshape(nfull, block)

    def job(r0: int, r1: int) -> None:
        store(_quantize_rows(main[r0:r1], qmax, code_max, scales[r0:r1]), r0 * block,
              (r1 - r0) * block)

    _run_chunks(nfull, max(1, CHUNK_ELEMS // block), job)
    if tail:
        # Zero padding never changes a block's absmax, so the last block matches what the
        # same elements would give inside a longer tensor (slice == encode of sub-range).
        padded = np.zeros((1, block), dtype=np.float32)
        padded[0, :tail] = x[nfull * block :]
        store(_quantize_rows(padded, qmax, code_max, scales[nfull:]), nfull * block, tail)
    return scales


def absmax_dequantize(scales: np.ndarray, n: int, block: int, load: Load) -> np.ndarray:
    """fp32 [n] = codes (from `load`) * their block's scale, chunk by chunk."""
    out = empty_1d(n, np.float32)
    nfull, tail = divmod(n, block)
    main = out[: nfull * block].reshape(nfull, block)

    def job(r0: int, r1: int) -> None:
        out_RB = main[r0:r1]
        load(out_RB, r0 * block, (r1 - r0) * block)
        out_RB *= scales[r0:r1, None]

    _run_chunks(nfull, max(1, CHUNK_ELEMS // block), job)
    if tail:
        padded = np.zeros((1, block), dtype=np.float32)
        load(padded, nfull * block, tail)
        padded *= scales[nfull:, None]
        out[nfull * block :] = padded[0, :tail]
    return out
