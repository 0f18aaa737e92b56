"""Outgoing data-plane connections: one CURVE DEALER per remote peer, redialled when refused.

In an admitted run a remote's ZAP handler refuses our key until its view has read our
admitted record (transport.py), which can take a heartbeat after we start or restart.
libzmq (4.3.5 with pyzmq 27, measured) treats that refusal as a protocol error: the client
drops the connection for good, never reconnects (unlike after a broken TCP connection), and
discards what was queued on it. Sends then find no pipe (EAGAIN), though for a while the dead
pipe may still look writable and swallow a message or two.

So every new DEALER gets a socket monitor until its first handshake succeeds. On a refusal
the link is dialled again every `REDIAL_S` for up to `REDIAL_FOR_S`, and the control
messages (no payload) sent since the DEALER was created are sent again on the new
connection; once a handshake succeeds they are known delivered and the monitor goes. A
newcomer's JOIN thus reaches a leader within about a heartbeat of that leader reading the
newcomer's record, instead of after the follower's reply timeout. Payload frames (shards)
are never replayed: a round that lost one aborts and retries anyway. A connection that is
refused later (after a success) shows as a full queue (EAGAIN): that send is lost, and the
next one dials a new connection, monitored again.

All of it runs on the thread that owns the transport (the caller of send/recv).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

# Cached outgoing connections; the least recently used is closed beyond this. Above the
# largest group (records.MAX_MEMBERS), so a round never closes a member's connection.
MAX_DEALERS = 1100
EVICT_LINGER_MS = 2000  # an evicted connection still delivers what it has queued
REDIAL_S = 0.5  # a refused link is dialled again this often...
REDIAL_FOR_S = 30.0  # ...for this long after its first refusal, then given up
MAX_REPLAY = 16  # control messages kept per link until its handshake succeeds
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH


@dataclass
class _Link:
    sock: zmq.Socket
    monitor: zmq.Socket | None  # until a handshake succeeds; then None
    replay: deque = field(default_factory=lambda: deque(maxlen=MAX_REPLAY))
    refused_since: float | None = None  # first refusal of this streak (monotonic)
    redial_at: float | None = None  # refused: when to dial again; None: dialling/connected


class Dealers:
    def __init__(self, ctx: zmq.Context, public: bytes, secret: bytes) -> None:
        self._ctx, self._pub, self._sec = ctx, public, secret
        self._links: OrderedDict[tuple[str, str], _Link] = OrderedDict()
        self.redials = 0  # connections dialled again after a refusal (tests, logs)

    def send(self, endpoint: str, server_key: str, frames: list, copy: bool) -> None:
        """Queue frames for a peer without blocking; zmq.Again if its queue is full."""
        k = (endpoint, server_key)
        link = self._links.get(k)
        if link is None:
            link = self._dial(k)
        else:
            self._links.move_to_end(k)
        if link.monitor is not None and len(frames) == 1:
            link.replay.append(frames[0])  # not known delivered until a handshake succeeds
        if link.redial_at is not None:
            return  # refused: the next redial carries it (if it is a control message)
        try:
            link.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            if link.monitor is not None:
                self._read_events(k, link, time.monotonic())
                if link.redial_at is not None:
                    return  # refused: the next redial carries it
            # A stalled peer's full queue, or a connection refused after an earlier success
            # (libzmq dropped its pipe): either way the next send starts a new connection.
            self._drop(k)
            raise

    def service(self) -> bool:
        """Read handshake events, redial refused links. True while some link awaits its
        first handshake (the caller should come back within REDIAL_S)."""
        now, pending = time.monotonic(), False
        for k, link in list(self._links.items()):
            if link.monitor is None:
                continue
            self._read_events(k, link, now)
            if link.redial_at is not None and now >= link.redial_at:
                assert link.refused_since is not None
                if now - link.refused_since > REDIAL_FOR_S:
                    log.info("data plane: %s still refuses us; giving up on it", k[0])
                    self._drop(k)
                    continue
                link = self._redial(k, link)
            pending = pending or link.monitor is not None
        return pending

    def close(self) -> None:
        for link in self._links.values():
            _close(link, linger=1000)  # a vote sent just before shutdown should still leave
        self._links.clear()

    def _read_events(self, k: tuple[str, str], link: _Link, now: float) -> None:
        while link.monitor is not None:
            try:
                event = parse_monitor_message(link.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.sock.disable_monitor()
                link.monitor.close(0)
                link.monitor = link.refused_since = link.redial_at = None
                link.replay.clear()
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if link.refused_since is None:
                    log.info("data plane: %s refused our key (not admitted there yet)", k[0])
                    link.refused_since = now
                link.redial_at = now + REDIAL_S

    def _redial(self, k: tuple[str, str], old: _Link) -> _Link:
        link = self._dial(k)  # (closes the old one)
        link.replay, link.refused_since = old.replay, old.refused_since
        self.redials += 1
        for frame in link.replay:
            try:
                link.sock.send(frame, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
        return link

    def _dial(self, k: tuple[str, str]) -> _Link:
        endpoint, server_key = k
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
        monitor = s.get_monitor_socket(_EVENTS)
        s.connect(endpoint)
        self._drop(k)
        link = self._links[k] = _Link(s, monitor)
        while len(self._links) > MAX_DEALERS:
            _, oldest = self._links.popitem(last=False)
            _close(oldest, linger=EVICT_LINGER_MS)  # non-blocking: zmq's reaper sends the rest
        return link

    def _drop(self, k: tuple[str, str]) -> None:
        link = self._links.pop(k, None)
        if link is not None:
            _close(link, linger=0)


def _close(link: _Link, linger: int) -> None:
    if link.monitor is not None:
        link.sock.disable_monitor()
        link.monitor.close(0)
        link.monitor = None
    link.sock.close(linger=linger)
