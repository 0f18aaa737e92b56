"""The data phase of a round: reduce-scatter + all-gather of encoded shards, then the vote.

With P members sorted by peer id, the flat vector is cut into P block-aligned shards and
member k reduces shard k:
1. every member sends shard k of its own encoding to member k (PART);
2. member k decodes the P contributions, takes the weight-weighted fp32 mean, encodes it
   ONCE and sends those same bytes to everyone (REDUCED);
3. every member decodes the same P reduced frames, so the result is bit-identical on all
   members; it sends DONE with a sha256 of those frames to *every* member;
4. a member commits when it holds DONE from every member with its own digest. No leader
   decides, so no leader can commit after a follower gave up, and a stalled member cannot
   half-apply a round: the commit point is "all P votes cast", the same fact for everyone.

State machine of one member in one attempt (phases are published in its heartbeat record):

    forming --BEGIN--> data --all REDUCED decoded, DONE sent--> voted --all DONEs--> committed
       |                 |                                        |
       |                 +--timeout / bad shard / ABORT--> aborted |--ABORT or a DONE that
       |                                                           |  differs--> aborted
       +--RETRY/REDIRECT/timeout--> (next attempt)                 +--timeout--> stuck
    stuck --outcome.resolve(records of the members)--> committed | aborted

Before voting a member may abort at any time (it sent no DONE, so nobody can commit).
After voting it never guesses: it commits only on all DONEs, and if they do not come in
time it learns the outcome from the members' records (outcome.py) before anything else.
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
from peers.outcome import ABORT, COMMIT, resolve
from peers.records import PeerRecord

log = logging.getLogger(__name__)
Hook = Callable[[str, int], None]  # (phase, step): test hook for fault injection


class RoundRunner:
    def __init__(
        self,
        mb: Mailbox,
        me: str,
        phase_timeout_s: float,
        on_phase: Callable[[Group, str], None],
        records: Callable[[], dict[str, PeerRecord]],
        poll_s: float,
        hook: Hook | None = None,
    ) -> None:
        self.mb, self.me, self.phase_timeout_s, self.hook = mb, me, phase_timeout_s, hook
        # on_phase publishes our phase in the heartbeat record; records() reads the
        # members' live records (fresh from the DHT) when we are stuck.
        self.on_phase, self.records, self.poll_s = on_phase, records, poll_s
        self._voted = False

    def run(self, g: Group, local: Encoded, deadline: float) -> torch.Tensor:
        """Average `local` with the group; returns the committed mean (fp32, local.shape)."""
        self.mb.set_scope(g.epoch, g.step, g.attempt)
        self._voted = False
        self._phase(g, "data")
        members = g.members
        n_members, i = len(members), [m.peer_id for m in members].index(self.me)
        bounds = shard_bounds(local.numel, local.align, n_members)
        codec = get_codec(local.codec, local.block_size)
        marks = [("start", time.monotonic())]  # phase timeline for the debug log
        for k, m in enumerate(members):
            if k != i:
                self._send(m, "PART", g, payload=pack(local.slice(*bounds[k])), shard=k)
        marks.append(("parts_sent", time.monotonic()))
        self._hook("after_parts", g.step, g)

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
                dones[k] = msg.body["digest"]  # a vote that beat our decoding: keep it
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
        self._hook("after_reduce", g.step, g)
        digest = hashlib.sha256()
        for k in range(n_members):
            digest.update(reduced[k])
        marks.append(("decoded", time.monotonic()))
        self._vote(g, i, digest.hexdigest(), dones, deadline)
        marks.append(("committed", time.monotonic()))
        log.debug(
            "round %s timeline (ms): %s",
            g.rid,
            " ".join(f"{name}={1000 * (t - marks[0][1]):.0f}" for name, t in marks[1:]),
        )
        return mean.view(local.shape)

    def _vote(self, g: Group, i: int, digest: str, dones: dict[int, str], deadline: float) -> None:
        """Send DONE to everyone; return once committed (all DONEs), raise once aborted."""
        self._phase(g, "voted")
        self._voted = True
        sent = 0
        for k, m in enumerate(g.members):
            if k != i:
                self._send(m, "DONE", g, digest=digest)
                sent += 1
                if sent == 1:
                    self._hook("mid_done", g.step, g)  # a fault here: some members have our vote
        dones[i] = digest
        until = min(deadline, time.monotonic() + self.phase_timeout_s)
        while len(dones) < len(g.members):
            try:
                msg, k = self._next(g, until, abort_on_silence=False)
            except RoundAborted:  # its sender did not hold every vote: we cannot either
                self._phase(g, "aborted")
                raise
            if msg is None:
                return self._stuck(g, deadline)
            if msg.kind == "DONE":
                dones[k] = msg.body["digest"]
                if dones[k] != digest:
                    # Nobody can hold P equal votes now: aborting is safe for everyone.
                    self._abort(g, f"{msg.sender} reduced different bytes ({dones[k][:12]}…)")
        self._hook("before_commit", g.step, g)
        self._phase(g, "committed")

    def _stuck(self, g: Group, deadline: float) -> None:
        """We voted and did not hear every vote: learn the outcome from the members."""
        self._phase(g, "stuck")
        where = (g.epoch, g.step, g.attempt)
        members = [m.peer_id for m in g.members]
        # Members still "data"/"voted" after this long are as good as dead (they would have
        # timed out themselves long ago), so the wait is bounded even if records go quiet.
        give_up = min(deadline, time.monotonic() + 3 * self.phase_timeout_s)
        log.warning("round %s: voted but not every DONE came; asking the members", g.rid)
        while True:
            decision = resolve(self.me, where, g.rid, members, self.records())
            if decision is None and time.monotonic() >= give_up:
                decision = ABORT
                log.warning("round %s: members undecided past the bound; aborting", g.rid)
            if decision == COMMIT:
                log.info("round %s: a member committed it; committing too", g.rid)
                self._phase(g, "committed")
                return
            if decision == ABORT:
                self._phase(g, "aborted")
                raise RoundAborted(
                    "round aborted (learned from the members' records)", next_attempt=g.attempt + 1
                )
            try:  # an ABORT while we wait also settles it; late DONEs no longer count
                msg, _ = self._next(g, time.monotonic() + self.poll_s, abort_on_silence=False)
            except RoundAborted:
                self._phase(g, "aborted")
                raise

    def _next(
        self, g: Group, until: float, abort_on_silence: bool = True
    ) -> tuple[Msg | None, int]:
        """Next message of this round from an authenticated member, answering late JOINs.

        Silence until `until` aborts the round, or returns (None, -1) after we voted."""
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
            except RoundFailed:  # we are shutting down
                if self._voted:
                    # Our vote is out: an ABORT now could split the members (some may hold
                    # every vote). Go silent; they settle it from the records (outcome.py).
                    raise
                self._abort(g, "a member is leaving the swarm", RoundFailed)
            if msg is None:
                if not abort_on_silence:
                    return None, -1
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

    def _phase(self, g: Group, phase: str) -> None:
        self.on_phase(g, phase)

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
        self._phase(g, "aborted")
        if exc is RoundAborted:
            raise RoundAborted(reason, next_attempt=g.attempt + 1)
        raise exc(reason)

    def _hook(self, phase: str, step: int, g: Group | None = None) -> None:
        if self.hook is not None:
            self.hook(phase, step)
            if g is not None and g.leader.peer_id == self.me:
                self.hook("leader_" + phase, step)  # faults aimed at whoever leads


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
