"""In-process Averager with the network round's exact arithmetic and byte accounting.

The vector is cut into one block-aligned shard per worker, as in the swarm's
reduce-scatter; each shard's mean is the weighted fp32 mean of the decoded
contributions, encoded once and decoded by everybody. Byte counters count the frames a
worker would put on the wire (its shards for the other reducers, plus its reduced shard
for every other member), so simulated and networked runs report comparable traffic.

Each shard is combined by `peers.robust.aggregate`, the function a swarm reducer runs, so
`simulate` and the swarm share one arithmetic (robust by default; `[robust] enabled =
false` is the plain weighted mean).
"""

from __future__ import annotations

import time

from compression.codec import LAYOUTS, Codec, Encoded, concat, reduced_name, shard_bounds
from compression.wire import pack
from diloco_grow.outer import RoundResult, make_codec
from peers.robust import Aggregate, RobustConfig, aggregate


def weighted_mean_encoded(
    shards: list[Encoded],
    weights: list[float],
    codec_name: str,
    block_size: int,
    robust: RobustConfig = RobustConfig(),
) -> Encoded:
    """Decode every contribution to fp32, combine them (robustly unless disabled), encode
    the result once (with the codec's reduced form: compression.codec.reduced_name)."""
    mean_codec = make_codec(reduced_name(codec_name), block_size)
    return _reduce(shards, weights, make_codec(codec_name, block_size), mean_codec, robust)[0]


def _reduce(
    shards: list[Encoded], weights: list[float], codec: Codec, mean_codec: Codec,
    robust: RobustConfig,
) -> tuple[Encoded, Aggregate]:
    parts = [codec.decode(enc).reshape(-1) for enc in shards]
    agg = aggregate(parts, weights, robust, LAYOUTS[codec.name].mean_over_senders)
    return mean_codec.encode(agg.mean), agg


class LocalAverager:
    """All workers live in this process; `average` receives every contribution at once."""

    def __init__(
        self, codec_name: str, block_size: int, robust: RobustConfig = RobustConfig()
    ) -> None:
        self.codec_name, self.block_size, self.robust = codec_name, block_size, robust
        self.codec = make_codec(codec_name, block_size)
        self.mean_codec = make_codec(reduced_name(codec_name), block_size)
        self.bytes_sent_total = 0  # per worker, cumulative
        # The last round's robust verdicts, over all shards: worker -> first reason, and
        # the workers clipped in some shard (simulate logs them per round).
        self.rejected: dict[int, str] = {}
        self.clipped: set[int] = set()

    def average(
        self,
        contributions: list[tuple[Encoded, float]],
        *,
        step: int,
        params_hash: str,
        vote: dict | None = None,
    ) -> RoundResult:
        t0 = time.perf_counter()
        encs = [enc for enc, _ in contributions]
        weights = [float(w) for _, w in contributions]
        n = len(encs)
        numel = encs[0].numel
        if any(e.numel != numel for e in encs):
            raise ValueError("contributions have different lengths")
        bounds = shard_bounds(numel, encs[0].align, n)  # as the swarm cuts it
        mean_shards, sent = [], [0] * n
        self.rejected, self.clipped = {}, set()
        for r, (lo, hi) in enumerate(bounds):  # r: the reducer of this shard
            parts = [e.slice(lo, hi) for e in encs]
            mean, agg = _reduce(parts, weights, self.codec, self.mean_codec, self.robust)
            for k, why in agg.rejected:
                self.rejected.setdefault(k, why)
            self.clipped.update(agg.clipped)
            mean_shards.append(mean)
            if n > 1 and hi > lo:
                for w in range(n):
                    if w != r:
                        sent[w] += len(pack(parts[w]))  # contribution to reducer r
                sent[r] += (n - 1) * len(pack(mean))  # reduced shard to everybody else
        # Everybody decodes the same bytes, so θ_g stays bit-identical across workers.
        mean_flat = self.mean_codec.decode(concat(mean_shards)).reshape(-1)
        per_worker = max(sent)
        self.bytes_sent_total += per_worker
        return RoundResult(
            mean=mean_flat,
            members=n,
            bytes_sent=per_worker,
            bytes_recv=per_worker,
            seconds=time.perf_counter() - t0,
        )
