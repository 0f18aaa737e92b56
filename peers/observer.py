"""Read-only view of a swarm: join its DHT as a client and list live peers' records.

Used by `diloco-grow status`; it never announces, averages or serves anything. In an
admitted run it lists only the peers the run's owner admitted, as the peers themselves do.
"""

from __future__ import annotations

import time

from peers.admission import Admission
from peers.dht import SwarmDHT
from peers.records import PeerRecord


def read_progress(
    run: str, initial_peers: list[str], timeout: float = 30.0, admission: Admission | None = None
) -> list[dict]:
    """Live peers of `run` (their progress info merged with the swarm's own fields)."""
    if not initial_peers:
        raise ValueError("need at least one --join multiaddr to find the swarm")
    policy = admission or Admission(run)
    dht = SwarmDHT(run, "127.0.0.1", 0, None, tuple(initial_peers), timeout)
    dht.start()
    try:
        recs = dht.fetch(dht.key("peers"), PeerRecord.from_dict, named=True)
    finally:
        dht.shutdown()
    now = time.time()
    recs = [r for r in recs if policy.admits(r.peer_id, r.cert, now)]
    return [r.public() for r in sorted(recs, key=lambda r: r.peer_id)]
