"""Whose θ_g is the swarm's: the majority rule, evaluated on heartbeat records.

Every record carries the state its peer holds (epoch, step, θ_g hash) and its recent
lineage: (step, hash, members of the round that produced it) for the last few commits.
Two peers are *compatible* when their lineages agree at the latest step both know: then
the one at the lower step is simply behind and catches up. Otherwise they *diverged* (a
partition, a half-applied round) and the line held by more live peers wins (counting only
peers whose state some round produced), then the line whose tip more live peers vouch for
(hold it or passed through it), then the one whose tip more members signed, then the
higher step. Never "the highest step": a lone fast partition cannot overwrite
the majority's work, a peer that alone applied a round the others aborted is outvoted by
them, and fresh joiners holding the initial θ_g cannot outvote a trained swarm.

Pure functions, so every peer evaluating the same records reaches the same verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from peers.records import PeerRecord


def history(r: PeerRecord) -> dict[int, str]:
    """step -> θ_g hash, as far back as this record remembers (its current state included)."""
    h = {step: ph for step, ph, _ in r.lineage}
    h[r.step] = r.params_hash
    return h


def compatible(a: PeerRecord, b: PeerRecord) -> bool:
    """Do a and b lie on one line of history (one may be behind the other)?"""
    ha, hb = history(a), history(b)
    common = set(ha) & set(hb)
    if not common:
        # Nothing in common within the remembered window: same only if it is the same state.
        return a.claim == b.claim
    s = max(common)
    return ha[s] == hb[s]


def vouches(r: PeerRecord, state: PeerRecord) -> bool:
    """Does r hold `state`'s θ_g or has it passed through it (its own signed word)?"""
    return history(r).get(state.step) == state.params_hash


def members_at(lineage: list | tuple, step: int) -> int:
    """How many members signed the round that produced `step` in this lineage (0: none,
    e.g. a fresh init or a step older than the lineage remembers)."""
    return next((m for s, _, m in reversed(lineage) if s == step), 0)


def _members(r: PeerRecord) -> int:
    return members_at(r.lineage, r.step)


@dataclass(frozen=True)
class Branch:
    tip: PeerRecord  # the most advanced holder of this line of history
    holders: tuple[str, ...]  # live peers on this line and on no other
    signed: int  # of those, the ones holding a state some round produced (not a fresh init)
    vouched: int  # live peers that hold the tip's state or passed through it

    def rank(self) -> tuple:
        # "The hash that most of the last round's members hold": first the live peers on
        # the line whose state came out of a round (fresh joiners at the initial θ_g count
        # for nothing, however many), then the live peers vouching for the tip with their
        # own records, then the members that signed the tip, then all live holders, then
        # the higher step. Vouchers before members: the member count is the tip's own word,
        # and one record claiming 1000 members must not decide a tie between two honest
        # lines of equal weight (it would pick the line it sits on).
        t = self.tip
        return (
            self.signed,
            self.vouched,
            _members(t),
            len(self.holders),
            t.arch_epoch,
            t.step,
            _neg(t.params_hash),
        )


def _neg(h: str) -> tuple[int, ...]:
    # Ties go to the smaller hash, deterministically (hashes have one length: hex digests).
    return tuple(-ord(c) for c in h)


def branches(records: list[PeerRecord]) -> list[Branch]:
    """Group live records into lines of history, best first.

    Tips are the records compatible with no more advanced one. A record compatible with
    exactly one tip holds that line; one compatible with several (a laggard from before
    the lines split) is behind all of them and supports none: it must not decide which
    side of a partition wins."""
    ordered = sorted(records, key=lambda r: (-r.arch_epoch, -r.step, r.params_hash, r.peer_id))
    tips: list[PeerRecord] = []
    for r in ordered:
        if not any(compatible(t, r) for t in tips):
            tips.append(r)
    holders: dict[str, list[PeerRecord]] = {t.peer_id: [] for t in tips}
    for r in ordered:
        on = [t for t in tips if compatible(t, r)]
        if len(on) == 1:
            holders[on[0].peer_id].append(r)
    bs = [
        Branch(
            t,
            tuple(sorted(r.peer_id for r in holders[t.peer_id])),
            sum(_members(r) > 0 for r in holders[t.peer_id]),
            sum(vouches(r, t) for r in records),
        )
        for t in tips
    ]
    return sorted(bs, key=Branch.rank, reverse=True)


@dataclass(frozen=True)
class Verdict:
    ok: bool  # we hold the state the swarm's majority line has reached
    source: PeerRecord | None  # if not ok: a holder of the state to download
    reason: str


def target(branch: Branch, records: list[PeerRecord]) -> PeerRecord:
    """The state of `branch` that the swarm has confirmed: its most advanced state that at
    least half of the line's signed holders (peers whose state a round produced) hold or
    have passed through, and at least two peers, unless the whole swarm (`records`) has
    only one or two.

    One record claiming to be far ahead (step 10^15, on a copy of our lineage) is the tip
    of our line but confirms nothing: following the tip would hand the swarm's state to
    whoever claims the highest step. Half, not a strict majority, so that two peers that
    committed a round while two slower ones did not still lead the way. The swarm, not the
    line, decides whether one holder is enough: after two rival groups of two, the line of
    one honest peer and the forger is a line of two, and there one record confirmed itself
    (a CI run of tests/adversarial/test_forged_records.py). Only a swarm of two cannot
    tell an honest peer ahead from a forger, and there the forger is half the swarm."""
    line = [r for r in records if compatible(r, branch.tip)]
    signed = [r for r in line if _members(r) > 0]
    for c in sorted(line, key=lambda r: (-r.arch_epoch, -r.step, r.params_hash)):
        holders = [r for r in line if vouches(r, c)]
        if len(holders) < 2 and len(records) > 2:
            continue
        confirmed = sum(_members(r) > 0 for r in holders)
        if 2 * confirmed >= len(signed):
            return c
    return branch.tip  # unreachable: the least advanced state is held by the whole line


def verdict(me: PeerRecord, records: list[PeerRecord]) -> Verdict:
    """Should `me` keep its θ_g, or adopt the state its swarm's majority line confirmed?
    (`records`: live peers.)"""
    # A peer still starting (no set_state yet: empty lineage) holds no state to vote for.
    recs = [r for r in records if r.peer_id != me.peer_id and r.lineage] + [me]
    best = branches(recs)[0]
    tip = target(best, recs)
    if me.claim == tip.claim:
        return Verdict(True, None, "we hold the majority line's latest state")
    if compatible(me, tip) and (me.arch_epoch, me.step) > (tip.arch_epoch, tip.step):
        # Ahead of what the swarm confirmed (we committed a round the others have not yet
        # caught up with, or they have not confirmed): keep it, the next round settles it.
        return Verdict(True, None, "ahead of the majority line's confirmed state")
    # Prefer the tip itself as the source; any holder of its exact state will do.
    holders = [r for r in recs if r.claim == tip.claim and r.peer_id != me.peer_id]
    source = next((r for r in holders if r.state_endpoint), holders[0] if holders else None)
    if compatible(me, tip):
        why = (
            f"behind: the swarm is at epoch {tip.arch_epoch} step {tip.step}, "
            f"we are at epoch {me.arch_epoch} step {me.step}"
        )
    else:
        why = (
            f"diverged: {len(best.holders)} live peer(s) hold θ_g {tip.params_hash} at step "
            f"{tip.step}; our line ({me.params_hash} at step {me.step}) is the minority"
        )
    return Verdict(False, source, why)
