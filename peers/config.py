"""Configuration of a swarm peer (frozen: one peer, one configuration for its lifetime)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peers.admission import Admission, Certificate, owner_public_key
from peers.records import MAX_MEMBERS
from peers.robust import RobustConfig

RUN_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class SwarmConfig:
    run: str  # swarm name; all DHT keys live under it
    host: str = "127.0.0.1"  # interface the DHT and the data plane bind to
    port: int = 0  # DHT (libp2p) port; 0 = any free port
    announce_host: str | None = None  # address others should dial, if not `host` (NAT)
    data_port: int = 0  # zmq ROUTER port; 0 = any free port
    initial_peers: tuple[str, ...] = ()  # multiaddrs of live peers to join through
    # Progress heartbeat: every live peer republishes its record this often; a peer whose
    # record is older than `dead_after_beats` heartbeats (it missed two) is dead and nobody
    # waits for it.
    heartbeat_s: float = 2.0
    dead_after_beats: float = 2.0
    # Grace for announcements and JOINs once the swarm is ready (DHT reads lag by ~1 beat).
    matchmaking_s: float = 2.0
    # Ready peers wait for a live peer still training until its own reported ETA (plus two
    # heartbeats of slack), but never longer than this: a peer cannot stall a step forever.
    max_wait_s: float = 600.0
    phase_timeout_s: float = 10.0  # a round aborts after this long without progress
    # all_reduce gives up (RoundFailed) this long after the swarm was ready for the round.
    round_timeout_s: float = 60.0
    min_peers: int = 1  # smallest group that may average, and smallest vote count to commit
    quorum: float = 2 / 3  # fraction of members that must vote for the identical proposal
    max_frame_bytes: int = 256 << 20  # largest accepted shard frame
    dht_timeout_s: float = 10.0  # any single DHT get/store
    # One kademlia RPC. While a peer is frozen every DHT read waits this long for it once
    # (then hivemind drops it), so it must stay below a heartbeat or two; 0 = 1.5 beats,
    # clamped to [0.5, 3] s (3 s is hivemind's default).
    dht_rpc_timeout_s: float = 0.0
    # Untrusted members (blame.py, robust.py): the largest group a leader forms, the
    # reducers' robust aggregation, and when a repeat offender is banned (strikes at
    # distinct steps, then for how many outer steps).
    max_group: int = 256
    robust: RobustConfig = field(default_factory=RobustConfig)
    ban_after: int = 3
    ban_steps: int = 100
    # Identity and admission (identity.py, admission.py). identity_key: the RSA key file
    # that fixes our peer id across restarts (created if missing); None = a fresh key and
    # id per start. owner_key: the run owner's Ed25519 public key (hex) from the run file;
    # None = an open run, everyone admitted. cert: the owner's certificate for our peer id,
    # required when owner_key is set.
    identity_key: str | None = None
    owner_key: str | None = None
    cert: Certificate | None = None

    def __post_init__(self) -> None:
        if not RUN_RE.match(self.run):
            raise ValueError(f"run name {self.run!r} must match {RUN_RE.pattern}")
        if not 0 <= self.port < 65536 or not 0 <= self.data_port < 65536:
            raise ValueError("ports must be in [0, 65535]")
        for name in ("heartbeat_s", "matchmaking_s", "phase_timeout_s", "round_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.dead_after_beats >= 2:  # (NaN fails this too)
            raise ValueError("dead_after_beats must be >= 2 (one missed beat is not death)")
        if not self.max_wait_s >= 0:
            raise ValueError("max_wait_s must be >= 0")
        if self.min_peers < 1:
            raise ValueError(f"min_peers must be >= 1, got {self.min_peers}")
        if not 0 < self.quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {self.quorum}")
        if not 2 <= self.max_group <= MAX_MEMBERS:
            raise ValueError(f"max_group must be in [2, {MAX_MEMBERS}], got {self.max_group}")
        if self.ban_after < 1 or self.ban_steps < 0:
            raise ValueError("ban_after must be >= 1 and ban_steps >= 0")
        if self.max_frame_bytes < 1024:
            raise ValueError("max_frame_bytes must be >= 1024")
        if self.owner_key is not None:
            owner_public_key(self.owner_key)  # ValueError if it is no Ed25519 key
            if self.cert is None:
                raise ValueError("an admitted run (owner_key set) needs this peer's certificate")

    @property
    def admission(self) -> Admission:
        return Admission(self.run, self.owner_key)

    @property
    def rpc_timeout_s(self) -> float:
        if self.dht_rpc_timeout_s > 0:
            return self.dht_rpc_timeout_s
        return min(3.0, max(0.5, 1.5 * self.heartbeat_s))

    @property
    def dead_after_s(self) -> float:
        return self.dead_after_beats * self.heartbeat_s

    @property
    def record_ttl_s(self) -> float:
        """How long a heartbeat record stays in the DHT: well past death, so `status` can
        still show a peer that just died (liveness is judged by age, progress.is_live)."""
        return 4 * self.dead_after_s + 10.0
