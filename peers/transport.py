"""The data plane: one CURVE-encrypted zmq ROUTER per peer, plus one DEALER per remote peer.

Messages are one-way: we send through a DEALER connected to the other peer's ROUTER, and
replies come back to our own ROUTER. So there is exactly one inbox per peer, and no socket is
ever shared between "request" and "reply" state.

Why CURVE with a ZAP handler: the ROUTER is a CURVE server (its public key is published in
our signed DHT record, so connecting clients know they talk to us), and every DEALER uses
this peer's own keypair as its client key. With an authenticator that accepts any client key,
zmq stamps each received frame with the sender's public key ("User-Id"); rounds compare it
with the member's published key, so a member's messages cannot be forged.

Threading: zmq sockets are not thread-safe. All sockets here are used only by the thread that
runs `Swarm.all_reduce` (the Swarm serialises callers with a lock); the authenticator runs
in its own thread with its own socket, as zmq intends.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from compression.wire import WireError, pack_message, unpack_message

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 1 << 20
# Cached outgoing connections; the least recently used is closed beyond this. Above the
# largest group (records.MAX_MEMBERS), so a round never closes a member's connection.
MAX_DEALERS = 1100
EVICT_LINGER_MS = 2000  # an evicted connection still delivers what it has queued
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


class Transport:
    def __init__(
        self, host: str, port: int, announce_host: str | None, max_frame_bytes: int
    ) -> None:
        self.host, self.port, self.announce_host = host, port, announce_host
        self.max_frame_bytes = max_frame_bytes
        self.bytes_sent = 0
        self.bytes_recv = 0
        self.dropped = 0  # frames rejected before parsing (shown by tests and status)
        self._dealers: OrderedDict[tuple[str, str], zmq.Socket] = OrderedDict()
        self._ctx: zmq.Context | None = None

    def start(self) -> None:
        self._ctx = zmq.Context()
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        pub, sec = zmq.curve_keypair()
        self._pub, self._sec = pub, sec
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
        self._poller = zmq.Poller()
        self._poller.register(r, zmq.POLLIN)

    @property
    def curve_key(self) -> str:
        return self._pub.decode()

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
        try:
            self._dealer(endpoint, server_key).send_multipart(
                frames, flags=zmq.NOBLOCK, copy=payload is None
            )
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
            if not self._poller.poll(max(int(remaining * 1000), 0)):
                return None
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

    def _dealer(self, endpoint: str, server_key: str) -> zmq.Socket:
        k = (endpoint, server_key)
        s = self._dealers.get(k)
        if s is not None:
            self._dealers.move_to_end(k)
            return s
        assert self._ctx is not None, "transport not started"
        s = self._ctx.socket(zmq.DEALER)
        s.curve_serverkey = server_key.encode()
        s.curve_publickey, s.curve_secretkey = self._pub, self._sec
        s.linger = 0  # never block shutdown on a dead peer's queue
        # zmq heartbeats: a connection silenced by a partition is detected and redialled in
        # about a second after the network heals, instead of at TCP's next retransmission
        # (which backs off to minutes).
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        s.setsockopt(zmq.CONNECT_TIMEOUT, 1000)
        s.connect(endpoint)
        self._dealers[k] = s
        while len(self._dealers) > MAX_DEALERS:
            _, old = self._dealers.popitem(last=False)
            old.close(linger=EVICT_LINGER_MS)  # non-blocking: zmq's reaper sends the rest
        return s

    def close(self) -> None:
        if self._ctx is None:
            return
        for s in self._dealers.values():
            # Brief linger: a vote (DONE) sent just before shutdown should still leave, but a
            # dead peer's queue must not hold shutdown up.
            s.close(linger=1000)
        self._dealers.clear()
        self._router.close(0)
        self._auth.stop()
        self._ctx.term()
        self._ctx = None
