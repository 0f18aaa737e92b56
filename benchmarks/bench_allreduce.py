"""How fast and how compact is our int8 round, next to hivemind's DecentralizedAverager?

For P peer processes on loopback averaging N fp32 elements, one JSON line per (P, N) with
three implementations run back to back on the same machine:
  ours         peers.Swarm, int8 blockwise (encode + matchmaking + all-reduce + commit)
  hm_none      hivemind DecentralizedAverager, no compression
  hm_8bit      hivemind DecentralizedAverager, Uniform8BitQuantization
Each reports the median over rounds (after one warm-up round) of the slowest peer's round
seconds, tensor bytes sent per peer per round, and whether every peer ended the round with
bit-identical results, and the largest error against the exact fp32 mean. Both use the
same matchmaking window as an upper bound (both start a round as soon as the group is full).
hivemind's tensor bytes are counted at its serialisers (payload only, no protobuf/libp2p
framing); ours are zmq frame bytes including headers and control messages. hivemind 1.1.12's
8-bit decoder is broken under numpy 2 (it silently falls back to local parts), so the worker
patches that one function (same code, numpy-2 safe) before measuring.

    python benchmarks/bench_allreduce.py --smoke      # P=2, N=1M, 2 rounds, < 1 minute
    python benchmarks/bench_allreduce.py              # P in {2,4}, N in {1M,16M}, 3 rounds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

IMPLS = ("ours", "hm_none", "hm_8bit")


# ---- worker processes -------------------------------------------------------------------


def _emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def _input(index: int, numel: int):
    import torch

    return torch.randn(numel, generator=torch.Generator().manual_seed(index))


def _exact_mean(peers: int, numel: int):
    """The fp32 mean every implementation approximates (all inputs are reproducible)."""
    acc = _input(0, numel)
    for i in range(1, peers):
        acc += _input(i, numel)
    return acc / peers


def _max_err(result, exact) -> float:
    return float((result.reshape(-1) - exact).abs().max())


def run_ours(a: argparse.Namespace) -> None:
    from compression.codec import get_codec
    from peers.swarm import Swarm, SwarmConfig

    cfg = SwarmConfig(
        run=f"bench-{a.peers}-{a.numel}",
        initial_peers=tuple(a.join),
        matchmaking_s=a.matchmaking_s,
        phase_timeout_s=120,
        round_timeout_s=600,
        min_peers=a.peers,
    )
    with Swarm(cfg) as swarm:
        _emit(event="ready", maddr=swarm.visible_maddrs[0])
        sys.stdin.readline()  # "go": every peer starts its rounds together
        x, codec, params_hash = _input(a.index, a.numel), get_codec("int8"), "init"
        exact = _exact_mean(a.peers, a.numel)
        for r in range(a.rounds):
            t0 = time.perf_counter()
            res = swarm.all_reduce(
                codec.encode(x), 1.0, arch_epoch=0, step=r, params_hash=params_hash
            )
            params_hash = _digest(res.mean)
            _emit(
                event="round",
                round=r,
                seconds=time.perf_counter() - t0,
                data_seconds=res.data_seconds,
                bytes_sent=res.bytes_sent,
                hash=params_hash,
                ok=len(res.members) == a.peers,
                max_err=_max_err(res.mean, exact),
            )
        time.sleep(1.0)  # let the last COMMIT reach everyone before sockets close


def run_hivemind(a: argparse.Namespace) -> None:
    import multiprocessing as mp

    import hivemind
    import hivemind.averaging.allreduce as hm_allreduce
    from hivemind.compression import NoCompression, Uniform8BitQuantization

    sent = mp.Value("q", 0)  # the averager works in a forked child: count in shared memory
    serialize = hm_allreduce.serialize_torch_tensor

    def counted_serialize(*args, **kwargs):  # the reducers' outgoing averaged parts
        out = serialize(*args, **kwargs)
        with sent.get_lock():
            sent.value += len(out.buffer)
        return out

    hm_allreduce.serialize_torch_tensor = counted_serialize
    _fix_hivemind_quantization_for_numpy2()
    base = Uniform8BitQuantization() if a.impl == "hm_8bit" else NoCompression()

    class Counted(type(base)):  # the senders' outgoing input parts
        def compress(self, tensor, info, allow_inplace=False):
            out = super().compress(tensor, info, allow_inplace)
            with sent.get_lock():
                sent.value += len(out.buffer)
            return out

    dht = hivemind.DHT(
        initial_peers=a.join or None, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
    )
    x, exact = _input(a.index, a.numel), _exact_mean(a.peers, a.numel)
    avg = hivemind.averaging.DecentralizedAverager(
        [x.clone()],
        dht,
        prefix=f"bench-{a.peers}-{a.numel}",
        target_group_size=a.peers,
        min_group_size=a.peers,
        min_matchmaking_time=a.matchmaking_s,
        request_timeout=10.0,
        compression=Counted(),
        start=True,
    )
    _emit(event="ready", maddr=str(dht.get_visible_maddrs()[0]))
    sys.stdin.readline()
    for r in range(a.rounds):
        with avg.get_tensors() as ts:
            ts[0].copy_(x)
        s0, t0 = sent.value, time.perf_counter()
        group = avg.step(timeout=300)
        seconds = time.perf_counter() - t0
        with avg.get_tensors() as ts:
            h, err = _digest(ts[0]), _max_err(ts[0], exact)
        _emit(
            event="round",
            round=r,
            seconds=seconds,
            data_seconds=None,
            bytes_sent=sent.value - s0,
            hash=h,
            ok=group is not None and len(group) == a.peers,
            max_err=err,
        )
    time.sleep(1.0)
    avg.shutdown()
    dht.shutdown()


def _fix_hivemind_quantization_for_numpy2() -> None:
    """hivemind 1.1.12's 8-bit decoder calls int() on a 1-element array, a TypeError on
    numpy >= 2; the averager then silently keeps local parts. Same code, numpy-2 safe."""
    import numpy as np
    import torch
    from hivemind.compression import quantization as hq

    def extract(self, serialized_tensor):
        buf = serialized_tensor.buffer
        codebook_size = int(np.frombuffer(buf, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buf, offset=8, count=codebook_size, dtype=self.codebook_dtype)
        quantized = np.frombuffer(buf, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(
            tuple(serialized_tensor.size)
        )
        codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)

    hq.Quantization.extract = extract


# ---- orchestration ----------------------------------------------------------------------


class Proc:
    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.events: list[dict] = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            if line.startswith("{"):
                with self.cv:
                    self.events.append(json.loads(line))
                    self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait(self, event: str, count: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                got = [e for e in self.events if e["event"] == event]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise RuntimeError(f"worker gave {len(got)}/{count} {event} events")
                self.cv.wait(min(left, 1.0))

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)  # the worker, its DHT process and p2pd
        except ProcessLookupError:
            pass
        self.p.wait()


def run_case(
    impl: str, peers: int, numel: int, rounds: int, mm: float, timeout: float, threads: int
) -> dict:
    common = [
        "--worker",
        impl,
        "--peers",
        str(peers),
        "--numel",
        str(numel),
        "--rounds",
        str(rounds),
        "--matchmaking-s",
        str(mm),
        "--threads",
        str(threads),
    ]
    procs: list[Proc] = []
    try:
        procs.append(Proc([*common, "--index", "0"]))
        maddr = procs[0].wait("ready", 1, 120)[0]["maddr"]
        procs += [Proc([*common, "--index", str(i), "--join", maddr]) for i in range(1, peers)]
        for p in procs:
            p.wait("ready", 1, 120)
        for p in procs:
            p.p.stdin.write("go\n")
            p.p.stdin.flush()
        per_peer = [p.wait("round", rounds, timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    warm = 1 if rounds > 2 else 0  # the first round also pays for connection set-up
    rows = list(zip(*per_peer, strict=True))[warm:]
    datas = [max(e["data_seconds"] for e in row) for row in rows if row[0]["data_seconds"]]
    return {
        "median_round_s": round(statistics.median(max(e["seconds"] for e in r) for r in rows), 3),
        "median_data_s": round(statistics.median(datas), 3) if datas else None,
        "bytes_sent_per_peer": int(statistics.mean(e["bytes_sent"] for r in rows for e in r)),
        "bit_identical": all(len({e["hash"] for e in r}) == 1 for r in rows),
        "max_abs_err": float(f"{max(e['max_err'] for r in rows for e in r):.3g}"),
        "full_groups": all(e["ok"] for r in rows for e in r),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="P=2, N=1M, 2 rounds")
    ap.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--numel", type=int, nargs="+", default=[1 << 20, 1 << 24])
    ap.add_argument("--rounds", type=int, default=4, help="including one warm-up round")
    ap.add_argument("--matchmaking-s", type=float, default=1.0)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--timeout", type=float, default=900.0, help="per case")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per peer process (0: the cores shared by the peers)",
    )
    # worker mode (internal)
    ap.add_argument("--worker", choices=IMPLS)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--join", action="append", default=[])
    a = ap.parse_args()
    if a.worker:
        from diloco_grow.threads import set_threads

        # P processes share the cores, for both implementations (with 2 threads per
        # process on a busy 2-core box, torch ops run ~10x slower).
        set_threads(a.threads, workers=a.peers[0])
        a.impl, a.peers, a.numel = a.worker, a.peers[0], a.numel[0]
        (run_ours if a.worker == "ours" else run_hivemind)(a)
        return
    if a.smoke:
        a.peers, a.numel, a.rounds = [2], [1 << 20], 2
    for peers in a.peers:
        for numel in a.numel:
            line: dict = {
                "bench": "allreduce",
                "peers": peers,
                "numel": numel,
                "rounds_measured": a.rounds - (1 if a.rounds > 2 else 0),
                "matchmaking_s": a.matchmaking_s,
            }
            for impl in a.impls:
                try:
                    line[impl] = run_case(
                        impl, peers, numel, a.rounds, a.matchmaking_s, a.timeout, a.threads
                    )
                except RuntimeError as e:
                    line[impl] = {"error": str(e)}
            ours, hm8 = line.get("ours", {}), line.get("hm_8bit", {})
            if "median_round_s" in ours and "median_round_s" in hm8:
                speedup = hm8["median_round_s"] / ours["median_round_s"]
                line["speedup_vs_hm_8bit"] = round(speedup, 2)
                line["bytes_ratio_vs_hm_8bit"] = round(
                    ours["bytes_sent_per_peer"] / hm8["bytes_sent_per_peer"], 3
                )
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
