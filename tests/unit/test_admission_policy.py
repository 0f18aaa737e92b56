"""Admission and identity: run files, certificates, the policy, identity keys, what the swarm
view keeps, and the data plane's key gate (peers/admission.py, identity.py, progress.py,
transport.py). The multi-process version is tests/integration/test_admission.py."""

from __future__ import annotations

import json
import logging
import os
import stat
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peers.admission import (
    Admission,
    Certificate,
    NotAdmitted,
    RunFile,
    load_or_create_owner_key,
    peer_settings,
    public_hex,
    sign,
    verify,
)
from peers.config import SwarmConfig
from peers.dht import SwarmDHT
from peers.errors import Malformed
from peers.identity import load, load_or_create, owner_tag, peer_id_of, peer_id_of_key
from peers.progress import SwarmView
from peers.records import Announcement, HistoryEntry, PeerRecord
from peers.transport import KeyGate, Transport

OWNER = Ed25519PrivateKey.generate()
OWNER_HEX = public_hex(OWNER)
ALICE, BOB = "a1" * 10, "b2" * 10
NOW = 1_800_000_000
KEY = "A" * 40


def cert_for(peer: str, run: str = "lab", expires: int = NOW + 3600, owner=OWNER) -> Certificate:
    return sign(owner, run, peer, expires)


# ---- certificates -------------------------------------------------------------------------


def test_a_signed_certificate_verifies_and_survives_its_dict_form():
    c = cert_for(ALICE)
    verify(c, OWNER_HEX, "lab", ALICE, NOW)
    assert Certificate.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize(
    "cert, run, peer, match",
    [
        (cert_for(ALICE, expires=NOW - 1), "lab", ALICE, "expired on"),
        (cert_for(ALICE, expires=NOW), "lab", ALICE, "expired on"),
        (cert_for(ALICE, run="other"), "lab", ALICE, "for run 'other', not 'lab'"),
        (cert_for(ALICE), "lab", BOB, f"for peer {ALICE}, not {BOB}"),
        # Signed by someone else's owner key: well formed, but not this run's owner.
        (cert_for(ALICE, owner=Ed25519PrivateKey.generate()), "lab", ALICE, "bad signature"),
    ],
)
def test_certificates_that_do_not_admit_say_why(cert, run, peer, match):
    with pytest.raises(NotAdmitted, match=match):
        verify(cert, OWNER_HEX, run, peer, NOW)


def test_edited_certificates_fail_the_signature():
    c = cert_for(ALICE)
    for forged in (
        Certificate(c.run, c.peer_id, c.expires + 86400 * 365, c.sig),  # a longer expiry
        Certificate(c.run, BOB, c.expires, c.sig),  # a stolen signature for another id
        Certificate(c.run, c.peer_id, c.expires, "00" * 64),
    ):
        peer = forged.peer_id
        with pytest.raises(NotAdmitted, match="bad signature"):
            verify(forged, OWNER_HEX, "lab", peer, NOW)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "cert",
        [],
        {},
        {"run": "lab", "peer_id": ALICE, "expires": NOW},  # no signature
        {"run": "lab", "peer_id": ALICE, "expires": NOW, "sig": "ab" * 64, "extra": 1},
        {"run": "lab", "peer_id": ALICE, "expires": "soon", "sig": "ab" * 64},
        {"run": "lab", "peer_id": ALICE, "expires": True, "sig": "ab" * 64},
        {"run": "lab", "peer_id": ALICE, "expires": -1, "sig": "ab" * 64},
        {"run": "lab", "peer_id": ALICE, "expires": 1 << 50, "sig": "ab" * 64},
        {"run": "lab", "peer_id": ALICE, "expires": NOW, "sig": "ab" * 63},
        {"run": "lab", "peer_id": ALICE, "expires": NOW, "sig": "zz" * 64},
        {"run": "lab", "peer_id": ALICE, "expires": NOW, "sig": "ab" * 5000},
        {"run": "lab", "peer_id": "A1" * 10, "expires": NOW, "sig": "ab" * 64},
        {"run": "lab", "peer_id": ALICE * 2, "expires": NOW, "sig": "ab" * 64},
        {"run": "bad run!", "peer_id": ALICE, "expires": NOW, "sig": "ab" * 64},
        {"run": "x" * 100, "peer_id": ALICE, "expires": NOW, "sig": "ab" * 64},
    ],
)
def test_garbage_certificates_are_malformed(bad):
    with pytest.raises(Malformed):
        Certificate.from_dict(bad)


def test_sign_refuses_what_no_peer_could_use():
    with pytest.raises(ValueError, match="20 hex digits"):
        sign(OWNER, "lab", "not-an-id", NOW)
    with pytest.raises(ValueError, match="run name"):
        sign(OWNER, "bad run!", ALICE, NOW)


# ---- the policy ---------------------------------------------------------------------------


def test_open_mode_admits_everyone_owner_mode_only_the_certified():
    open_run = Admission("lab")
    assert open_run.open and open_run.admits(ALICE, None)
    private = Admission("lab", OWNER_HEX)
    assert not private.open
    assert private.admits(ALICE, cert_for(ALICE), NOW)
    assert "no certificate" in private.why_not(ALICE, None, NOW)
    assert "not" in private.why_not(BOB, cert_for(ALICE), NOW)
    assert "expired" in private.why_not(ALICE, cert_for(ALICE), NOW + 7200)
    with pytest.raises(NotAdmitted, match="diloco-grow admit"):
        private.require(ALICE, None)
    with pytest.raises(ValueError, match="owner key must be"):
        Admission("lab", "zz")


def test_swarm_config_needs_a_cert_in_an_admitted_run():
    with pytest.raises(ValueError, match="needs this peer's certificate"):
        SwarmConfig(run="lab", owner_key=OWNER_HEX)
    with pytest.raises(ValueError, match="owner key must be"):
        SwarmConfig(run="lab", owner_key="ab" * 8, cert=cert_for(ALICE))
    cfg = SwarmConfig(run="lab", owner_key=OWNER_HEX, cert=cert_for(ALICE))
    assert not cfg.admission.open and SwarmConfig(run="lab").admission.open


# ---- files --------------------------------------------------------------------------------


def test_run_file_round_trip_and_garbage(tmp_path):
    path = tmp_path / "run.json"
    rf = RunFile("lab", OWNER_HEX)
    rf.save(path)
    assert RunFile.load(path) == rf and rf.admission() == Admission("lab", OWNER_HEX)
    assert RunFile("lab", OWNER_HEX, "open").admission().open
    good = json.loads(path.read_text())
    cases = {
        "not json": "invalid JSON",
        json.dumps([1]): "expected a JSON object",
        json.dumps({**good, "diloco_grow_run": 2}): "not a diloco-grow run file",
        json.dumps({**good, "owner_key": "ab"}): "owner key must be",
        json.dumps({**good, "mode": "closed"}): "mode 'closed'",
        json.dumps({**good, "run": "a b"}): "run name",
        json.dumps({**good, "admins": []}): "unknown field",
    }
    for text, match in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            RunFile.load(path)
    with pytest.raises(ValueError, match="cannot read run file"):
        RunFile.load(tmp_path / "missing.json")


def test_owner_and_identity_keys_are_private_stable_and_checked(tmp_path):
    key, created = load_or_create_owner_key(tmp_path / "owner.key")
    again, created2 = load_or_create_owner_key(tmp_path / "owner.key")
    assert created and not created2 and public_hex(key) == public_hex(again)
    assert stat.S_IMODE(os.stat(tmp_path / "owner.key").st_mode) == 0o600

    ident = load_or_create(tmp_path / "peer.key")
    assert stat.S_IMODE(os.stat(tmp_path / "peer.key").st_mode) == 0o600
    # Restarting with the same key file gives the same peer id.
    assert peer_id_of_key(load_or_create(tmp_path / "peer.key")) == peer_id_of_key(ident)
    assert peer_id_of_key(ident) == peer_id_of(owner_tag(ident))
    assert load(tmp_path / "peer.key").sign(b"x")  # hivemind can sign with it
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left
    # The wrong kind of key, or none at all, is a clear error.
    with pytest.raises(ValueError, match="not an RSA private key"):
        load(tmp_path / "owner.key")
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        load_or_create_owner_key(tmp_path / "peer.key")
    (tmp_path / "junk.key").write_text("hello")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        load(tmp_path / "junk.key")


def test_peer_settings_say_what_is_missing(tmp_path):
    run_file = tmp_path / "run.json"
    RunFile("lab", OWNER_HEX).save(run_file)
    key_file = tmp_path / "peer.key"
    peer_id = peer_id_of_key(load_or_create(key_file))
    cert_file = tmp_path / "peer.cert"
    sign(OWNER, "lab", peer_id, int(time.time()) + 3600).save(cert_file)

    with pytest.raises(ValueError, match="--run-file RUN.json .* or --open"):
        peer_settings(None, None, None, None, False)
    assert peer_settings(None, None, None, None, True) == {"run": "diloco", "identity_key": None}
    with pytest.raises(ValueError, match="needs --key"):
        peer_settings(None, str(run_file), None, None, False)
    with pytest.raises(ValueError, match=f"needs --cert: send this peer's id {peer_id}"):
        peer_settings(None, str(run_file), str(key_file), None, False)
    with pytest.raises(ValueError, match="is for run 'lab', not 'other'"):
        peer_settings("other", str(run_file), str(key_file), str(cert_file), False)
    with pytest.raises(ValueError, match="--open contradicts"):
        peer_settings(None, str(run_file), str(key_file), str(cert_file), True)
    with pytest.raises(NotAdmitted, match="is --key the key file"):
        peer_settings(None, str(run_file), str(tmp_path / "other.key"), str(cert_file), False)
    got = peer_settings("lab", str(run_file), str(key_file), str(cert_file), False)
    assert got["owner_key"] == OWNER_HEX and got["cert"].peer_id == peer_id
    cfg = SwarmConfig(**got)
    assert cfg.identity_key == str(key_file) and not cfg.admission.open


# ---- records and the view -----------------------------------------------------------------


def record(peer_id: str, cert: Certificate | None = None, key: str = KEY) -> PeerRecord:
    return PeerRecord(
        peer_id, "tcp://127.0.0.1:1", key, 0, 0, "h", ((0, "h", 0),), 0, 0.0, 0.0, False,
        False, None, (), time.time(), cert=cert,
    )  # fmt: skip


def test_records_carry_a_validated_certificate():
    c = cert_for(ALICE)
    rec = record(ALICE, c)
    assert PeerRecord.from_dict(rec.to_dict()) == rec
    assert PeerRecord.from_dict(record(ALICE).to_dict()).cert is None
    for bad in ({"cert": "x"}, {"cert": {**c.to_dict(), "sig": "nothex"}}, {"cert": []}):
        with pytest.raises(Malformed):
            PeerRecord.from_dict({**rec.to_dict(), **bad})
    ev = HistoryEntry(0, 3, {"kind": "depth"}, "ab" * 32, (ALICE,), ALICE, c)
    assert HistoryEntry.from_dict(ev.to_dict()) == ev


def test_one_signing_key_has_one_named_record():
    owner = b"[owner:ssh-rsa AAAAkey]"
    value = {"peer_id": peer_id_of(owner)}
    named = value["peer_id"].encode() + owner
    assert SwarmDHT._check(named, value, lambda d: d, named=True) == value
    with pytest.raises(Malformed, match="under another name"):
        SwarmDHT._check(b"sybil-2" + owner, value, lambda d: d, named=True)


class FakeDHT:
    """Stands in for SwarmDHT: fixed records per key, as fetch() would return them."""

    def __init__(self, data: dict[str, list]) -> None:
        self.data = data

    def key(self, *parts: object) -> str:
        return "/".join(["lab", *map(str, parts)])

    def fetch(self, key: str, parse, named: bool = False) -> list:
        return list(self.data.get(key, []))


def test_the_view_keeps_only_admitted_peers_and_warns_once(caplog):
    mallory = "c3" * 10
    dht = FakeDHT(
        {
            "lab/peers": [
                record(ALICE, cert_for(ALICE, expires=int(time.time()) + 60), key="K" * 40),
                record(BOB, None, key="B" * 40),  # no certificate
                record(mallory, cert_for(ALICE), key="M" * 40),  # someone else's
            ],
            "lab/round/0/0": [
                Announcement(pid, "tcp://127.0.0.1:1", KEY, 0, 1.0, "h", 10, "int8", 256)
                for pid in (ALICE, BOB, mallory)
            ],
            "lab/history": [
                HistoryEntry(0, 3, {"k": 1}, "ab" * 32, (ALICE,), ALICE, cert_for(ALICE)),
                HistoryEntry(1, 5, {"k": 1}, "ab" * 32, (BOB,), BOB, None),
            ],
        }
    )
    seen: list = []
    cfg = SwarmConfig(run="lab", owner_key=OWNER_HEX, cert=cert_for(ALICE))
    view = SwarmView(dht, ALICE, cfg, on_refresh=seen.append)
    with caplog.at_level(logging.WARNING, logger="peers.progress"):
        for _ in range(3):
            view.refresh()
    assert [r.peer_id for r in view.records()] == [ALICE]
    assert [[r.peer_id for r in recs] for recs in seen] == [[ALICE]] * 3  # the allowlist feed
    assert set(view.announcements(0, 0)) == {ALICE}
    assert [e.peer_id for e in view.history()] == [ALICE]
    ignored = [r.message for r in caplog.records if "ignoring" in r.message]
    assert len(ignored) == 2, ignored  # Bob and Mallory, once each however many reads
    # An open run keeps everyone, as before.
    view = SwarmView(dht, ALICE, SwarmConfig(run="lab"))
    view.refresh()
    assert len(view.records()) == 3 and len(view.announcements(0, 0)) == 3


# ---- the data plane's gate ----------------------------------------------------------------


def test_key_gate_ages_keys_out_and_counts_refusals():
    gate = KeyGate(keep_s=0.2)
    gate.own = "O" * 40
    assert "O" * 40 in gate and gate.callback("*", b"O" * 40)
    assert not gate.callback("*", b"S" * 40) and gate.denied == 1
    gate.allow(["K" * 40])
    assert gate.callback("*", b"K" * 40)
    time.sleep(0.3)
    assert "K" * 40 not in gate  # its record is gone for longer than keep_s


def test_a_refused_key_delivers_nothing_until_admitted_then_everything_once():
    """Two transports: `server` admits only listed keys. Nothing a refused client sends gets
    through; once the server admits it, the client's redial (dealers.py) delivers the
    control messages it had sent, in order and once each, within about REDIAL_S."""
    server = Transport("127.0.0.1", 0, None, 1 << 20, gate=KeyGate(keep_s=60))
    client = Transport("127.0.0.1", 0, None, 1 << 20)
    server.start()
    client.start()

    def pump(seconds: float, want: int = 1 << 30) -> list[dict]:
        got, until = [], time.monotonic() + seconds
        while time.monotonic() < until and len(got) < want:
            client.recv(0.05)  # the client's own loop: it services its links meanwhile
            env = server.recv(0.05)
            if env is not None:
                assert env.sender_key == client.curve_key
                got.append(env.header)
        return got

    try:
        for i in range(3):
            client.send(server.endpoint, server.curve_key, {"t": "HELLO", "i": i})
        assert pump(1.5) == [] and server.denied >= 2  # refused, redialled, refused again
        server.allow([client.curve_key])
        t0 = time.monotonic()
        got = pump(3.0, want=3)
        assert [h["i"] for h in got] == [0, 1, 2], got
        assert time.monotonic() - t0 < 1.5  # the next redial, REDIAL_S = 0.5 s later
        assert pump(0.3) == []  # once each
        client.send(server.endpoint, server.curve_key, {"t": "HELLO", "i": 9})
        assert [h["i"] for h in pump(0.5)] == [9]
        assert client._dealers.redials >= 2
        # An established connection is not asked again: frames are checked per key too.
        server.gate.keep_s = 0.0
        time.sleep(0.01)
        client.send(server.endpoint, server.curve_key, {"t": "HELLO", "i": 10})
        assert pump(0.5) == [] and server.refused >= 1
    finally:
        client.close()
        server.close()
