"""The data plane: one CURVE-encrypted zmq ROUTER per peer, plus one DEALER per remote peer.

Messages are one-way: we send through a DEALER connected to the other peer's ROUTER, and
replies come back to our own ROUTER. So there is exactly one inbox per peer, and no socket is
ever shared between "request" and "reply" state.

Why CURVE with a ZAP handler: the ROUTER is a CURVE server (its public key is published in
our signed DHT record, so connecting clients know they talk to us), and every DEALER uses
this peer's own keypair as its client key. zmq stamps each received frame with the sender's
public key ("User-Id"); rounds compare it with the member's published key, so a member's
messages cannot be forged.

Who may connect: in an open run, any client key (CURVE_ALLOW_ANY). In an admitted run the ZAP
handler asks a `KeyGate`, which holds the CURVE keys of the admitted peers' records (the
swarm view feeds it after every DHT read, progress.py) plus our own: a stranger's handshake
is refused before any of its frames reach us. A connection that passed ZAP is never asked
again, so received frames are also checked against the gate (a certificate that expired, a
record that is gone).

A refused client's connection is dropped by libzmq for good, with whatever was queued on it;
dealers.py redials it and sends its control messages again, so a newcomer whose record the
remote has not read yet gets in within about a heartbeat of that read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from compression.wire import WireError, pack_message, unpack_message
from peers.dealers import REDIAL_S, Dealers

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 1 << 20
# Messages queued per sending peer while we are not reading (we read only during rounds,
# and between rounds a peer sends us at most a late vote or two). zmq's default of 1000
# frames of up to max_frame_bytes each let one connection pin gigabytes while we trained;
# past this, zmq stops reading that connection and the sender's own queue holds the rest.
RCV_HWM = 4


@dataclass(frozen=True)
class Envelope:
    sender_key: str  # CURVE public key (z85) of the authenticated sender
    header: dict  # parsed but not yet validated (messages.parse does that)
    payload: memoryview | None
    nbytes: int


class KeyGate:
    """The CURVE client keys allowed onto our data plane in an admitted run.

    `allow` marks keys as seen now; a key stays allowed for `keep_s` after it was last seen,
    so one partial or failed DHT read does not lock admitted peers out mid-round. The ZAP
    handler thread calls `callback`; the swarm view's threads call `allow`."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self.own: str | None = None  # our own client key, always allowed
        self.denied = 0  # handshakes refused (only the ZAP thread writes it)
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def allow(self, keys: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._seen[k] = now
            for k in [k for k, t in self._seen.items() if now - t > self.keep_s]:
                del self._seen[k]

    def __contains__(self, key: str) -> bool:
        if key == self.own:
            return True
        with self._lock:
            t = self._seen.get(key)
        return t is not None and time.monotonic() - t <= self.keep_s

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: may this client key (z85) connect?"""
        k = key.decode("ascii", "replace")
        if k in self:
            return True
        self.denied += 1
        if k not in self._warned and len(self._warned) < 10_000:  # one line per key
            self._warned.add(k)
            log.warning("data plane: refused a connection from CURVE key %s (not admitted)", k)
        return False


class Transport:
    def __init__(
        self,
        host: str,
        port: int,
        announce_host: str | None,
        max_frame_bytes: int,
        gate: KeyGate | None = None,
    ) -> None:
        self.host, self.port, self.announce_host = host, port, announce_host
        self.max_frame_bytes = max_frame_bytes
        self.gate = gate  # None: an open run, any client key may connect
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.dropped = 0  # frames rejected before parsing (shown by tests and status)
        self.refused = 0  # frames from a key that is no longer admitted
        self._ctx: zmq.Context | None = None

    def start(self) -> None:
        self._ctx = zmq.Context()
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        pub, sec = zmq.curve_keypair()
        self._pub, self._sec = pub, sec
        if self.gate is None:
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            self.gate.own = pub.decode()
            self._auth.configure_curve_callback(domain="*", credentials_provider=self.gate)
        r = self._ctx.socket(zmq.ROUTER)
        r.curve_server = True
        r.curve_publickey, r.curve_secretkey = pub, sec
        # zmq drops a peer that sends more than this, before we allocate it in Python.
        r.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes + MAX_HEADER_BYTES)
        r.setsockopt(zmq.RCVHWM, RCV_HWM)
        r.linger = 0
        if self.port:
            r.bind(f"tcp://{self.host}:{self.port}")
            port = self.port
        else:
            port = r.bind_to_random_port(f"tcp://{self.host}")
        self._router, self._bound_port = r, port
        self._dealers = Dealers(self._ctx, pub, sec)
        self._poller = zmq.Poller()
        self._poller.register(r, zmq.POLLIN)

    @property
    def curve_key(self) -> str:
        return self._pub.decode()

    @property
    def denied(self) -> int:
        """Handshakes refused by ZAP plus frames refused afterwards (admitted runs)."""
        return (0 if self.gate is None else self.gate.denied) + self.refused

    def allow(self, keys: Iterable[str]) -> None:
        """The CURVE keys of admitted peers, as just read from the DHT (no-op if open)."""
        if self.gate is not None:
            self.gate.allow(keys)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.announce_host or self.host}:{self._bound_port}"

    def send(
        self,
        endpoint: str,
        server_key: str,
        header: dict,
        payload: bytes | memoryview | None = None,
    ) -> bool:
        """Queue one message for a peer without blocking; False if its queue is full."""
        frames: list = [pack_message(header)]
        if payload is not None:
            frames.append(payload)
        assert self._ctx is not None, "transport not started"
        try:
            self._dealers.send(endpoint, server_key, frames, copy=payload is None)
        except zmq.Again:
            # A stalled peer whose queue is full: the round will time out on it anyway.
            log.warning("send queue to %s is full; message %s dropped", endpoint, header["t"])
            return False
        self.bytes_sent += sum(len(f) if isinstance(f, bytes) else f.nbytes for f in frames)
        return True

    def recv(self, timeout_s: float) -> Envelope | None:
        """Next well-formed envelope within timeout_s, or None. Garbage is logged and dropped."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            if self._dealers.service():  # a link waits for its handshake: look again soon
                remaining = min(remaining, REDIAL_S)
            if not self._poller.poll(max(int(remaining * 1000), 0)):
                if time.monotonic() >= deadline:
                    return None
                continue
            env = self._read_one()
            if env is not None:
                return env
            if time.monotonic() >= deadline:
                return None

    def _read_one(self) -> Envelope | None:
        frames = self._router.recv_multipart(copy=False)
        size = sum(f.buffer.nbytes for f in frames[1:])
        self.bytes_recv += size
        key = frames[-1].get("User-Id") if len(frames) > 1 else None
        if len(frames) not in (2, 3) or not key:
            return self._drop(f"{len(frames)} frames from {key}")
        if self.gate is not None and key not in self.gate:
            self.refused += 1
            log.debug("dropped a frame from %s: not admitted (any longer)", key)
            return None
        if frames[1].buffer.nbytes > MAX_HEADER_BYTES:
            return self._drop(f"header of {frames[1].buffer.nbytes} bytes from {key}")
        payload = frames[2].buffer if len(frames) == 3 else None
        if payload is not None and payload.nbytes > self.max_frame_bytes:
            return self._drop(f"payload of {payload.nbytes} bytes from {key}")
        try:
            h = unpack_message(frames[1].buffer, max_bytes=MAX_HEADER_BYTES)
        except WireError as e:
            return self._drop(f"unparseable header from {key}: {e}")
        if not isinstance(h.get("t"), str):
            return self._drop(f"header without a kind from {key}")
        return Envelope(key, h, payload, size)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning("dropped malformed frame: %s", why)
        return None

    def close(self) -> None:
        if self._ctx is None:
            return
        self._dealers.close()
        self._router.close(0)
        self._auth.stop()
        self._ctx.term()
        self._ctx = None
