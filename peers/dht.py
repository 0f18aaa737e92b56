"""One hivemind DHT per peer: signed, schema-checked records for discovery and liveness.

Keys are namespaced by run (`<run>/peers`, `<run>/round/<epoch>/<step>`, `<run>/history`).
Every record is stored under a subkey `<name>` + `[owner:<rsa public key>]`, so hivemind's
RSASignatureValidator signs it and every DHT node rejects forgeries. Our `peer_id` is derived
from that RSA key (identity.py: kept in a key file, or fresh per start), and on read we check
the value's `peer_id` against the subkey's key: a peer cannot publish records (endpoints,
CURVE keys, progress) in another peer's name, nor choose its id. Whether a signer is
*admitted* to the run is the reader's business (admission.py, progress.py).

DHT reads can be stale or partial. They are used for discovery (who is there, where, at which
step) and never as proof that a round committed: that only comes from the data plane.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from peers.errors import Malformed
from peers.identity import peer_id_of

__all__ = ["SwarmDHT", "peer_id_of"]

log = logging.getLogger(__name__)
T = TypeVar("T")
OWNER_TAG = b"[owner:"


class SwarmDHT:
    def __init__(
        self,
        run: str,
        host: str,
        port: int,
        announce_host: str | None,
        initial_peers: tuple[str, ...],
        timeout_s: float = 10.0,
        rpc_timeout_s: float = 3.0,
        identity: RSAPrivateKey | None = None,
    ) -> None:
        self.run = run
        self._host, self._port, self._announce = host, port, announce_host
        self._initial = list(initial_peers)
        self.timeout_s, self.rpc_timeout_s = timeout_s, rpc_timeout_s
        # Our identity (identity.py): a key file's, or a fresh key per Swarm (not hivemind's
        # process-wide one) so that two swarms in one process are two distinct peers.
        self._validator = RSASignatureValidator(identity or RSAPrivateKey())
        self._owner = self._validator.local_public_key
        self.peer_id = peer_id_of(self._owner)
        # hivemind's DHT talks to its process over one pipe; concurrent callers would
        # interleave on it, so the heartbeat thread and the round thread take turns.
        self._lock = threading.Lock()
        self.dht: DHT | None = None
        # DHT peer ids (base58) we have seen, to find again after a partition (rejoin).
        self._known: set[str] = {m.rsplit("/p2p/", 1)[1] for m in initial_peers if "/p2p/" in m}
        self._rejoin: Any = None

    def start(self) -> None:
        port = self._port
        if self._announce and not port:
            # An announced address needs a concrete port; take a free one now (a tiny race
            # with other binders is the price of "port 0" behind NAT).
            with socket.socket() as s:
                s.bind((self._host, 0))
                port = s.getsockname()[1]
        kw: dict = {"host_maddrs": [f"/ip4/{self._host}/tcp/{port}"]}
        if self._announce:
            kw["announce_maddrs"] = [f"/ip4/{self._announce}/tcp/{port}"]
        # The DHT forks its own process: start it before zmq threads/sockets exist.
        self.dht = DHT(
            initial_peers=self._initial or None,
            start=True,
            record_validators=[self._validator],
            wait_timeout=self.rpc_timeout_s,
            # Joining may be slow on a busy machine; only steady-state RPCs must be short.
            bootstrap_timeout=max(10.0, self.rpc_timeout_s),
            **kw,
        )

    def visible_maddrs(self) -> list[str]:
        assert self.dht is not None
        with self._lock:
            return [str(m) for m in self.dht.get_visible_maddrs()]

    def key(self, *parts: object) -> str:
        return "/".join([self.run, *map(str, parts)])

    def store(self, key: str, name: str, value: dict, ttl_s: float, wait: bool = True) -> bool:
        """Store a signed record under our owner subkey; False if the DHT did not accept it.

        wait=False returns at once (True); a later store of the same record always wins,
        because its expiration time is later.
        """
        assert self.dht is not None
        subkey = name.encode() + self._owner
        with self._lock:
            fut = self.dht.store(
                key,
                subkey=subkey,
                value=value,
                expiration_time=get_dht_time() + ttl_s,
                return_future=True,
            )
        if not wait:
            return True
        try:
            return bool(fut.result(timeout=self.timeout_s))
        except Exception as e:  # timeouts and p2p errors: a missed store is retried later
            log.warning("DHT store of %s failed: %s", key, e)
            return False

    def fetch(self, key: str, parse: Callable[[dict], T], named: bool = False) -> list[T]:
        """All live records under key, validated; bad ones are logged and skipped.

        named: the records are stored under their writer's peer id (heartbeats,
        announcements), so one signing key has one record there, not one per name it
        makes up (which would count it as many live peers)."""
        assert self.dht is not None
        t0 = time.monotonic()
        with self._lock:
            fut = self.dht.get(key, latest=True, return_future=True)
        try:
            found = fut.result(timeout=self.timeout_s)
            if time.monotonic() - t0 > 1.0:
                log.info("DHT get of %s took %.1fs", key, time.monotonic() - t0)
        except Exception as e:
            log.warning("DHT get of %s failed: %s", key, e)
            return []
        if found is None or not isinstance(found.value, dict):
            return []
        out: list[T] = []
        for subkey, item in found.value.items():
            try:
                out.append(self._check(subkey, item.value, parse, named))
            except Malformed as e:
                log.warning("dropped invalid DHT record under %s: %s", key, e)
        return out

    @staticmethod
    def _check(subkey: object, value: object, parse: Callable[[dict], T], named: bool = False) -> T:
        if not isinstance(subkey, bytes) or OWNER_TAG not in subkey:
            raise Malformed("unsigned subkey")
        owner = subkey[subkey.index(OWNER_TAG) :]
        if not isinstance(value, dict):
            raise Malformed(f"value is a {type(value).__name__}, not a map")
        if value.get("peer_id") != peer_id_of(owner):
            raise Malformed(f"peer_id {str(value.get('peer_id'))[:24]!r} is not the signer's")
        if named and subkey[: subkey.index(OWNER_TAG)] != value["peer_id"].encode():
            raise Malformed(f"a record of {value['peer_id']} stored under another name")
        return parse(value)

    def rejoin(self) -> None:
        """Ping DHT peers we once knew that are missing from our routing table.

        hivemind drops a peer from its routing table when an RPC to it fails and never
        re-bootstraps by itself, so after a partition heals both sides would stay blind to
        each other. Called from the heartbeat thread; never waits (a ping to an unreachable
        peer takes seconds, and the heartbeat must not stall)."""
        assert self.dht is not None
        fut = self._rejoin
        if fut is not None:
            if not fut.done():
                return
            try:
                self._known |= set(fut.result())
            except Exception as e:  # a failed ping round is retried next time
                log.debug("DHT rejoin failed: %s", e)
        with self._lock:
            self._rejoin = self.dht.run_coroutine(
                functools.partial(_rejoin, known=sorted(self._known)), return_future=True
            )

    def shutdown(self) -> None:
        if self.dht is not None:
            with self._lock:
                self.dht.shutdown()  # also terminates its p2pd child
            self.dht = None


async def _rejoin(dht: DHT, node: Any, known: list[str]) -> list[str]:
    """Runs inside the DHT process: ping known peers missing from the routing table."""
    from hivemind.p2p import PeerID

    table = node.protocol.routing_table
    present = {p.to_base58() for p in table.uid_to_peer_id.values()}
    for p in known:
        if p not in present:
            await node.protocol.call_ping(PeerID.from_base58(p))
    return sorted(present | {p.to_base58() for p in table.uid_to_peer_id.values()})
