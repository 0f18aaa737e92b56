"""The pure round rules of peers/ (and the app's phase pacer), checked on hand-built records.

lineage.py (whose θ_g is the swarm's), outcome.py (how a stuck member learns a round's
fate), progress.py (liveness and how long to wait), consensus.py (who leads, what commits),
config.py (SwarmConfig validation), records.py (PeerRecord limits) and pacing.py (when an
inner phase ends). Every function here is pure, so every test is a table of records and
the exact answer the protocol (docs/design.md, "The round protocol") asks for.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter

import pytest

from diloco_grow.pacing import PhasePacer
from peers.config import SwarmConfig
from peers.consensus import leader_rank, tally, votes_needed
from peers.errors import Malformed
from peers.lineage import branches, compatible, history, verdict
from peers.outcome import ABORT, COMMIT, resolve
from peers.progress import at_step, finishing, finishing_deadline, is_live, wait_deadline
from peers.records import MAX_COMMITS, MAX_LINEAGE, PeerRecord, RoundState

KEY = "A" * 40
T0 = 1000.0
A, B, C, D, E, F = ("a1" * 10, "b2" * 10, "c3" * 10, "d4" * 10, "e5" * 10, "f6" * 10)
RID = "0123456789abcdef"  # 16 hex chars, as a round id is
RID2 = "fedcba9876543210"


def rec(
    peer_id: str,
    step: int,
    h: str,
    lineage: tuple | None = None,
    *,
    epoch: int = 0,
    members: int = 3,
    time: float = T0,
    round: RoundState | None = None,
    commits: tuple[str, ...] = (),
    tokens: int = 0,
    tokens_per_s: float = 0.0,
    eta_s: float = 0.0,
    ready: bool = False,
    late: bool = False,
    state_endpoint: str | None = None,
) -> PeerRecord:
    """A heartbeat record; by default its lineage is just its own state."""
    if lineage is None:
        lineage = ((step, h, members),)
    return PeerRecord(
        peer_id=peer_id,
        endpoint="tcp://127.0.0.1:5000",
        curve_key=KEY,
        arch_epoch=epoch,
        step=step,
        params_hash=h,
        lineage=tuple(lineage),
        tokens=tokens,
        tokens_per_s=tokens_per_s,
        eta_s=eta_s,
        ready=ready,
        late=late,
        round=round,
        commits=tuple(commits),
        time=time,
        state_endpoint=state_endpoint,
        state_curve_key=KEY if state_endpoint else None,
    )


def chain(prefix: str, steps, members: int = 3) -> tuple[tuple[int, str, int], ...]:
    """Lineage entries (s, f"{prefix}{s}", members) for each step s."""
    return tuple((s, f"{prefix}{s}", members) for s in steps)


def on_line(peer_id: str, step: int, prefix: str = "h", members: int = 3, **kw) -> PeerRecord:
    """A peer holding step `step` of the line `prefix`, remembering the last 16 states."""
    lin = chain(prefix, range(max(0, step - MAX_LINEAGE + 1), step + 1), members)
    return rec(peer_id, step, f"{prefix}{step}", lin, **kw)


def verdicts(records: list[PeerRecord]) -> dict[str, object]:
    return {r.peer_id: verdict(r, records) for r in records}


# ---- lineage.py ----------------------------------------------------------------------------


def test_history_is_the_lineage_plus_the_current_state():
    r = rec(A, 5, "h5", chain("h", range(2, 5)))  # lineage stops before the current state
    assert history(r) == {2: "h2", 3: "h3", 4: "h4", 5: "h5"}
    # The current state overrides a lineage entry for the same step.
    r = rec(A, 5, "new", chain("h", range(2, 6)))
    assert history(r)[5] == "new"


def test_compatible_compares_the_latest_common_step():
    a = on_line(A, 7)
    behind = on_line(B, 4)
    assert compatible(a, behind) and compatible(behind, a)
    forked = rec(C, 7, "x7", chain("h", range(0, 5)) + chain("x", range(5, 8)))
    assert compatible(forked, behind)  # agrees with `behind` at step 4, its latest step
    assert not compatible(forked, a)  # h7 vs x7 at step 7
    # Differing only in the past (step 3) but agreeing at the latest common step (4):
    # only the latest common step counts.
    odd = rec(D, 4, "h4", ((3, "zz", 3), (4, "h4", 3)))
    assert compatible(odd, behind)


def test_lineages_with_no_common_step_are_compatible_only_with_the_same_state():
    old = rec(A, 3, "h3", chain("h", range(0, 4)))
    new = rec(B, 30, "h30", chain("h", range(15, 31)))
    assert not compatible(old, new)  # nothing in common, different claims
    # Identical claims with disjoint remembered windows: the same state.
    x = rec(C, 9, "h9", ())
    y = rec(D, 9, "h9", ((1, "h1", 2),))
    assert history(x).keys() & history(y).keys() == {9}
    assert compatible(x, y)


def test_peers_at_the_tip_are_ok_and_a_peer_behind_resyncs_from_the_tip():
    a, b = on_line(A, 5), on_line(B, 5, state_endpoint="tcp://10.0.0.2:7000")
    c = on_line(C, 3)
    recs = [a, b, c]
    (only,) = branches(recs)
    assert only.holders == (A, B, C) and only.tip.claim == (0, 5, "h5")
    v = verdicts(recs)
    assert v[A].ok and v[A].source is None
    assert v[B].ok and v[B].source is None
    assert not v[C].ok
    assert v[C].source is b  # a tip holder that serves state is preferred
    assert "behind" in v[C].reason and "step 5" in v[C].reason


def test_behind_peer_source_is_a_holder_of_the_confirmed_state_even_without_a_state_server():
    # A alone at step 8 confirms nothing yet (one holder in a line of three); B's step 6 is
    # held by A and B: the confirmed state, which C adopts from B.
    recs = [on_line(A, 8), on_line(B, 6), on_line(C, 2)]
    v = verdicts(recs)
    assert v[A].ok and "ahead" in v[A].reason
    assert v[B].ok and v[B].source is None
    assert not v[C].ok and v[C].source is not None and v[C].source.peer_id == B
    # Once B reached step 8 too, step 8 is confirmed and C goes there.
    recs[1] = on_line(B, 8)
    v = verdicts(recs)
    assert v[A].ok and v[B].ok and not v[C].ok and v[C].source.claim == (0, 8, "h8")


def test_a_lone_record_claiming_a_far_step_on_our_line_takes_nothing_over():
    """Issue 9, attack 2: a record with our lineage plus step 10^15 is our line's tip, but
    nobody else holds that state: the honest peers keep theirs and resync from no one."""
    honest = [on_line(p, 40) for p in (A, B, C)]
    fake = rec(D, 10**15, "evil", (*on_line(D, 40).lineage[1:], (10**15, "evil", 1000)))
    recs = [*honest, fake]
    (only,) = branches(recs)
    assert only.tip.peer_id == D  # it is the tip of our line ...
    for r in honest:  # ... but not the state the line confirmed
        v = verdict(r, recs)
        assert v.ok and v.source is None, v.reason
    joiner = rec(E, 0, "init", ((0, "init", 0),))
    v = verdict(joiner, [*recs, joiner])
    assert not v.ok and v.source.claim == (0, 40, "h40")  # downloads the honest state


def test_a_fake_signed_claim_cannot_take_over_a_swarm_of_fresh_peers():
    """At step 0 nobody's state is signed yet: a single signed claim on top of the initial
    θ_g still needs a second holder while the line has more than two peers."""
    fresh = [rec(p, 0, "h0", ((0, "h0", 0),)) for p in (A, B, C)]
    fake = rec(D, 10**15, "evil", ((0, "h0", 0), (10**15, "evil", 1000)))
    recs = [*fresh, fake]
    for r in fresh:
        assert verdict(r, recs).ok
    # Two honest peers that committed step 1 together, though, lead the third there.
    one = [rec(p, 1, "h1", ((0, "h0", 0), (1, "h1", 2))) for p in (A, B)]
    v = verdict(fresh[2], [*one, fresh[2]])
    assert not v.ok and v.source.claim == (0, 1, "h1")


def _rival_pairs(a_ahead: bool) -> tuple[list[PeerRecord], PeerRecord]:
    """The CI run that failed: the swarm's first round formed two rival groups of two,
    {A, C} committing "f1" and {B, D} committing "x1"; then D (the forger) claims step 10^15
    with 1000 members on top of x1. `a_ahead`: A also committed step 2 in a round C aborted,
    so nobody vouches for either line's tip but the tip itself."""
    init = (0, "init", 0)
    honest = [rec(p, 1, "f1", (init, (1, "f1", 2))) for p in (A, C)]
    if a_ahead:
        honest[0] = rec(A, 2, "f2", (init, (1, "f1", 2), (2, "f2", 2)))
    b = rec(B, 1, "x1", (init, (1, "x1", 2)))
    fake = rec(D, 10**15, "evil", (init, (1, "x1", 2), (10**15, "evil", 1000)))
    return [*honest, b], fake


@pytest.mark.parametrize("a_ahead", [False, True], ids=["tips-held-by-two", "tips-held-by-one"])
def test_a_forger_on_one_of_two_rival_lines_takes_nothing_over(a_ahead):
    """Issue 9, attack 2, after a split: the forger's line holds one honest peer, so the
    line has only two records, and the claimed 1000 members outranked the other line."""
    honest, fake = _rival_pairs(a_ahead)
    recs = [*honest, fake]
    for r in honest:
        v = verdict(r, recs)
        assert v.ok or v.source.claim[1] < 10**15, v.reason
        assert v.source is None or v.source.peer_id != D
    if not a_ahead:
        # The line two peers vouch for wins over the tip vouched for by itself alone: B
        # resyncs onto f1, A and C keep it.
        assert [b.vouched for b in branches(recs)] == [2, 1]
        v = verdicts(recs)
        assert v[A].ok and v[C].ok
        assert not v[B].ok and v[B].source.claim == (0, 1, "f1") and "diverged" in v[B].reason
    else:
        # One voucher each: the claimed members decide the line, but on it only x1, which
        # B and D both hold or passed through, is confirmed; the swarm converges on it.
        v = verdicts(recs)
        assert v[B].ok
        for p in (A, C):
            assert not v[p].ok and v[p].source.claim == (0, 1, "x1") and v[p].source.peer_id == B
    # In a swarm of two a single holder still leads the way (nobody else could confirm).
    assert not verdict(honest[2], [honest[2], fake]).ok


def _fork(common: int, maj_step: int, lone_step: int) -> tuple[list[PeerRecord], PeerRecord]:
    """Three peers on line "m", one lone peer on line "x", forked after step `common`."""
    base = chain("h", range(0, common + 1), members=4)
    maj = [
        rec(pid, maj_step, f"m{maj_step}", base + chain("m", range(common + 1, maj_step + 1)))
        for pid in (A, B, C)
    ]
    lone = rec(
        D, lone_step, f"x{lone_step}", base + chain("x", range(common + 1, lone_step + 1), 1)
    )
    return maj, lone


@pytest.mark.parametrize(
    "maj_step,lone_step",
    [(5, 5), (5, 6), (5, 9), (7, 5)],
    ids=["same-step", "lone-one-ahead", "lone-far-ahead", "lone-behind"],
)
def test_three_peer_branch_beats_a_lone_peer_never_highest_step(maj_step, lone_step):
    maj, lone = _fork(4, maj_step, lone_step)
    recs = [lone, *maj]
    bs = branches(recs)
    assert [b.holders for b in bs] == [(A, B, C), (D,)]
    assert bs[0].tip.params_hash == f"m{maj_step}"
    v = verdicts(recs)
    for pid in (A, B, C):
        assert v[pid].ok, v[pid].reason
    assert not v[D].ok
    assert v[D].source is not None and v[D].source.peer_id in (A, B, C)
    assert v[D].source.claim == (0, maj_step, f"m{maj_step}")
    assert "diverged" in v[D].reason


def test_majority_peer_behind_on_its_line_resyncs_from_its_own_line_not_the_lone_tip():
    maj, lone = _fork(4, 6, 9)
    behind = rec(A, 5, "m5", chain("h", range(0, 5), 4) + chain("m", range(5, 6)))
    recs = [lone, behind, *maj[1:]]
    v = verdict(behind, recs)
    assert not v.ok and v.source is not None
    assert v.source.claim == (0, 6, "m6")


def _two_vs_two(kind: str) -> tuple[list[PeerRecord], set[str], set[str]]:
    """Two branches of two holders each, forked after step 4; which one wins is `kind`."""
    base = chain("h", range(0, 5), members=4)

    def holders(pids, prefix, step, members, h=None):
        lin = base + chain(prefix, range(5, step + 1), members)
        if h is not None:
            lin = lin[:-1] + ((step, h, members),)
        return [rec(p, step, h or f"{prefix}{step}", lin) for p in pids]

    if kind == "members":  # equal holders: the branch whose latest round had more members
        win = holders((C, D), "w", 5, 4)
        lose = holders((A, B), "l", 7, 2)  # higher step does not help
    elif kind == "step":  # equal holders and members: the higher step
        win = holders((C, D), "w", 7, 3)
        lose = holders((A, B), "l", 5, 3)
    elif kind == "hash":  # all equal: the smaller hash, deterministically
        win = holders((C, D), "w", 5, 3, h="0" * 64)
        lose = holders((A, B), "l", 5, 3, h="f" * 64)
    else:
        raise AssertionError(kind)
    return lose + win, {r.peer_id for r in win}, {r.peer_id for r in lose}


@pytest.mark.parametrize("kind", ["members", "step", "hash"])
def test_ties_are_broken_by_members_then_step_then_smaller_hash(kind):
    recs, win, lose = _two_vs_two(kind)
    winner_claim = next(r.claim for r in recs if r.peer_id in win)
    for order in itertools.permutations(recs):
        order = list(order)
        best = branches(order)[0]
        assert set(best.holders) == win
        for r in order:
            v = verdict(r, order)
            if r.peer_id in win:
                assert v.ok, (kind, r.peer_id, v.reason)
            else:
                assert not v.ok and v.source is not None
                assert v.source.peer_id in win and v.source.claim == winner_claim


def test_every_peer_computes_the_same_verdict_from_shuffled_records():
    maj, lone = _fork(4, 5, 8)
    recs = [lone, *maj, on_line(E, 3)]  # E: behind on the common line

    def key(v):  # the source may be any holder of the tip's state (it follows input order)
        return (v.ok, None if v.source is None else v.source.claim)

    expected = {r.peer_id: key(verdict(r, recs)) for r in recs}
    rng = random.Random(0)
    for _ in range(20):
        shuffled = recs[:]
        rng.shuffle(shuffled)
        # Each peer sees the others' records plus its own: the same set in another order.
        for r in shuffled:
            v = verdict(r, shuffled)
            assert key(v) == expected[r.peer_id]
            if not v.ok:
                assert v.source.peer_id in (A, B, C)
    # The majority holders agree they are fine; the lone peer and the laggard are both
    # sent to the majority's state.
    assert all(expected[p] == (True, None) for p in (A, B, C))
    assert expected[D] == expected[E] == (False, (0, 5, "m5"))


def test_fresh_joiner_behind_a_swarm_that_still_remembers_step_0():
    joiner = rec(E, 0, "init", ((0, "init", 0),))
    swarm = [rec(p, 5, "s5", ((0, "init", 0), *chain("s", range(1, 6), 2))) for p in (A, B)]
    recs = [joiner, *swarm]
    assert all(compatible(joiner, s) for s in swarm)
    (only,) = branches(recs)
    assert set(only.holders) == {A, B, E}
    v = verdict(joiner, recs)
    assert not v.ok and v.source is not None and v.source.claim == (0, 5, "s5")
    assert "behind" in v.reason
    assert verdict(swarm[0], recs).ok and verdict(swarm[1], recs).ok


def test_fresh_joiner_vs_a_swarm_past_its_lineage_window_still_resyncs():
    joiner = rec(E, 0, "init", ((0, "init", 0),))
    swarm = [on_line(p, 20, "s", members=2) for p in (A, B)]
    assert 0 not in history(swarm[0])  # the window (16 entries) no longer reaches step 0
    recs = [joiner, *swarm]
    assert not compatible(joiner, swarm[0])
    bs = branches(recs)
    assert [b.holders for b in bs] == [(A, B), (E,)]
    v = verdict(joiner, recs)
    assert not v.ok and v.source is not None and v.source.claim == (0, 20, "s20")
    assert verdict(swarm[0], recs).ok


def test_a_lone_swarm_peer_keeps_its_state_against_one_fresh_joiner():
    # 1 vs 1: the swarm's latest round had members (>= 1), the fresh init had none.
    joiner = rec(E, 0, "init", ((0, "init", 0),))
    solo = on_line(A, 20, "s", members=1)
    recs = [joiner, solo]
    assert verdict(solo, recs).ok
    v = verdict(joiner, recs)
    assert not v.ok and v.source is solo


def test_two_fresh_joiners_do_not_confirm_a_lone_founders_solo_rounds():
    """The accepted price of the two-holder rule (docs/design.md): a founder's solo rounds
    on top of the initial θ_g look like a forged claim, so two joiners keep the init, and
    once they averaged it together (2 members) the founder adopts their line."""
    founder = rec(A, 3, "s3", ((0, "init", 0), *chain("s", range(1, 4), 1)))
    joiners = [rec(p, 0, "init", ((0, "init", 0),)) for p in (D, E)]
    recs = [founder, *joiners]
    assert all(verdict(j, recs).ok for j in joiners)
    pair = [rec(p, 1, "j1", ((0, "init", 0), (1, "j1", 2))) for p in (D, E)]
    v = verdict(founder, [founder, *pair])
    assert not v.ok and v.source.claim == (0, 1, "j1") and "diverged" in v.reason


def test_fresh_joiners_never_overwrite_a_swarm_past_the_window():
    joiners = [rec(p, 0, "init", ((0, "init", 0),)) for p in (D, E, F)]
    swarm = [on_line(p, 20, "s", members=2) for p in (A, B)]
    recs = [*joiners, *swarm]
    for s in swarm:
        assert verdict(s, recs).ok, verdict(s, recs).reason
    for j in joiners:
        v = verdict(j, recs)
        assert not v.ok and v.source is not None and v.source.claim == (0, 20, "s20")


def test_laggards_on_the_common_line_do_not_vote_for_the_fastest_branch():
    base = chain("h", range(0, 5), members=5)
    lone = rec(A, 6, "l6", base + chain("l", range(5, 7), 1))  # averaged alone twice
    maj = [rec(p, 5, "m5", base + chain("m", range(5, 6), 2)) for p in (B, C)]
    laggards = [rec(p, 4, "h4", base) for p in (D, E)]  # from before the split
    recs = [lone, *maj, *laggards]
    for r in laggards:  # they lie on both lines
        assert compatible(r, lone) and compatible(r, maj[0])
    for r in maj:
        assert verdict(r, recs).ok, verdict(r, recs).reason
    v = verdict(lone, recs)
    assert not v.ok and v.source is not None and v.source.claim == (0, 5, "m5")
    for r in laggards:
        v = verdict(r, recs)
        assert v.source is not None and v.source.claim == (0, 5, "m5")


# ---- outcome.py ----------------------------------------------------------------------------

WHERE = (0, 5, 1)  # epoch, step, attempt of round RID
MEMBERS = [A, B, C]


def member(pid: str, phase: str = "stuck", **kw) -> PeerRecord:
    """A member of round RID in `phase` (override its RoundState with round=...)."""
    kw.setdefault("round", RoundState(*WHERE, RID, phase))
    return rec(pid, 5, "h5", **kw)


def res(*others: PeerRecord, me: str = A, members=MEMBERS) -> str | None:
    return resolve(me, WHERE, RID, list(members), {r.peer_id: r for r in others})


def test_resolve_commits_when_any_member_committed():
    # Its commits list names our round (it has already moved on to step 6).
    moved = member(B, round=RoundState(0, 6, 0, RID2, "data"), commits=("11" * 8, RID))
    assert res(moved, member(C, "stuck")) == COMMIT
    # Its phase for our round says committed, before its commits list caught up.
    assert res(member(B, "committed"), member(C, "stuck")) == COMMIT
    # Evidence of a commit beats someone still undecided.
    assert res(member(B, "voted"), member(C, "committed")) == COMMIT
    assert res(member(B, "data"), member(C, "stuck", commits=(RID,))) == COMMIT


@pytest.mark.parametrize(
    "rs",
    [
        RoundState(*WHERE, RID, "aborted"),  # aborted this round
        RoundState(0, 5, 2, "", "forming"),  # attempt + 1, still forming
        RoundState(0, 5, 2, RID2, "data"),  # attempt + 1, in its data phase
        RoundState(0, 5, 1, RID2, "data"),  # same attempt, another group
        RoundState(0, 6, 0, RID2, "data"),  # next step, our rid not in its commits
        RoundState(1, 5, 0, "", "forming"),  # next epoch
    ],
    ids=["aborted", "next-attempt-forming", "next-attempt", "other-group", "next-step", "epoch"],
)
def test_resolve_aborts_when_a_member_aborted_or_moved_on(rs):
    assert res(member(B, round=rs), member(C, "stuck")) == ABORT
    assert res(member(C, "stuck"), member(B, round=rs)) == ABORT
    # Even while a third member is still undecided: nobody can commit this round any more.
    four = [*MEMBERS, D]
    assert res(member(B, round=rs), member(C, "voted"), member(D, "data"), members=four) == ABORT


def test_resolve_aborts_when_a_member_holds_no_round_at_all():
    assert res(rec(B, 5, "h5"), member(C, "stuck")) == ABORT


def test_resolve_aborts_when_every_other_member_is_stuck_or_dead():
    assert res(member(B, "stuck"), member(C, "stuck")) == ABORT
    assert res(member(B, "stuck")) == ABORT  # C dead (absent)
    assert res() == ABORT  # everyone else dead
    assert res(members=[A]) == ABORT  # nobody else at all


@pytest.mark.parametrize("phase", ["data", "voted"])
def test_resolve_is_undecided_while_a_member_is_still_in_the_round(phase):
    assert res(member(B, phase), member(C, "stuck")) is None
    assert res(member(B, phase)) is None  # C dead, B still going: wait for B
    # Same attempt, rid not yet published (its record lags BEGIN): undecided too.
    lagging = member(B, round=RoundState(*WHERE, "", "forming"))
    assert res(lagging, member(C, "stuck")) is None


def test_resolve_ignores_our_own_record():
    mine = member(A, "data")  # our record may still show an earlier phase
    assert res(mine, member(B, "stuck"), member(C, "stuck")) == ABORT
    assert resolve(A, WHERE, RID, [A, B], {A: member(A, "committed")}) == ABORT


def test_every_stuck_member_reaches_the_same_decision():
    cases = [
        {B: member(B, "stuck"), C: member(C, "committed")},
        {B: member(B, "stuck"), C: member(C, "aborted")},
        {B: member(B, "stuck"), C: member(C, "stuck")},
        {B: member(B, "stuck"), C: member(C, "voted")},
    ]
    for recs in cases:
        a_view = {**recs, A: member(A, "stuck")}
        b_view = {**recs, A: member(A, "stuck")}
        da = resolve(A, WHERE, RID, MEMBERS, a_view)
        db = resolve(B, WHERE, RID, MEMBERS, b_view)
        assert da == db, recs


# ---- progress.py ---------------------------------------------------------------------------


def test_is_live_uses_dead_after_beats_times_heartbeat():
    cfg = SwarmConfig(run="t", heartbeat_s=2.0, dead_after_beats=2.0)
    assert cfg.dead_after_s == 4.0
    r = rec(A, 5, "h5", time=T0)
    assert is_live(r, cfg, T0)
    assert is_live(r, cfg, T0 + 4.0)  # exactly two beats old: alive
    assert not is_live(r, cfg, T0 + 4.01)  # slightly older: dead
    cfg3 = SwarmConfig(run="t", heartbeat_s=0.5, dead_after_beats=3)
    assert cfg3.dead_after_s == 1.5
    assert is_live(r, cfg3, T0 + 1.5) and not is_live(r, cfg3, T0 + 1.51)


def test_wait_deadline_is_eta_plus_two_heartbeats_plus_matchmaking():
    cfg = SwarmConfig(run="t", heartbeat_s=2.0, matchmaking_s=3.0)
    r = rec(A, 5, "h5", time=T0, eta_s=30.0)
    assert wait_deadline(r, cfg) == T0 + 30.0 + 4.0 + 3.0
    assert wait_deadline(rec(A, 5, "h5", time=T0 + 2), cfg) == T0 + 2 + 7.0
    cfg2 = SwarmConfig(run="t", heartbeat_s=0.5, phase_timeout_s=8.0)
    assert finishing_deadline(r, cfg2) == T0 + 8.0 + 1.0


def test_at_step_selects_other_peers_at_our_epoch_and_step():
    recs = [
        rec(A, 5, "h5"),
        rec(B, 5, "h5"),
        rec(C, 4, "h4"),
        rec(D, 5, "g5", epoch=1),
        rec(E, 6, "h6"),
        rec(F, 5, "zz"),  # another hash, same step: still trains for the same round
    ]
    assert [r.peer_id for r in at_step(recs, A, 0, 5)] == [B, F]
    assert [r.peer_id for r in at_step(recs, B, 1, 5)] == [D]
    assert at_step(recs, A, 0, 7) == []


def test_finishing_selects_peers_still_inside_the_previous_round():
    def fin(pid, step, epoch=0, rs=None):
        return rec(pid, step, f"h{step}", epoch=epoch, round=rs)

    recs = [
        fin(A, 5, rs=RoundState(0, 5, 0, RID, "data")),  # me
        fin(B, 4, rs=RoundState(0, 4, 0, RID2, "voted")),  # applying round 4: yes
        fin(C, 4, rs=RoundState(0, 4, 1, RID2, "aborted")),  # aborted: no
        fin(D, 4, rs=None),  # never in a round: no
        fin(E, 4, rs=RoundState(0, 3, 0, RID2, "committed")),  # training for 4: no
        fin(F, 5, rs=RoundState(0, 4, 0, RID2, "committed")),  # already at 5: no
    ]
    assert [r.peer_id for r in finishing(recs, A, 0, 5)] == [B]
    # Growth at step 4 moved us to epoch 1; a member still applying it shows epoch 0.
    grown = [
        fin(B, 4, epoch=0, rs=RoundState(0, 4, 0, RID2, "committed")),
        fin(C, 4, epoch=1, rs=RoundState(1, 4, 0, RID2, "stuck")),
        fin(D, 4, epoch=2, rs=RoundState(2, 4, 0, RID2, "voted")),  # a later epoch: no
    ]
    assert [r.peer_id for r in finishing(grown, A, 1, 5)] == [B, C]
    grown2 = [fin(B, 4, epoch=0, rs=RoundState(0, 4, 0, RID2, "committed"))]
    assert finishing(grown2, A, 2, 5) == []  # two epochs back is not finishing


# ---- consensus.py --------------------------------------------------------------------------

PEERS10 = [hashlib.sha1(f"peer{i}".encode()).hexdigest() for i in range(10)]


def _leader(step: int, attempt: int, peers=PEERS10, run: str = "run", epoch: int = 0) -> str:
    return min(peers, key=lambda p: leader_rank(run, epoch, step, attempt, p))


def test_leader_rank_is_deterministic_and_depends_on_every_input():
    r = leader_rank("run", 0, 5, 0, A)
    assert r == leader_rank("run", 0, 5, 0, A) and len(r) == 32
    others = {
        leader_rank("run2", 0, 5, 0, A),
        leader_rank("run", 1, 5, 0, A),
        leader_rank("run", 0, 6, 0, A),
        leader_rank("run", 0, 5, 1, A),
        leader_rank("run", 0, 5, 0, B),
    }
    assert r not in others and len(others) == 5
    # The order of the candidates does not matter.
    assert _leader(7, 2) == _leader(7, 2, peers=list(reversed(PEERS10)))


def test_leadership_is_spread_over_steps_and_attempts():
    pairs = [(s, a) for s in range(100) for a in range(2)]
    leads = Counter(_leader(s, a) for s, a in pairs)
    assert len(pairs) == 200
    assert len(leads) == 10  # every peer leads sometimes
    assert max(leads.values()) <= 50  # nobody leads more than 25%
    lowest = min(PEERS10)
    assert leads[lowest] <= 50  # the lexicographically lowest id is not favoured
    # A leader that stalls attempt 0 rarely leads the retry (1/10 by chance).
    same = sum(_leader(s, 0) == _leader(s, 1) for s in range(200))
    assert same <= 50, same


def test_votes_needed_and_tally():
    assert votes_needed(3, 2 / 3, 1) == 2  # 2/3*3 is 2.0000000000000004 in floats
    assert votes_needed(4, 2 / 3, 1) == 3
    assert votes_needed(1, 2 / 3, 1) == 1
    assert votes_needed(2, 2 / 3, 3) == 3  # min_peers dominates
    assert votes_needed(0, 2 / 3, 0) == 1
    grow = {"kind": "depth", "factor": 2}
    assert tally([grow, dict(grow), None], 2 / 3, 1) == grow
    assert tally([grow, None, None], 2 / 3, 1) is None
    assert tally([grow, {"kind": "width"}, grow], 2 / 3, 1) == grow
    assert tally([grow, dict(grow), None], 2 / 3, 3) is None  # too few voters


# ---- diloco_grow/pacing.py -----------------------------------------------------------------


def other(pid: str, ready: bool, tokens: int = 0, tokens_per_s: float = 0.0) -> PeerRecord:
    return rec(pid, 5, "h5", ready=ready, tokens=tokens, tokens_per_s=tokens_per_s)


def test_fixed_h_ends_after_h_steps_even_if_everyone_else_is_ready():
    p = PhasePacer(steps=10, tokens_per_step=100)
    ready = [other(B, True), other(C, True)]
    assert not p.over(0, 0, [])
    assert not p.over(9, 900, ready)  # an on-time peer is owed its full phase
    assert p.over(10, 1000, ready) and p.over(10, 1000, []) and p.over(12, 0, [])


def test_late_peer_ends_once_every_other_live_peer_of_its_step_is_ready():
    p = PhasePacer(steps=10, tokens_per_step=100, late=True)
    assert p.over(1, 100, [other(B, True), other(C, True)])
    assert not p.over(1, 100, [other(B, True), other(C, False)])  # C still training
    assert not p.over(9, 900, [other(B, False)])
    assert p.over(10, 1000, [other(B, False)])  # never past H either
    assert not p.over(3, 300, [])  # alone at its step: nobody to stop for


def test_target_tokens_mode_ends_when_the_swarm_reached_the_target():
    p = PhasePacer(steps=10, tokens_per_step=100, target_tokens=1000)
    others = [other(B, False, tokens=300), other(C, False, tokens=400)]
    assert not p.over(2, 200, others)  # 900 < 1000
    assert p.over(3, 300, others)  # 1000
    assert not p.over(50, 999, [])  # H does not bound it; tokens do
    assert p.over(50, 1000, [])
    # Everyone else ready: end now, whatever the token count.
    assert p.over(1, 100, [other(B, True, tokens=10), other(C, True, tokens=10)])
    assert not p.over(1, 100, [other(B, True, tokens=10), other(C, False, tokens=10)])


def test_eta_in_each_mode():
    fixed = PhasePacer(steps=10, tokens_per_step=100, step_s=0.5)
    assert fixed.eta(4, 400, []) == pytest.approx(3.0)  # (10 - 4) * 0.5
    assert fixed.eta(10, 1000, []) == 0.0
    assert fixed.eta(12, 1200, []) == 0.0
    late = PhasePacer(steps=10, tokens_per_step=100, late=True, step_s=0.5)
    assert late.eta(0, 0, [other(B, False)]) == 0.5  # about one step
    late_target = PhasePacer(steps=10, tokens_per_step=100, target_tokens=10**6, late=True)
    late_target.step_s = 0.25
    assert late_target.eta(0, 0, []) == 0.25  # late wins over the token target
    target = PhasePacer(steps=10, tokens_per_step=100, target_tokens=2000, step_s=0.5)
    others = [other(B, False, tokens=300, tokens_per_s=150.0), other(C, False, 200, 50.0)]
    # left = 2000 - 500 - 500 = 1000 tokens; rate = 100/0.5 + 150 + 50 = 400 tokens/s
    assert target.eta(5, 500, others) == pytest.approx(2.5)
    assert target.eta(20, 2000, others) == 0.0  # past the target: never negative


def test_observe_keeps_a_moving_average_of_the_step_time():
    p = PhasePacer(steps=10, tokens_per_step=100)
    p.observe(1.0)
    assert p.step_s == 1.0  # the first observation is taken as is
    p.observe(2.0)
    assert p.step_s == pytest.approx(1.2)  # 0.8 * 1.0 + 0.2 * 2.0
    p.observe(2.0)
    assert p.step_s == pytest.approx(1.36)
    for _ in range(100):
        p.observe(0.5)
    assert p.step_s == pytest.approx(0.5, rel=1e-6)


# ---- config.py -----------------------------------------------------------------------------


@pytest.mark.parametrize("hb", [0.0, -1.0, math.nan])
def test_config_rejects_bad_heartbeat(hb):
    with pytest.raises(ValueError, match="heartbeat_s"):
        SwarmConfig(run="t", heartbeat_s=hb)


@pytest.mark.parametrize("beats", [1.0, 1.99, 0.0, -2.0])
def test_config_rejects_dead_after_below_two_beats(beats):
    with pytest.raises(ValueError, match="dead_after_beats"):
        SwarmConfig(run="t", dead_after_beats=beats)


def test_config_accepts_two_beats_and_zero_max_wait():
    cfg = SwarmConfig(run="t", heartbeat_s=1.5, dead_after_beats=2, max_wait_s=0.0)
    assert cfg.dead_after_s == 3.0 and cfg.max_wait_s == 0.0
    with pytest.raises(ValueError, match="max_wait_s"):
        SwarmConfig(run="t", max_wait_s=-0.1)


@pytest.mark.parametrize("field", ["dead_after_beats", "max_wait_s"])
def test_config_rejects_nan(field):
    with pytest.raises(ValueError, match=field):
        SwarmConfig(run="t", **{field: math.nan})


@pytest.mark.parametrize(
    "hb,explicit,expected",
    [
        (2.0, 0.0, 3.0),  # default: 1.5 * 2 = 3
        (1.0, 0.0, 1.5),
        (0.2, 0.0, 0.5),  # 0.3 clamped up to 0.5
        (0.1, 0.0, 0.5),
        (10.0, 0.0, 3.0),  # 15 clamped down to 3
        (2.0, 7.0, 7.0),  # an explicit timeout is taken as is
        (2.0, 0.2, 0.2),
    ],
)
def test_rpc_timeout_defaults_to_one_and_a_half_beats_clamped(hb, explicit, expected):
    cfg = SwarmConfig(run="t", heartbeat_s=hb, dht_rpc_timeout_s=explicit)
    assert cfg.rpc_timeout_s == pytest.approx(expected)


# ---- records.py ----------------------------------------------------------------------------


def _full_record(**over) -> PeerRecord:
    r = rec(
        A,
        5,
        "h5",
        chain("h", range(0, 6)),
        epoch=1,
        round=RoundState(1, 5, 0, RID, "voted"),
        commits=(RID2,),
        tokens=4096,
        tokens_per_s=123.5,
        eta_s=2.25,
        ready=True,
        late=True,
        state_endpoint="tcp://10.0.0.1:7000",
    )
    d = {**r.to_dict(), **over}
    return PeerRecord.from_dict(d)


def test_peer_record_round_trips():
    r = _full_record()
    assert PeerRecord.from_dict(r.to_dict()) == r
    assert r.round == RoundState(1, 5, 0, RID, "voted")
    assert r.claim == (1, 5, "h5")
    # A forming round has no rid yet; a record with no round at all is fine too.
    forming = _full_record(round=[1, 5, 2, "", "forming"], commits=[])
    assert forming.round.rid == "" and forming.commits == ()
    assert _full_record(round=None).round is None


def test_peer_record_limits_on_lineage_and_commits():
    ok_lineage = [[s, f"h{s}", 3] for s in range(MAX_LINEAGE)]
    assert len(_full_record(lineage=ok_lineage).lineage) == 16
    with pytest.raises(Malformed, match="lineage"):
        _full_record(lineage=[[s, f"h{s}", 3] for s in range(17)])
    ok_commits = [f"{i:016x}" for i in range(MAX_COMMITS)]
    assert len(_full_record(commits=ok_commits).commits) == 4
    with pytest.raises(Malformed, match="commits"):
        _full_record(commits=[f"{i:016x}" for i in range(5)])
    with pytest.raises(Malformed):
        _full_record(commits=["NOT-HEX"])
    with pytest.raises(Malformed):
        _full_record(round=[1, 5, 0, "xyz", "voted"])  # rid must be hex
    with pytest.raises(Malformed):
        _full_record(peer_id="A1" * 10)  # peer ids are lowercase hex


def test_resolve_waits_for_a_member_whose_record_still_shows_an_earlier_round():
    # Its phase publication lags: it may well have committed ours. Not an abort.
    where = (0, 5, 0)
    stale = rec("b2" * 10, 5, "h5", round=RoundState(0, 4, 0, "cd" * 8, "committed"))
    assert resolve("a1" * 10, where, "ab" * 8, ["a1" * 10, "b2" * 10], {"b2" * 10: stale}) is None


def test_a_peer_still_starting_holds_no_state_and_is_not_waited_for():
    # Published before its app declared a state: empty lineage, placeholder hash.
    starting = [rec(f"{i:02x}" * 10, 0, "init", lineage=()) for i in (1, 2)]
    me = rec("a1" * 10, 0, "h0", members=0)
    assert verdict(me, [*starting, me]).ok
    assert at_step([*starting, me], me.peer_id, 0, 0) == []


def test_a_peer_that_alone_applied_a_round_is_outvoted_by_the_members_that_aborted_it():
    # Round 5 had 3 members; C got every vote and committed (tip signed by 3), A and B
    # aborted and retried without it (tip signed by 2). The majority holds the 2-member
    # line: C must resync, A and B must not, whatever C's member count says.
    base = ((3, "h3", 3), (4, "h4", 3))
    a = rec("a1" * 10, 6, "m6", lineage=(*base, (5, "m5", 2), (6, "m6", 2)), members=2)
    b = rec("b2" * 10, 6, "m6", lineage=(*base, (5, "m5", 2), (6, "m6", 2)), members=2)
    c = rec("c3" * 10, 5, "c5", lineage=(*base, (5, "c5", 3)), members=3)
    recs = [a, b, c]
    assert verdict(a, recs).ok and verdict(b, recs).ok
    v = verdict(c, recs)
    assert not v.ok and v.source is not None and v.source.params_hash == "m6"
    assert "diverged" in v.reason
