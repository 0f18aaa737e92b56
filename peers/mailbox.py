"""The inbox of one peer: validated messages, scoped to the round we are working on.

Messages from different senders race: a member may get a PART from a fast peer before the
leader's BEGIN reaches it, or a JOIN for the next step while it is still committing this
one. So messages that are not wanted right now but may be soon (same or later epoch/step)
wait in a bounded buffer; older ones are dropped. Malformed ones are logged and dropped by
`messages.parse`, never raised to the round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from compression.wire import WireLimits
from peers.consensus import MAX_ATTEMPT_LEAP
from peers.errors import Malformed, RoundFailed
from peers.messages import Msg, header, parse
from peers.transport import Transport

log = logging.getLogger(__name__)

MAX_PENDING = 4096


class Mailbox:
    def __init__(
        self, transport: Transport, run: str, me: str, limits: WireLimits, max_pending_bytes: int
    ) -> None:
        self.transport, self.run, self.me, self.limits = transport, run, me, limits
        self.max_pending_bytes = max_pending_bytes
        self.scope = (0, 0, 0)  # (epoch, step, attempt) of the round in progress
        self.closing = threading.Event()  # set by Swarm.shutdown: leave the round now
        self._pending: deque[Msg] = deque()
        self._pending_bytes = 0

    def bound(self, frame_bytes: int) -> None:
        """Limit frames (and the early-traffic buffer) to what this round can carry: a
        shard is at most our whole encoded vector, whatever zmq's static cap allows."""
        self.limits = replace(self.limits, max_frame_bytes=frame_bytes)
        self.max_pending_bytes = 4 * frame_bytes

    def set_scope(self, epoch: int, step: int, attempt: int) -> None:
        self.scope = (epoch, step, attempt)
        kept: deque[Msg] = deque()
        for m in self._pending:
            if self._relevant(m):
                kept.append(m)
            else:
                self._pending_bytes -= m.nbytes
        self._pending = kept

    def _relevant(self, m: Msg) -> bool:
        epoch, step, attempt = self.scope
        if m.attempt > attempt + MAX_ATTEMPT_LEAP and (m.epoch, m.step) == (epoch, step):
            return False  # an attempt bomb (consensus.attempt_ceiling): never worth keeping
        if (m.epoch, m.step) != (epoch, step):
            # Only the next step's early traffic is worth keeping (a peer one round ahead;
            # a growth moves the epoch on too). Frames for step+1000 are a flood: buffered,
            # they would pin memory until the buffer's byte bound.
            return m.step == step + 1 and m.epoch in (epoch, epoch + 1)
        # Traffic of an earlier attempt is dead; only a stale JOIN still deserves a RETRY.
        return m.kind == "JOIN" or m.attempt >= attempt

    def send(
        self,
        endpoint: str,
        key: str,
        kind: str,
        /,
        *,
        attempt: int | None = None,
        payload: bytes | None = None,
        **body: object,
    ) -> bool:
        epoch, step, cur = self.scope
        h = header(
            kind, self.run, epoch, step, cur if attempt is None else attempt, self.me, **body
        )
        return self.transport.send(endpoint, key, h, payload)

    def get(self, deadline: float, want: Callable[[Msg], bool]) -> Msg | None:
        """The first wanted message (buffered first, then new) before `deadline` (monotonic)."""
        for m in self._pending:
            if want(m):
                self._pending.remove(m)
                self._pending_bytes -= m.nbytes
                return m
        while True:
            if self.closing.is_set():
                raise RoundFailed("the swarm is shutting down")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            env = self.transport.recv(min(remaining, 0.25))  # short: notice `closing` soon
            if env is None:
                continue
            try:
                m = parse(
                    env.header, self.run, env.sender_key, env.payload, env.nbytes, self.limits
                )
            except Malformed as e:
                self.transport.dropped += 1
                log.warning(
                    "dropped malformed %s message from %s: %s",
                    str(env.header.get("t"))[:16],
                    env.sender_key,
                    e,
                )
                continue
            if want(m):
                return m
            if self._relevant(m):
                self._keep(m)
            else:
                log.debug("dropped stale %s for %s/%s from %s", m.kind, m.epoch, m.step, m.sender)

    def pump(self, until: float) -> None:
        """Move arrived messages into the buffer until `until`, e.g. while gathering."""
        self.get(until, lambda m: False)

    def _keep(self, m: Msg) -> None:
        self._pending.append(m)
        self._pending_bytes += m.nbytes
        # Bounded: a flood (or a peer far ahead) must not grow memory without limit.
        while self._pending and (
            len(self._pending) > MAX_PENDING or self._pending_bytes > self.max_pending_bytes
        ):
            old = self._pending.popleft()
            self._pending_bytes -= old.nbytes
            log.warning("inbox full: dropped buffered %s from %s", old.kind, old.sender)
