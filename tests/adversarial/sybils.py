"""Raw identities for the hostile peer: invented members and an anonymous flooder.

Issue #9 items 3 and 7. Nothing here is announced in the DHT or signed by a DHT key: each
fake is just a fresh CURVE keypair with its own zmq data plane, which is all the current
data plane asks of a round member. Each fake reuses the real `Transport`, `Mailbox` and
`RoundRunner`, so when a leader admits it, it takes part in the round like any member.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

import torch
import zmq

from compression.codec import get_codec
from compression.wire import WireLimits, pack, pack_message
from peers.config import SwarmConfig
from peers.errors import RoundAborted, RoundFailed
from peers.group import Group, RoundRequest
from peers.mailbox import Mailbox
from peers.membership import REPLY_KINDS
from peers.messages import Member, header
from peers.records import Announcement
from peers.rounds import RoundRunner
from peers.transport import Transport

log = logging.getLogger("hostile.sybils")


def fake_peer_id() -> str:
    """An id that looks like a real one (20 hex chars), backed by no DHT key at all."""
    return secrets.token_hex(10)


@dataclass(frozen=True)
class FakeJoin:
    """What one fake member says in its JOIN and does if it gets a BEGIN."""

    req: RoundRequest
    attempt: int
    leader: Member
    vote: dict | None
    params_hash: str  # the real one, or a lie ("EVIL") to outvote the leader
    take_part: bool  # run the data phase after BEGIN (else: only the JOIN)
    weight: float = 1.0  # tiny next to honest token counts: the fake's zero Δ barely counts
    claim_id: str | None = None  # impersonate this peer id instead of inventing one


class FakeMember(threading.Thread):
    """One invented member for one attempt: JOIN the leader, and on BEGIN, average a zero Δ.

    Its zmq sockets are created, used and closed on its own thread, as zmq requires."""

    def __init__(self, cfg: SwarmConfig, plan: FakeJoin, deadline: float) -> None:
        super().__init__(name="fake-member", daemon=True)
        self.cfg, self.plan, self.deadline = cfg, plan, deadline
        self.peer_id = plan.claim_id or fake_peer_id()
        self.joined = threading.Event()  # the JOIN is on the wire
        self.outcome = "none"  # joined | begin | committed | aborted | <reply kind>

    def run(self) -> None:
        t = Transport(self.cfg.host, 0, None, self.cfg.max_frame_bytes)
        t.start()
        try:
            self._run(t)
        except (RoundAborted, RoundFailed) as e:
            self.outcome = f"aborted: {e}"
        except Exception as e:  # a test helper must report, not die silently
            self.outcome = f"error: {type(e).__name__}: {e}"
            log.exception("fake member %s failed", self.peer_id)
        finally:
            self.joined.set()
            t.close()

    def _run(self, t: Transport) -> None:
        p, cfg = self.plan, self.cfg
        limits = WireLimits(max_frame_bytes=cfg.max_frame_bytes)
        mb = Mailbox(t, cfg.run, self.peer_id, limits, 4 * cfg.max_frame_bytes)
        mb.set_scope(p.req.epoch, p.req.step, p.attempt)
        ann = Announcement(
            self.peer_id,
            t.endpoint,
            t.curve_key,
            p.attempt,
            p.weight,
            params_hash=p.params_hash,
            numel=p.req.numel,
            codec=p.req.codec,
            block_size=p.req.block_size,
            vote=p.vote,
        )
        body = {k: v for k, v in ann.to_dict().items() if k not in ("peer_id", "attempt")}
        mb.send(p.leader.endpoint, p.leader.curve_key, "JOIN", **body)
        self.outcome = "joined"
        self.joined.set()
        if not p.take_part:
            time.sleep(1.0)  # linger: let the JOIN leave before the socket closes
            return
        msg = mb.get(
            self.deadline,
            lambda m: m.kind in REPLY_KINDS and m.sender_key == p.leader.curve_key,
        )
        if msg is None or msg.kind != "BEGIN":
            self.outcome = "no reply" if msg is None else msg.kind
            return
        self.outcome = "begin"
        members = tuple(msg.body["members"])
        lead = next(m for m in members if m.peer_id == p.leader.peer_id)
        g = Group(msg.body["rid"], p.req.epoch, p.req.step, p.attempt, lead, members, p.params_hash)
        zero = get_codec(p.req.codec, p.req.block_size).encode(torch.zeros(p.req.numel))
        runner = RoundRunner(
            mb,
            self.peer_id,
            cfg.phase_timeout_s,
            on_phase=lambda g, phase: None,  # a fake has no DHT record to publish
            records=dict,  # ... nor any to read: stuck means aborted
            poll_s=cfg.heartbeat_s / 2,
        )
        runner.run(g, zero, self.deadline)
        self.outcome = "committed"


def impersonate(
    cfg: SwarmConfig,
    req: RoundRequest,
    attempt: int,
    leader: Member,
    victims: list[str],
    delays: tuple[float, ...],
) -> threading.Thread:
    """JOINs that reuse honest peers' ids with our own CURVE key (issue #9 item 3): a
    leader keeps one JOIN per id, and then drops the id whose key does not match its
    announcement, so the honest peer is evicted. Sent `delays` seconds after the start,
    more than once, so that ours is the last JOIN under that id."""

    def send() -> None:
        t = Transport(cfg.host, 0, None, cfg.max_frame_bytes)
        t.start()
        try:
            t0 = time.monotonic()
            for delay in delays:
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                for pid in victims:
                    ann = Announcement(
                        pid,
                        t.endpoint,
                        t.curve_key,
                        attempt,
                        req.weight,
                        req.params_hash,
                        req.numel,
                        req.codec,
                        req.block_size,
                        None,
                    )
                    body = {
                        k: v for k, v in ann.to_dict().items() if k not in ("peer_id", "attempt")
                    }
                    h = header("JOIN", cfg.run, req.epoch, req.step, attempt, pid, **body)
                    t.send(leader.endpoint, leader.curve_key, h)
            time.sleep(0.5)
        finally:
            t.close()

    th = threading.Thread(target=send, name="impersonate", daemon=True)
    th.start()
    return th


def flood(
    run: str, epoch: int, step: int, endpoint: str, server_key: str, count: int, mib: int
) -> float:
    """Issue #9 item 7: `count` messages of `mib` MiB each, from a fresh CURVE key that no
    one admitted, to one peer's data plane while it trains (nobody reads its inbox then).
    Each is a well-formed PART for a far-future step, so even once read it stays buffered.
    Returns the seconds until every byte left our socket."""
    numel = mib << 20
    frame = pack(get_codec("int8", 256).encode(torch.zeros(numel)))
    h = pack_message(
        header(
            "PART", run, epoch, step + 1000, 0, fake_peer_id(), rid=secrets.token_hex(8), shard=0
        )
    )
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
    s.curve_serverkey = server_key.encode()
    s.connect(endpoint)
    t0 = time.monotonic()
    try:
        for _ in range(count):
            s.send_multipart([h, frame], copy=False)  # zero-copy: one buffer, sent N times
    finally:
        s.close(linger=60_000)  # blocks until the queue is on the wire (or 60 s)
        ctx.term()
    return time.monotonic() - t0
