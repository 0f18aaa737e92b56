"""The data phase of a round: reduce-scatter + all-gather of encoded shards, then commit.

With P members sorted by peer id, the flat vector is cut into P block-aligned shards and
member k reduces shard k:
1. every member sends shard k of its own encoding to member k (PART);
2. member k decodes the P contributions, takes the weight-weighted fp32 mean, encodes it
   ONCE and sends those same bytes to everyone (REDUCED);
3. every member decodes the same P reduced frames, so the result is bit-identical on all
   members; it sends DONE with a sha256 of those frames to the leader;
4. the leader sends COMMIT once every member reported the same digest. The result is
   returned (applied) only on COMMIT, so a round is applied whole or not at all.
A member that hears nothing new for `phase_timeout_s`, or gets an invalid shard from an
authenticated member, broadcasts ABORT; nothing is applied and everyone retries.
Bytes per member: 2·(P−1)/P·N codes (+ scales and small headers).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import NoReturn

import torch

from compression.codec import Codec, Encoded, get_codec, shard_bounds
from compression.wire import pack
from peers.errors import Malformed, RoundAborted, RoundFailed
from peers.group import Group
from peers.mailbox import Mailbox
from peers.messages import ROUND_KINDS, Member, Msg

log = logging.getLogger(__name__)
Hook = Callable[[str, int], None]  # (phase, step): test hook for fault injection


class RoundRunner:
    def __init__(
        self, mb: Mailbox, me: str, phase_timeout_s: float, hook: Hook | None = None
    ) -> None:
        self.mb, self.me, self.phase_timeout_s, self.hook = mb, me, phase_timeout_s, hook

    def run(self, g: Group, local: Encoded, deadline: float) -> torch.Tensor:
        """Average `local` with the group; returns the committed mean (fp32, local.shape)."""
        self.mb.set_scope(g.epoch, g.step, g.attempt)
        members = g.members
        n_members, i = len(members), [m.peer_id for m in members].index(self.me)
        bounds = shard_bounds(local.numel, local.align, n_members)
        codec = get_codec(local.codec, local.block_size)
        marks = [("start", time.monotonic())]  # phase timeline for the debug log
        for k, m in enumerate(members):
            if k != i:
                self._send(m, "PART", g, payload=pack(local.slice(*bounds[k])), shard=k)
        marks.append(("parts_sent", time.monotonic()))
        self._hook("after_parts", g.step)

        acc = _Accumulator(members, bounds[i][1] - bounds[i][0], codec)
        acc.add(i, local.slice(*bounds[i]))
        mean = torch.empty(local.numel, dtype=torch.float32)
        reduced: dict[int, bytes] = {}  # the exact frames, hashed in shard order below
        dones: dict[int, str] = {}
        progress = time.monotonic()
        while len(reduced) < n_members:
            if acc.complete and i not in reduced:
                marks.append(("parts_in", time.monotonic()))
                enc = codec.encode(acc.total)  # encoded ONCE; everyone decodes these bytes
                reduced[i] = pack(enc)
                for k, m in enumerate(members):
                    if k != i:
                        self._send(m, "REDUCED", g, payload=reduced[i], shard=i)
                mean[bounds[i][0] : bounds[i][1]] = codec.decode(enc).view(-1)
                marks.append(("reduced_sent", time.monotonic()))
                continue
            msg, k = self._next(g, min(deadline, progress + self.phase_timeout_s))
            if msg.kind == "PART" and msg.body["shard"] == i and not acc.has(k):
                acc.add(k, self._shard(g, msg, bounds[i], local))
            elif msg.kind == "REDUCED" and msg.body["shard"] == k and k not in reduced:
                enc = self._shard(g, msg, bounds[k], local)
                mean[bounds[k][0] : bounds[k][1]] = codec.decode(enc).view(-1)
                reduced[k] = bytes(msg.payload)
            elif msg.kind == "DONE":
                dones[k] = msg.body["digest"]  # an early DONE for the leader: keep it
                continue
            else:
                log.warning(
                    "dropped unexpected %s (shard %s) from %s in round %s",
                    msg.kind,
                    msg.body.get("shard"),
                    msg.sender,
                    g.rid,
                )
                continue
            progress = time.monotonic()
        self._hook("after_reduce", g.step)
        digest = hashlib.sha256()
        for k in range(n_members):
            digest.update(reduced[k])
        marks.append(("decoded", time.monotonic()))
        self._commit(g, i, digest.hexdigest(), dones, deadline)
        marks.append(("committed", time.monotonic()))
        log.debug(
            "round %s timeline (ms): %s",
            g.rid,
            " ".join(f"{name}={1000 * (t - marks[0][1]):.0f}" for name, t in marks[1:]),
        )
        return mean.view(local.shape)

    def _commit(
        self, g: Group, i: int, digest: str, dones: dict[int, str], deadline: float
    ) -> None:
        """Two-phase end: DONE to the leader, COMMIT from it. Returns only once committed."""
        until = min(deadline, time.monotonic() + self.phase_timeout_s)
        if g.leader.peer_id != self.me:
            self._send(g.leader, "DONE", g, digest=digest)
            self._hook("before_commit", g.step)
            while True:
                msg, _ = self._next(g, until)
                if msg.kind == "COMMIT" and msg.sender == g.leader.peer_id:
                    if msg.body["digest"] != digest:
                        self._abort(g, "COMMIT digest differs from our reduced bytes")
                    return
        dones[i] = digest
        while len(dones) < len(g.members):
            msg, k = self._next(g, until)
            if msg.kind == "DONE":
                dones[k] = msg.body["digest"]
        if len(set(dones.values())) != 1:
            self._abort(g, f"members reduced different bytes: {sorted(set(dones.values()))}")
        self._hook("before_commit", g.step)
        for k, m in enumerate(g.members):
            if k != i:
                self._send(m, "COMMIT", g, digest=digest)

    def _next(self, g: Group, until: float) -> tuple[Msg, int]:
        """Next message of this round from an authenticated member, answering late JOINs."""
        index = {m.peer_id: k for k, m in enumerate(g.members)}
        while True:
            try:
                msg = self.mb.get(
                    until,
                    lambda m: (
                        (m.kind in ROUND_KINDS and m.rid == g.rid)
                        or (m.kind == "JOIN" and (m.epoch, m.step) == (g.epoch, g.step))
                    ),
                )
            except RoundFailed:  # we are shutting down: tell the others instead of stalling them
                self._abort(g, "a member is leaving the swarm", RoundFailed)
            if msg is None:
                self._abort(g, f"no progress for {self.phase_timeout_s:.1f}s")
            if msg.kind == "JOIN":
                a = msg.body["ann"]  # too late for this round: tell it to wait for the outcome
                self.mb.send(a.endpoint, a.curve_key, "FORMED", attempt=msg.attempt)
                continue
            k = index.get(msg.sender)
            if k is None or g.members[k].curve_key != msg.sender_key:
                log.warning(
                    "dropped %s claiming to be %s: not signed by a member of round %s",
                    msg.kind,
                    msg.sender,
                    g.rid,
                )
                self.mb.transport.dropped += 1
                continue
            if msg.kind == "ABORT":
                raise RoundAborted(
                    f"{msg.sender} aborted: {msg.body['reason']}", next_attempt=g.attempt + 1
                )
            return msg, k

    def _shard(self, g: Group, msg: Msg, bound: tuple[int, int], local: Encoded) -> Encoded:
        """The shard of an authenticated member, if it fits; an invalid one aborts the round."""
        assert msg.enc is not None  # messages.parse unpacked and validated the frame
        try:
            check_shard(msg.enc, bound, local)
        except Malformed as e:
            self.mb.transport.dropped += 1
            log.warning("invalid %s from member %s in round %s: %s", msg.kind, msg.sender, g.rid, e)
            self._abort(g, f"invalid {msg.kind} from {msg.sender}")
        return msg.enc

    def _send(
        self, m: Member, kind: str, g: Group, payload: bytes | None = None, **body: object
    ) -> None:
        self.mb.send(
            m.endpoint, m.curve_key, kind, attempt=g.attempt, payload=payload, rid=g.rid, **body
        )

    def _abort(self, g: Group, reason: str, exc: type[Exception] = RoundAborted) -> NoReturn:
        log.warning(
            "aborting round %s (epoch %d step %d attempt %d): %s",
            g.rid,
            g.epoch,
            g.step,
            g.attempt,
            reason,
        )
        for m in g.members:
            if m.peer_id != self.me:
                self._send(m, "ABORT", g, reason=reason[:500])
        if exc is RoundAborted:
            raise RoundAborted(reason, next_attempt=g.attempt + 1)
        raise exc(reason)

    def _hook(self, phase: str, step: int) -> None:
        if self.hook is not None:
            self.hook(phase, step)


class _Accumulator:
    """Weighted fp32 sum of one shard's contributions. Parts are decoded and added as soon
    as they arrive (overlapping the network), but always in member order, so the reducer's
    result does not depend on arrival order."""

    def __init__(self, members: tuple[Member, ...], numel: int, codec: Codec) -> None:
        total = sum(m.weight for m in members)
        n = len(members)
        self.weights = [m.weight / total if total > 0 else 1.0 / n for m in members]
        self.total = torch.zeros(numel, dtype=torch.float32)
        self.codec, self._next, self._waiting = codec, 0, {}

    def add(self, k: int, enc: Encoded) -> None:
        self._waiting[k] = enc
        while self._next in self._waiting:
            x = self.codec.decode(self._waiting.pop(self._next)).view(-1)
            self.total.add_(x, alpha=self.weights[self._next])
            self._next += 1

    def has(self, k: int) -> bool:
        return k < self._next or k in self._waiting

    @property
    def complete(self) -> bool:
        return self._next == len(self.weights)


def check_shard(enc: Encoded, bound: tuple[int, int], local: Encoded) -> None:
    """A shard must use our codec and block size and cover exactly [start, end)."""
    if (enc.codec, enc.block_size) != (local.codec, local.block_size):
        raise Malformed(
            f"codec {enc.codec}/{enc.block_size}, expected {local.codec}/{local.block_size}"
        )
    if enc.shape != (bound[1] - bound[0],):
        raise Malformed(f"shape {enc.shape}, expected ({bound[1] - bound[0]},)")
