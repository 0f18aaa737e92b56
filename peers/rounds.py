"""The data phase of a round: reduce-scatter + all-gather of encoded shards, then the vote.

With P members sorted by peer id, the flat vector is cut into P block-aligned shards and
member k reduces shard k:
1. every member sends shard k of its own encoding to member k (PART);
2. member k decodes the P contributions and takes their robust weighted mean (robust.py:
   invalid, non-finite and outlying contributions are left out, weights capped, the rest
   clipped around a robust centre), encodes it ONCE and sends those same bytes to everyone
   (REDUCED, naming the members it left out, who are blamed: blame.py);
3. every member checks each reduced shard (finite; a size an honest average can have,
   next to its own part of it and to the other shards: _check_means), decodes the same P
   frames, so the result is bit-identical on all members, and sends DONE to *every*
   member: a digest of the group as BEGIN described it (members, weights, votes) and of
   every reduced shard;
4. a member commits when it holds DONE from every member with its own digest. No leader
   decides, so no leader can commit after a follower gave up, and a stalled member cannot
   half-apply a round: the commit point is "all P votes cast", the same fact for everyone.
   A leader that described the group differently to different members, or a reducer that
   sent different bytes to different members, makes the votes differ: nobody commits, and
   the differing part of the DONE names the culprit.

Every abort names its culprits where it can (a missing or invalid frame we were owed);
they sit out the retries of this step and are banned after repeated offences (blame.py).

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

from compression.codec import LAYOUTS, Codec, Encoded, get_codec, reduced_name, shard_bounds
from compression.wire import pack
from peers.blame import Blame, Offence
from peers.consensus import vote_hash
from peers.errors import Malformed, RoundAborted, RoundFailed
from peers.group import Group
from peers.mailbox import Mailbox
from peers.messages import MAX_CULPRITS, ROUND_KINDS, Member, Msg
from peers.outcome import ABORT, COMMIT, resolve
from peers.records import PeerRecord
from peers.robust import RobustConfig, aggregate, check_reduced
from peers.schema import canonical_bytes

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
        blame: Blame,
        robust: RobustConfig,
        hook: Hook | None = None,
    ) -> None:
        self.mb, self.me, self.phase_timeout_s, self.hook = mb, me, phase_timeout_s, hook
        # on_phase publishes our phase in the heartbeat record; records() reads the
        # members' live records (fresh from the DHT) when we are stuck.
        self.on_phase, self.records, self.poll_s = on_phase, records, poll_s
        self.blame, self.robust = blame, robust
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
        # The mean goes out in the codec's reduced form (the same codec, or a denser one
        # for sparse contributions): encoded once, decoded by everyone.
        mean_codec = get_codec(reduced_name(local.codec), local.block_size)
        marks = [("start", time.monotonic())]  # phase timeline for the debug log
        sent = 0
        for k, m in enumerate(members):
            if k != i:
                self._send(m, "PART", g, payload=pack(local.slice(*bounds[k])), shard=k)
                sent += 1
                if sent == 1:
                    self._hook("mid_parts", g.step, g)  # a fault here: some lack our PART
        marks.append(("parts_sent", time.monotonic()))
        self._hook("after_parts", g.step, g)

        # Contributions to our shard, decoded (None: invalid, left out of the mean).
        parts: dict[int, torch.Tensor | None] = {i: codec.decode(local.slice(*bounds[i])).view(-1)}
        mean = torch.empty(local.numel, dtype=torch.float32)
        reduced: dict[int, bytes] = {}  # the exact frames, hashed in shard order below
        rejected: dict[int, list[int]] = {}  # per shard: members its reducer left out
        dones: dict[int, dict] = {}
        progress = time.monotonic()
        while len(reduced) < n_members:
            if len(parts) == n_members and i not in reduced:
                marks.append(("parts_in", time.monotonic()))
                rejected[i], enc = self._reduce(
                    g, parts, mean_codec, LAYOUTS[local.codec].mean_over_senders
                )
                reduced[i] = pack(enc)  # encoded ONCE; everyone decodes these bytes
                for k, m in enumerate(members):
                    if k != i:
                        self._send(
                            m, "REDUCED", g, payload=reduced[i], shard=i, rejected=rejected[i]
                        )
                mean[bounds[i][0] : bounds[i][1]] = mean_codec.decode(enc).view(-1)
                marks.append(("reduced_sent", time.monotonic()))
                continue
            # A reducer can only send its REDUCED once it holds every PART: one that is
            # itself owed a PART (its sender crashed with frames in flight) is honest and
            # times out first, on the same clock. So we wait twice as long for REDUCEDs as
            # for PARTs: the stuck reducer's ABORT, naming the true culprit, reaches us
            # before we would blame it for the silence it did not cause.
            owe_parts = len(parts) < n_members
            patience = self.phase_timeout_s * (1 if owe_parts else 2)
            msg, k = self._next(g, min(deadline, progress + patience))
            if msg is None:
                # Silence: whoever still owes us a frame is the culprit (a withheld PART
                # or REDUCED must not stall this step: the culprit sits out the retry).
                owed = [k for k in range(n_members) if k not in parts]
                owed = owed or [k for k in range(n_members) if k not in reduced]
                self._abort(
                    g,
                    f"no progress for {patience:.1f}s",
                    culprits=[members[k].peer_id for k in owed],
                )
            if msg.kind == "PART" and msg.body["shard"] == i and k not in parts:
                parts[k] = self._part(g, msg, bounds[i], local, codec)
            elif msg.kind == "REDUCED" and msg.body["shard"] == k and k not in reduced:
                mean[bounds[k][0] : bounds[k][1]] = self._reduced(
                    g, msg, bounds[k], local, mean_codec
                )
                reduced[k], rejected[k] = bytes(msg.payload), msg.body["rejected"]
                for j in rejected[k]:
                    if j != i and j < n_members:  # the reducer's word: hearsay for us
                        self._offend(g, members[j].peer_id, f"rejected by reducer {k}", False)
            elif msg.kind == "DONE":
                dones[k] = msg.body  # a vote that beat our decoding: keep it
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
        self._check_means(g, mean, bounds, local, codec, i)
        vote = _ballot(g, reduced, rejected)
        marks.append(("decoded", time.monotonic()))
        self._vote(g, i, vote, dones, deadline)
        marks.append(("committed", time.monotonic()))
        log.debug(
            "round %s timeline (ms): %s",
            g.rid,
            " ".join(f"{name}={1000 * (t - marks[0][1]):.0f}" for name, t in marks[1:]),
        )
        return mean.view(local.shape)

    def _reduce(
        self,
        g: Group,
        parts: dict[int, torch.Tensor | None],
        mean_codec: Codec,
        over_senders: bool,
    ) -> tuple[list[int], Encoded]:
        """Our shard's robust mean (robust.py), encoded, and the members left out of it;
        over_senders: the codec's `Layout.mean_over_senders`."""
        n = len(g.members)
        invalid = [k for k in range(n) if parts[k] is None]
        valid = [k for k in range(n) if parts[k] is not None]
        agg = aggregate(
            [parts[k] for k in valid],  # type: ignore[misc]  # None filtered out above
            [g.members[k].weight for k in valid],
            self.robust,
            over_senders,
        )
        out = sorted(invalid + [valid[j] for j, _ in agg.rejected])
        for j, why in agg.rejected:
            self._offend(g, g.members[valid[j]].peer_id, f"contribution rejected: {why}", True)
        if agg.clipped:
            log.info(
                "round %s: clipped contributions of %s",
                g.rid,
                [g.members[valid[j]].peer_id for j in agg.clipped],
            )
        return out, mean_codec.encode(agg.mean)

    def _vote(self, g: Group, i: int, vote: dict, dones: dict[int, dict], deadline: float) -> None:
        """Send DONE to everyone; return once committed (all DONEs), raise once aborted."""
        self._phase(g, "voted")
        self._voted = True
        sent = 0
        for k, m in enumerate(g.members):
            if k != i:
                self._send(m, "DONE", g, **vote)
                sent += 1
                if sent == 1:
                    self._hook("mid_done", g.step, g)  # a fault here: some members have our vote
        for k, other in list(dones.items()):
            self._check_vote(g, vote, k, other)
        dones[i] = vote
        until = min(deadline, time.monotonic() + self.phase_timeout_s)
        while len(dones) < len(g.members):
            try:
                msg, k = self._next(g, until)
            except RoundAborted:  # its sender did not hold every vote: we cannot either
                self._phase(g, "aborted")
                raise
            if msg is None:
                return self._stuck(g, deadline)
            if msg.kind == "DONE":
                dones[k] = msg.body
                self._check_vote(g, vote, k, msg.body)
        self._hook("before_commit", g.step, g)
        self._phase(g, "committed")

    def _check_vote(self, g: Group, mine: dict, k: int, other: dict) -> None:
        """A vote that differs from ours: nobody can hold P equal votes, so aborting is safe
        for everyone. Its parts say who caused it: the leader (it described the group
        differently to different members) or a reducer (it sent different bytes)."""
        if other["digest"] == mine["digest"]:
            return
        sender = g.members[k].peer_id
        if other["group"] != mine["group"]:
            culprits = [g.leader.peer_id]
        else:
            n = len(g.members)
            culprits = [
                g.members[j].peer_id
                for j in range(min(n, len(other["shards"])))
                if other["shards"][j] != mine["shards"][j]
            ] or [sender]
        # Either those lied, or the sender lies about its vote: everyone involved sits out
        # the retry, and nobody gets a strike on such ambiguous evidence.
        self._abort(
            g,
            f"{sender} voted differently ({other['digest'][:12]}…)",
            culprits=sorted({*culprits, sender}),
            own=False,
        )

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
                self._next(g, time.monotonic() + self.poll_s)
            except RoundAborted:
                self._phase(g, "aborted")
                raise

    def _next(self, g: Group, until: float) -> tuple[Msg, int] | tuple[None, int]:
        """Next message of this round from an authenticated member, answering late JOINs;
        (None, -1) on silence until `until`. An ABORT raises RoundAborted."""
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
                self._abort(g, "a member is leaving the swarm", exc=RoundFailed)
            if msg is None:
                return None, -1
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
                culprits = [c for c in msg.body["culprits"] if c in index and c != msg.sender]
                if self.me not in msg.body["culprits"]:  # (if it names us, it is wrong)
                    self.blame.accusation(
                        msg.sender, culprits, g.epoch, g.step, msg.body["reason"][:120]
                    )
                raise RoundAborted(
                    f"{msg.sender} aborted: {msg.body['reason']}", next_attempt=g.attempt + 1
                )
            return msg, k

    def _part(
        self, g: Group, msg: Msg, bound: tuple[int, int], local: Encoded, codec: Codec
    ) -> torch.Tensor | None:
        """A member's contribution to our shard, decoded; None if it is invalid (it is left
        out of the mean and its sender blamed, but the round goes on without it)."""
        assert msg.enc is not None  # messages.parse unpacked and validated the frame
        try:
            check_shard(msg.enc, bound, local)
            x = codec.decode(msg.enc).view(-1)
        except (Malformed, ValueError, RuntimeError) as e:
            self.mb.transport.dropped += 1
            self._offend(g, msg.sender, f"invalid PART: {e}", True)
            return None
        return x

    def _reduced(
        self, g: Group, msg: Msg, bound: tuple[int, int], local: Encoded, codec: Codec
    ) -> torch.Tensor:
        """A reducer's shard of the mean (in `codec`, the reduced form), decoded, if it fits
        and is finite; anything else aborts the round, blaming the reducer. (Its size is
        judged once all shards are in: _check_means.)"""
        assert msg.enc is not None
        try:
            check_shard(msg.enc, bound, local, codec.name)
            x = codec.decode(msg.enc).view(-1)
            if not torch.isfinite(x).all():
                raise Malformed("non-finite values")
        except (Malformed, ValueError, RuntimeError) as e:
            self.mb.transport.dropped += 1
            self._abort(g, f"invalid REDUCED from {msg.sender}: {e}", culprits=[msg.sender])
        return x

    def _check_means(
        self,
        g: Group,
        mean: torch.Tensor,
        bounds: list[tuple[int, int]],
        local: Encoded,
        codec: Codec,
        i: int,
    ) -> None:
        """Before voting: is every reducer's shard of the mean a size an honest average can
        have? A shard fails when it is far larger than our own part of it (scaled by how
        many tokens the heaviest member brought against ours: a member that trained little
        has a small Δ) *and*, with three or more shards, far larger per element than the
        median shard. Either reference alone misfires on honest rounds: a late member's
        tiny Δ, or layers with different scales."""
        n = len(g.members)
        # Raw weights: a Δ grows with the steps behind it, capped or not.
        weights = [m.weight for m in g.members]
        scale = max(weights) / max(weights[i], 1e-30)
        rms = [float(mean[lo:hi].pow(2).mean().sqrt()) if hi > lo else 0.0 for lo, hi in bounds]
        typical = sorted(rms)[(n - 1) // 2]
        for k, (lo, hi) in enumerate(bounds):
            if k == i or hi <= lo:
                continue  # our own shard we reduced ourselves
            own = codec.decode(local.slice(lo, hi)).view(-1) * scale
            why = check_reduced(mean[lo:hi], own, self.robust)
            if why is not None and (n < 3 or rms[k] > self.robust.max_mean_ratio * typical):
                self.mb.transport.dropped += 1
                culprit = g.members[k].peer_id
                self._abort(g, f"reduced shard from {culprit} is insane: {why}", [culprit])

    def _offend(self, g: Group, peer_id: str, what: str, own: bool) -> None:
        self.blame.offend(Offence(peer_id, g.epoch, g.step, what, own))

    def _send(
        self, m: Member, kind: str, g: Group, payload: bytes | None = None, **body: object
    ) -> None:
        self.mb.send(
            m.endpoint, m.curve_key, kind, attempt=g.attempt, payload=payload, rid=g.rid, **body
        )

    def _phase(self, g: Group, phase: str) -> None:
        self.on_phase(g, phase)

    def _abort(
        self,
        g: Group,
        reason: str,
        culprits: list[str] = (),  # type: ignore[assignment]
        own: bool = True,
        exc: type[Exception] = RoundAborted,
    ) -> NoReturn:
        log.warning(
            "aborting round %s (epoch %d step %d attempt %d): %s",
            g.rid,
            g.epoch,
            g.step,
            g.attempt,
            reason,
        )
        culprits = [c for c in culprits if c != self.me][:MAX_CULPRITS]
        for c in culprits:
            self._offend(g, c, reason, own)
        for m in g.members:
            if m.peer_id != self.me:
                self._send(m, "ABORT", g, reason=reason[:500], culprits=culprits)
        self._phase(g, "aborted")
        if exc is RoundAborted:
            raise RoundAborted(reason, next_attempt=g.attempt + 1)
        raise exc(reason)

    def _hook(self, phase: str, step: int, g: Group | None = None) -> None:
        if self.hook is not None:
            self.hook(phase, step)
            if g is not None and g.leader.peer_id == self.me:
                self.hook("leader_" + phase, step)  # faults aimed at whoever leads


def group_digest(g: Group) -> str:
    """sha256 of the group as BEGIN described it to us: two members whose leader told them
    different member lists, weights or votes get different digests, so neither commits."""
    desc = [
        g.rid,
        g.epoch,
        g.step,
        g.attempt,
        g.params_hash,
        [
            [
                m.peer_id,
                m.endpoint,
                m.curve_key,
                m.weight,
                None if m.vote is None else vote_hash(m.vote),
            ]
            for m in g.members
        ],
    ]
    return hashlib.sha256(canonical_bytes(desc)).hexdigest()


def _ballot(g: Group, reduced: dict[int, bytes], rejected: dict[int, list[int]]) -> dict:
    """Our DONE: the digest of the group and of every reduced shard (bytes and who its
    reducer left out), and the parts, so a mismatch names its cause."""
    group = group_digest(g)
    shards = []
    for k in range(len(g.members)):
        h = hashlib.sha256(canonical_bytes(rejected.get(k, [])))
        h.update(reduced[k])
        shards.append(h.hexdigest())
    digest = hashlib.sha256((group + "".join(shards)).encode()).hexdigest()
    return {"digest": digest, "group": group, "shards": shards}


def check_shard(
    enc: Encoded, bound: tuple[int, int], local: Encoded, codec: str | None = None
) -> None:
    """A shard must use our codec (or `codec`: a mean's reduced form) and block size and
    cover exactly [start, end)."""
    want = codec or local.codec
    if (enc.codec, enc.block_size) != (want, local.block_size):
        raise Malformed(f"codec {enc.codec}/{enc.block_size}, expected {want}/{local.block_size}")
    if enc.shape != (bound[1] - bound[0],):
        raise Malformed(f"shape {enc.shape}, expected ({bound[1] - bound[0]},)")
