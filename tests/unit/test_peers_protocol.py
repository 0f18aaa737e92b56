"""The pure parts of peers/: message and record validation, shard checks, consensus rules."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
import torch

from compression.codec import get_codec
from compression.wire import WireLimits, pack
from peers.config import SwarmConfig
from peers.consensus import majority_state, tally, vote_hash, votes_needed
from peers.dht import SwarmDHT, peer_id_of
from peers.errors import Malformed
from peers.messages import header, parse
from peers.records import Announcement, HistoryEntry, PeerRecord, RoundState
from peers.rounds import check_shard
from peers.schema import canonical_bytes, opt_vote, req_endpoint, req_float, req_int

KEY = "A" * 40
LIMITS = WireLimits(max_frame_bytes=1 << 20)


def _parse(h: dict, payload: bytes | None = None, key: str = KEY):
    return parse(h, "run", key, payload, 0, LIMITS)


def _join(**over: object) -> dict:
    h = header(
        "JOIN",
        "run",
        0,
        3,
        0,
        "ab" * 10,
        endpoint="tcp://127.0.0.1:5555",
        curve_key=KEY,
        weight=2.0,
        params_hash="h",
        numel=1000,
        codec="int8",
        block_size=256,
        vote=None,
    )
    h.update(over)
    return h


def test_typed_fields_reject_lookalikes():
    with pytest.raises(Malformed):
        req_int({"x": True}, "x")  # bool is not a step number
    with pytest.raises(Malformed):
        req_int({"x": -1}, "x")
    with pytest.raises(Malformed):
        req_float({"x": math.nan}, "x")
    for bad in ("ipc:///tmp/x", "tcp://host", "tcp://a b:1", "inproc://x"):
        with pytest.raises(Malformed):
            req_endpoint({"e": bad}, "e")
    assert req_endpoint({"e": "tcp://10.0.0.1:9000"}, "e") == "tcp://10.0.0.1:9000"
    with pytest.raises(Malformed):
        opt_vote({"vote": {"blob": "x" * 10_000}})


def test_join_parses_and_must_match_the_authenticated_key():
    m = _parse(_join())
    assert m.kind == "JOIN" and m.step == 3 and m.body["ann"].weight == 2.0
    with pytest.raises(Malformed, match="curve_key differs"):
        _parse(_join(), key="B" * 40)


@pytest.mark.parametrize(
    "over,match",
    [
        ({"t": "EVIL"}, "unknown message kind"),
        ({"run": "other"}, "another run"),
        ({"step": "3"}, "field 'step'"),
        ({"weight": math.inf}, "field 'weight'"),
        ({"endpoint": "ipc:///x"}, "field 'endpoint'"),
    ],
)
def test_bad_headers_are_rejected_with_the_reason(over, match):
    with pytest.raises(Malformed, match=match):
        _parse(_join(**over))


def test_begin_members_must_be_sorted_and_unique():
    mem = {"endpoint": "tcp://127.0.0.1:1", "weight": 1.0, "vote": None}
    members = [
        {**mem, "peer_id": "bb" * 10, "curve_key": "B" * 40},
        {**mem, "peer_id": "aa" * 10, "curve_key": "C" * 40},
    ]
    h = header(
        "BEGIN",
        "run",
        0,
        0,
        0,
        "aa" * 10,
        rid="00" * 8,
        members=members,
        params_hash="h",
        numel=10,
        codec="int8",
        block_size=256,
    )
    with pytest.raises(Malformed, match="sorted"):
        _parse(h)
    h["members"] = members[::-1]
    assert [m.peer_id for m in _parse(h).body["members"]] == ["aa" * 10, "bb" * 10]


def _part() -> dict:
    return header("PART", "run", 0, 0, 0, "ab" * 10, rid="00" * 8, shard=0)


def test_shard_frames_are_validated_on_arrival():
    enc = get_codec("int8").encode(torch.randn(512))
    assert _parse(_part(), pack(enc)).enc.numel == 512
    with pytest.raises(Malformed, match="without a payload"):
        _parse(_part())
    with pytest.raises(Malformed, match="shard frame"):
        _parse(_part(), pack(enc)[:-5])  # truncated
    nan = msgpack.packb(
        {
            "v": 1,
            "codec": "int8",
            "shape": [256],
            "dtype": "float32",
            "block": 256,
            "scales": struct.pack("<f", math.nan),
            "payload": bytes(256),
        },
        use_bin_type=True,
    )
    with pytest.raises(Malformed, match="NaN"):
        _parse(_part(), nan)
    with pytest.raises(Malformed, match="1-D"):
        _parse(_part(), pack(get_codec("int8").encode(torch.randn(2, 256))))
    with pytest.raises(Malformed, match="exceeds"):
        _parse(_part(), bytes(2 << 20))


def test_a_shard_must_cover_exactly_its_range_with_our_codec():
    local = get_codec("int8").encode(torch.randn(1024))
    good = local.slice(256, 768)
    check_shard(good, (256, 768), local)
    with pytest.raises(Malformed, match="shape"):
        check_shard(local.slice(256, 512), (256, 768), local)
    with pytest.raises(Malformed, match="codec"):
        check_shard(get_codec("int8", 128).encode(torch.randn(512)), (256, 768), local)


def test_votes_commit_at_quorum_and_min_peers():
    grow = {"kind": "experts", "factor": 2}
    same = {"factor": 2, "kind": "experts"}  # key order must not matter
    assert vote_hash(grow) == vote_hash(same) and canonical_bytes(grow) == canonical_bytes(same)
    assert votes_needed(3, 2 / 3, 1) == 2
    assert tally([grow, same, None], 2 / 3, 1) == grow
    assert tally([grow, None, None], 2 / 3, 1) is None
    assert tally([grow, {"kind": "depth", "factor": 2}, None], 2 / 3, 1) is None
    assert tally([grow, grow], 2 / 3, 3) is None  # fewer voters than min_peers
    assert tally([None, None], 2 / 3, 1) is None


def test_majority_state_prefers_the_majority_then_the_leader():
    states = {"a": ("h1", 10), "b": ("h2", 10), "c": ("h2", 10)}
    assert majority_state(states, "a") == ("h2", 10)
    assert majority_state({"a": ("h1", 10), "b": ("h2", 10)}, "b") == ("h2", 10)


def test_records_round_trip_and_reject_garbage():
    rec = PeerRecord(
        "ab" * 10,
        "tcp://127.0.0.1:1",
        KEY,
        1,
        5,
        "h5",
        ((4, "h4", 3), (5, "h5", 3)),
        1024,
        100.0,
        3.5,
        False,
        True,
        RoundState(1, 5, 0, "00" * 8, "voted"),
        ("11" * 8,),
        1.0,
        info={"loss": 2.5, "step": 5},
    )
    assert PeerRecord.from_dict(rec.to_dict()) == rec
    assert rec.public()["loss"] == 2.5 and rec.public()["arch_epoch"] == 1
    for bad in (
        {"info": {"x": [1, 2]}},
        {"lineage": [[1, "h"]]},
        {"lineage": [[i, "h", 1] for i in range(17)]},
        {"round": [1, 5, 0, "00" * 8, "dancing"]},
        {"ready": 1},
        {"commits": ["zz"]},
        {"eta_s": float("nan")},
    ):
        with pytest.raises(Malformed):
            PeerRecord.from_dict({**rec.to_dict(), **bad})
    ann = Announcement(
        "ab" * 10, "tcp://127.0.0.1:1", KEY, 0, 1.0, "h", 10, "int8", 256, {"kind": "depth"}
    )
    assert Announcement.from_dict(ann.to_dict()) == ann
    ev = HistoryEntry(
        0, 7, {"kind": "depth"}, vote_hash({"kind": "depth"}), ("ab" * 10,), "ab" * 10
    )
    assert HistoryEntry.from_dict(ev.to_dict()) == ev


def test_dht_records_must_be_written_by_the_peer_they_name():
    owner = b"[owner:ssh-rsa AAAAkey]"
    value = {"peer_id": peer_id_of(owner), "x": 1}
    assert SwarmDHT._check(b"name" + owner, value, lambda d: d) == value
    with pytest.raises(Malformed, match="not the signer"):
        SwarmDHT._check(b"name[owner:ssh-rsa BBBBother]", value, lambda d: d)
    with pytest.raises(Malformed, match="unsigned"):
        SwarmDHT._check(b"name", value, lambda d: d)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        SwarmConfig(run="bad name!")
    with pytest.raises(ValueError):
        SwarmConfig(run="ok", quorum=0.0)
    with pytest.raises(ValueError):
        SwarmConfig(run="ok", min_peers=0)
