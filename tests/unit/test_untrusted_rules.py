"""Rules that keep one untrusted member from ruining a round (issue 9): blame and bans,
attempt bombs, the DONE ballot that names a lying leader or reducer, and wire validation
of the new message fields."""

from __future__ import annotations

import pytest

from compression.wire import WireLimits
from peers.blame import Blame, Offence
from peers.consensus import MAX_ATTEMPT_LEAP, attempt_ceiling
from peers.errors import Malformed
from peers.group import Group
from peers.messages import Member, header, parse
from peers.rounds import _ballot, group_digest

A, B, C = "a1" * 10, "b2" * 10, "c3" * 10
KEY = "x" * 40
RID = "0123456789abcdef"


def member(pid: str, weight: float = 1.0, vote: dict | None = None) -> Member:
    return Member(pid, f"tcp://127.0.0.1:{5000 + ord(pid[0])}", KEY[:-1] + pid[0], weight, vote)


def group(*members: Member, rid: str = RID) -> Group:
    return Group(rid, 0, 7, 1, members[0], tuple(members), "h7")


# ---- blame.py -------------------------------------------------------------------------------


def test_a_culprit_sits_out_the_rest_of_its_step_only():
    b = Blame()
    b.offend(Offence(A, 0, 7, "withheld its PART", own=True))
    assert b.sitting_out(0, 7) == {A}
    assert b.sitting_out(0, 8) == set()  # next step: a fresh chance
    assert b.banned(8) == set()


def test_own_evidence_at_three_distinct_steps_bans_for_ban_steps():
    b = Blame(ban_after=3, ban_steps=10)
    for attempt_step in (5, 5, 5, 6):  # one bad step that aborted thrice is one strike
        b.offend(Offence(A, 0, attempt_step, "invalid PART", own=True))
    assert b.banned(6) == set()
    b.offend(Offence(A, 1, 9, "invalid PART", own=True))  # growth moved the epoch on
    assert b.banned(9) == {A} and b.banned(18) == {A}
    assert b.banned(19) == set()  # bans expire: a flaky honest peer comes back
    assert A in b.sitting_out(0, 12)


def test_hearsay_never_bans():
    b = Blame(ban_after=1)
    for step in range(10):
        b.offend(Offence(B, 0, step, "named by a member", own=False))
        assert b.sitting_out(0, step) == {B}
    assert b.banned(10) == set()


# ---- attempt bombs --------------------------------------------------------------------------


def test_attempt_ceiling_ignores_a_bomb_but_follows_the_swarm():
    assert attempt_ceiling(0, [0, 0, 1 << 20]) == MAX_ATTEMPT_LEAP
    # Honest peers that retried while we trained: their median carries us up to them.
    assert attempt_ceiling(0, [30, 31, 31, 1 << 20]) == 31 + MAX_ATTEMPT_LEAP
    assert attempt_ceiling(5, []) == 5 + MAX_ATTEMPT_LEAP


def test_mailbox_drops_messages_of_an_attempt_bomb():
    from peers.mailbox import Mailbox
    from peers.messages import Msg

    mb = Mailbox.__new__(Mailbox)
    mb.scope = (0, 7, 2)
    near = Msg("JOIN", 0, 7, 2 + MAX_ATTEMPT_LEAP, A, KEY)
    bomb = Msg("JOIN", 0, 7, 1 << 20, A, KEY)
    later_step = Msg("JOIN", 0, 8, 1 << 20, A, KEY)  # another step: its own attempts
    assert mb._relevant(near) and not mb._relevant(bomb) and mb._relevant(later_step)


# ---- the ballot -----------------------------------------------------------------------------


def test_ballot_differs_where_the_leader_lied_about_the_group():
    reduced = {0: b"s0", 1: b"s1"}
    honest = group(member(A), member(B))
    told_b = group(member(A), member(B, weight=1e30))  # B was told another weight
    v1, v2 = _ballot(honest, reduced, {}), _ballot(told_b, reduced, {})
    assert v1["digest"] != v2["digest"] and v1["group"] != v2["group"]
    assert v1["shards"] == v2["shards"]
    # Votes count too: the same list with a vote changed is another group.
    voted = group(member(A), member(B, vote={"kind": "experts", "factor": 2}))
    assert group_digest(voted) != group_digest(honest)


def test_ballot_names_the_reducer_that_sent_different_bytes_or_rejections():
    g = group(member(A), member(B), member(C))
    base = _ballot(g, {0: b"x", 1: b"y", 2: b"z"}, {})
    forked = _ballot(g, {0: b"x", 1: b"Y", 2: b"z"}, {})
    assert base["group"] == forked["group"]
    assert [i for i in range(3) if base["shards"][i] != forked["shards"][i]] == [1]
    # Who a reducer says it left out is part of its shard's digest.
    blamed = _ballot(g, {0: b"x", 1: b"y", 2: b"z"}, {2: [0]})
    assert [i for i in range(3) if base["shards"][i] != blamed["shards"][i]] == [2]


# ---- wire validation of the new fields ------------------------------------------------------


def _parse(kind: str, **body: object) -> dict:
    h = header(kind, "run", 0, 7, 1, A, rid=RID, **body)
    return parse(h, "run", KEY, None, 0, WireLimits()).body


def test_done_abort_and_reduced_fields_are_validated():
    d = _parse("DONE", digest="ab" * 32, group="cd" * 32, shards=["ef" * 32])
    assert d["shards"] == ["ef" * 32]
    with pytest.raises(Malformed, match="shards"):
        _parse("DONE", digest="ab" * 32, group="cd" * 32, shards=[])
    with pytest.raises(Malformed):
        _parse("DONE", digest="ab" * 32, group="cd" * 32, shards=["not hex"])
    a = _parse("ABORT", reason="x", culprits=[B])
    assert a["culprits"] == [B]
    assert _parse("ABORT", reason="x")["culprits"] == []  # optional
    with pytest.raises(Malformed, match="culprits"):
        _parse("ABORT", reason="x", culprits=[B] * 100)


# ---- who may join ---------------------------------------------------------------------------


def test_only_joins_matching_a_signed_record_count_and_a_forged_id_cannot_replace_one():
    from peers.leader import _known
    from peers.records import Announcement, PeerRecord

    def ann(pid: str, key: str) -> Announcement:
        return Announcement(pid, "tcp://127.0.0.1:5000", key, 0, 1.0, "h", 10, "int8", 128)

    rec = PeerRecord(
        A, "tcp://127.0.0.1:5000", KEY, 0, 0, "h", ((0, "h", 0),), 0, 0.0, 0.0, True, False,
        None, (), 0.0,
    )  # fmt: skip
    honest, forged = ann(A, KEY), ann(A, "y" * 40)  # the same id, the attacker's key
    invented = ann(B, "z" * 40)  # an id nobody runs
    asked = {(a.peer_id, a.curve_key): a for a in (honest, forged, invented)}
    assert _known(asked, [rec]) == {A: honest}
    assert _known({(A, forged.curve_key): forged}, [rec]) == {}


def test_signed_proof_of_malice_bans_at_once():
    b = Blame(ban_after=3, ban_steps=10)
    b.offend(Offence(C, 0, 4, "announced attempt 1048576", own=True, ban=True))
    assert b.banned(5) == {C} and b.banned(14) == set()
