"""Configuration of a swarm peer (frozen: one peer, one configuration for its lifetime)."""

from __future__ import annotations

import re
from dataclasses import dataclass

RUN_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class SwarmConfig:
    run: str  # swarm name; all DHT keys live under it
    host: str = "127.0.0.1"  # interface the DHT and the data plane bind to
    port: int = 0  # DHT (libp2p) port; 0 = any free port
    announce_host: str | None = None  # address others should dial, if not `host` (NAT)
    data_port: int = 0  # zmq ROUTER port; 0 = any free port
    initial_peers: tuple[str, ...] = ()  # multiaddrs of live peers to join through
    # Longest wait for others to announce a step; cut short as soon as every live peer of
    # the epoch has announced, so a generous value costs nothing when peers keep pace.
    matchmaking_s: float = 2.0
    phase_timeout_s: float = 10.0  # a round aborts after this long without progress
    round_timeout_s: float = 30.0  # all_reduce gives up (RoundFailed) after this long
    min_peers: int = 1  # smallest group that may average, and smallest vote count to commit
    quorum: float = 2 / 3  # fraction of members that must vote for the identical proposal
    max_frame_bytes: int = 256 << 20  # largest accepted shard frame
    record_ttl_s: float = 60.0  # liveness record lifetime (refreshed every ttl/3)
    dht_timeout_s: float = 10.0  # any single DHT get/store

    def __post_init__(self) -> None:
        if not RUN_RE.match(self.run):
            raise ValueError(f"run name {self.run!r} must match {RUN_RE.pattern}")
        if not 0 <= self.port < 65536 or not 0 <= self.data_port < 65536:
            raise ValueError("ports must be in [0, 65535]")
        if self.matchmaking_s <= 0 or self.phase_timeout_s <= 0 or self.round_timeout_s <= 0:
            raise ValueError("matchmaking_s, phase_timeout_s and round_timeout_s must be > 0")
        if self.min_peers < 1:
            raise ValueError(f"min_peers must be >= 1, got {self.min_peers}")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be >= 1024")
        if self.record_ttl_s < 3:
            raise ValueError("record_ttl_s must be >= 3 seconds")
