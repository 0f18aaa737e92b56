"""Is our int8 codec fast and accurate enough? (issue 2, Benchmark)

Encodes and decodes the same fp32 tensor (16M elements; Gaussian and Student-t df=3) with
our int8/int4/topk/bnb8 codecs, raw bitsandbytes blockwise 8-bit (block 4096 as hivemind uses it,
and block 256 at the same bits as our int8) and hivemind's Uniform8BitQuantization and
BlockwiseQuantization. Prints one JSON line per codec and distribution:
  codec, dist, encode_mb_s, decode_mb_s (MB = 1e6 bytes of fp32 input per second, median of
  --runs runs after one warm-up; codecs take turns run by run), bits_per_element
  (scales/codebooks included), rmse, max_abs_err
and a final {"summary": ...} line on the Gaussian tensor, where speed = (encode+decode
throughput of our int8) / (that of the fastest bitsandbytes / hivemind 8-bit row) and
rmse = ours / (the most accurate bitsandbytes / hivemind 8-bit row).

    python benchmarks/bench_codec.py                  # 16M elements, 5 runs (~1-2 min)
    python benchmarks/bench_codec.py --smoke          # 1M elements, 2 runs (seconds)
    python benchmarks/bench_codec.py --out benchmarks/results/codec.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.codec import get_codec
from diloco_grow.threads import set_threads

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

# name -> (encode(x) -> handle, decode(handle) -> fp32 tensor, bits(handle, n) -> float)
Bench = tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor],
              Callable[[Any, int], float]]
BNB_ROWS = ("bnb8", "bitsandbytes", "bitsandbytes_b256")
HIVEMIND_ROWS = ("hivemind_uniform8", "hivemind_blockwise8")


def ours(name: str) -> Bench:
    codec = get_codec(name)
    return codec.encode, codec.decode, lambda enc, n: 8 * enc.nbytes / n


def raw_bitsandbytes(block: int) -> Bench:
    import bitsandbytes.functional as bnbf

    def bits(h: Any, n: int) -> float:  # the code table is a fixed constant, never sent
        q, state = h
        return 8 * (q.numel() + 4 * state.absmax.numel()) / n

    return (lambda x: bnbf.quantize_blockwise(x, blocksize=block),
            lambda h: bnbf.dequantize_blockwise(h[0], h[1]), bits)


def _header(buf: bytes, offset: int) -> int:
    # hivemind does int(np.frombuffer(buf, count=1, ...)), which NumPy >= 2.4 rejects
    # (1-element array to scalar); this is the same read, indexed.
    return int(np.frombuffer(buf, offset=offset, count=1, dtype=np.int64)[0])


def _extract_uniform8(msg: Any) -> torch.Tensor:
    """hivemind Quantization.extract (1.1.x), verbatim except for _header."""
    buf = msg.buffer
    codebook = np.frombuffer(buf, offset=8, count=_header(buf, 0), dtype=np.float32)
    quantized = np.frombuffer(buf, offset=8 + codebook.nbytes, dtype=np.uint8)
    quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(msg.size))
    return torch.as_tensor(codebook).to(dtype=getattr(torch, msg.dtype))[quantized]


def _extract_blockwise8(msg: Any) -> torch.Tensor:
    """hivemind BlockwiseQuantization.extract (1.1.x), verbatim except for _header."""
    from bitsandbytes.functional import dequantize_blockwise

    buf = msg.buffer
    absmax = np.frombuffer(buf, offset=16, count=_header(buf, 0), dtype=np.float32)
    codebook = np.frombuffer(buf, offset=16 + absmax.nbytes, count=_header(buf, 8),
                             dtype=np.float32)
    quantized = np.frombuffer(buf, offset=16 + absmax.nbytes + codebook.nbytes, dtype=np.uint8)
    out = dequantize_blockwise(torch.as_tensor(quantized).reshape(tuple(msg.size)),
                               absmax=torch.as_tensor(absmax), code=torch.as_tensor(codebook),
                               blocksize=4096, nested=False)
    return out.to(getattr(torch, msg.dtype))


def hivemind(cls_name: str) -> Bench:
    from hivemind.compression import quantization
    from hivemind.compression.base import CompressionInfo

    comp = getattr(quantization, cls_name)()
    extract = _extract_uniform8 if cls_name.startswith("Uniform") else _extract_blockwise8
    return (lambda x: comp.compress(x, CompressionInfo.from_tensor(x)),
            extract, lambda msg, n: 8 * len(msg.buffer) / n)


def benches() -> dict[str, Bench]:
    return {
        "int8": ours("int8"),
        "int4": ours("int4"),
        "topk": ours("topk"),  # sparse: its rmse is large by design (needs error feedback)
        "bnb8": ours("bnb8"),
        "bitsandbytes": raw_bitsandbytes(4096),
        "bitsandbytes_b256": raw_bitsandbytes(256),
        "hivemind_uniform8": hivemind("Uniform8BitQuantization"),
        "hivemind_blockwise8": hivemind("BlockwiseQuantization"),
    }


def make_tensor(dist: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dist == "gaussian":
        return torch.randn(n, generator=g)
    # Student-t(3) = N / sqrt(chi2_3 / 3): heavy tails like real pseudo-gradients
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(3, n, generator=g).pow_(2).sum(0)
    return z / (chi2 / 3).sqrt_()


def measure(benches: dict[str, Bench], x: torch.Tensor, runs: int) -> dict[str, dict]:
    """Time every codec on x. Runs are interleaved (run r of every codec, then run r + 1) so
    that load from other processes on a shared machine hits all codecs alike."""
    t_enc: dict[str, list[float]] = {name: [] for name in benches}
    t_dec: dict[str, list[float]] = {name: [] for name in benches}
    for encode, decode, _ in benches.values():
        decode(encode(x))  # warm-up (allocator, lazy imports, thread pools)
    for _ in range(runs):
        for name, (encode, decode, _) in benches.items():
            t0 = time.perf_counter()
            h = encode(x)
            t1 = time.perf_counter()
            decode(h)
            t2 = time.perf_counter()
            t_enc[name].append(t1 - t0)
            t_dec[name].append(t2 - t1)
    mb = x.numel() * 4 / 1e6
    out = {}
    for name, (encode, decode, bits) in benches.items():
        h = encode(x)
        err = (x - decode(h).reshape(-1)).abs_()  # fp32 is plenty for an error magnitude
        te, td = statistics.median(t_enc[name]), statistics.median(t_dec[name])
        out[name] = {
            "encode_mb_s": round(mb / te, 1),
            "decode_mb_s": round(mb / td, 1),
            "roundtrip_mb_s": round(mb / (te + td), 1),
            "bits_per_element": round(bits(h, x.numel()), 4),
            "rmse": float(f"{err.double().pow_(2).mean().sqrt().item():.6g}"),
            "max_abs_err": float(f"{err.max().item():.6g}"),
        }
    return out


def summarize(rows: list[dict]) -> dict[str, Any]:
    g = {r["codec"]: r for r in rows if r["dist"] == "gaussian"}
    me = g["int8"]
    bnb = [g[c] for c in BNB_ROWS if c in g]
    hm = [g[c] for c in HIVEMIND_ROWS if c in g]

    def speed(rs: list[dict]) -> float | None:
        return round(me["roundtrip_mb_s"] / max(r["roundtrip_mb_s"] for r in rs), 3) if rs else None

    def rmse(rs: list[dict]) -> float | None:
        return round(me["rmse"] / min(r["rmse"] for r in rs), 3) if rs else None

    s = {"speed_vs_bnb": speed(bnb), "speed_vs_hivemind": speed(hm),
         "rmse_vs_bnb": rmse(bnb), "rmse_vs_hivemind": rmse(hm),
         "int8_bits_per_element": me["bits_per_element"]}
    s["targets_met"] = None if None in s.values() else (
        s["speed_vs_bnb"] >= 1 and s["speed_vs_hivemind"] >= 2 and s["rmse_vs_bnb"] < 1
        and s["rmse_vs_hivemind"] < 1 and me["bits_per_element"] <= 8.25)
    return s


def write_markdown(path: Path, rows: list[dict], summary: dict, meta: dict) -> None:
    cols = ["codec", "dist", "encode_mb_s", "decode_mb_s", "roundtrip_mb_s",
            "bits_per_element", "rmse", "max_abs_err"]
    lines = [f"# bench_codec ({meta['numel']} elements, {meta['runs']} runs, "
             f"{meta['threads']} torch threads)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "```json", json.dumps({"summary": summary}), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="1M elements, 2 runs")
    ap.add_argument("--numel", type=int, default=None)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--codecs", default=None, help="comma-separated subset of rows")
    ap.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    args = ap.parse_args()
    numel = args.numel or (1 << 20 if args.smoke else 1 << 24)
    runs = args.runs or (2 if args.smoke else 5)
    set_threads(args.threads)  # one codec at a time: every core this process may use
    # bitsandbytes' CPU kernels use the system OpenMP runtime, read when it is first loaded
    # (bitsandbytes is imported lazily, in benches()), so give it the same thread count.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    meta = {"numel": numel, "runs": runs, "threads": torch.get_num_threads()}
    all_benches = benches()
    names = args.codecs.split(",") if args.codecs else list(all_benches)
    rows = []
    for dist in ("gaussian", "student_t3"):
        results = measure({n: all_benches[n] for n in names}, make_tensor(dist, numel), runs)
        for name in names:
            row = {"codec": name, "dist": dist, **results[name], **meta}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = summarize(rows) if "int8" in names else {}
    print(json.dumps({"summary": summary, **meta}), flush=True)
    if args.out:
        write_markdown(args.out, rows, summary, meta)


if __name__ == "__main__":
    main()
