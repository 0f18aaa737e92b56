"""The facade the app uses: one `Swarm` per peer process.

    swarm = Swarm(SwarmConfig(run="demo", initial_peers=(maddr,)))
    swarm.start()                       # DHT (+ its p2pd child) and the zmq data plane
    res = swarm.all_reduce(encoded_delta, tokens, arch_epoch=e, step=s, params_hash=h, vote=v)
    # res.mean is bit-identical on every member; res.committed_vote is the agreed growth event
    swarm.shutdown()

`all_reduce` retries internally (new group without dead or stalled peers) until
`round_timeout_s`, then raises RoundFailed; it raises NeedResync when our θ_g is not the
group's or the swarm already moved past our step (a peer that misses a round, e.g. because it
arrived after `matchmaking_s`, must download state). Calls are serialised by a lock, so an app
may run it in a background thread (overlapping rounds with compute) as long as rounds do not
overlap each other.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from compression.codec import Encoded
from compression.wire import WireLimits
from peers.config import SwarmConfig
from peers.consensus import tally, vote_hash
from peers.dht import SwarmDHT
from peers.errors import Malformed, NeedResync, RoundAborted, RoundFailed
from peers.group import AllReduceResult, Group, RoundRequest
from peers.mailbox import Mailbox
from peers.membership import Matchmaker
from peers.messages import Member
from peers.records import HistoryEntry, PeerRecord
from peers.rounds import Hook, RoundRunner
from peers.schema import opt_info, opt_vote

log = logging.getLogger(__name__)
__all__ = ["AllReduceResult", "NeedResync", "RoundFailed", "Swarm", "SwarmConfig"]


class Swarm:
    def __init__(
        self,
        cfg: SwarmConfig,
        *,
        state_endpoint: str | None = None,
        state_curve_key: str | None = None,
        hook: Hook | None = None,
    ) -> None:
        self.cfg = cfg
        self.dht = SwarmDHT(
            cfg.run, cfg.host, cfg.port, cfg.announce_host, cfg.initial_peers, cfg.dht_timeout_s
        )
        self.peer_id = self.dht.peer_id
        self._state = (state_endpoint, state_curve_key)
        self._hook = hook
        self._lock = threading.Lock()
        self._info: dict = {}
        self._epoch, self._last_round = 0, -1
        self._in_round: tuple[int, int, int] | None = None
        self._started = False
        self.visible_maddrs: list[str] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        from peers.transport import Transport  # zmq threads only after the DHT has forked

        self.dht.start()
        self.transport = Transport(
            self.cfg.host, self.cfg.data_port, self.cfg.announce_host, self.cfg.max_frame_bytes
        )
        self.transport.start()
        self.me = Member(self.peer_id, self.transport.endpoint, self.transport.curve_key, 0.0)
        limits = WireLimits(max_frame_bytes=self.cfg.max_frame_bytes)
        # Early PARTs (before our BEGIN) are buffered: allow a few rounds' worth of shards.
        self.mailbox = Mailbox(
            self.transport, self.cfg.run, self.peer_id, limits, 4 * self.cfg.max_frame_bytes
        )
        self.matchmaker = Matchmaker(self.cfg, self.dht, self.mailbox, self.me)
        self.runner = RoundRunner(self.mailbox, self.peer_id, self.cfg.phase_timeout_s, self._hook)
        self.visible_maddrs = self.dht.visible_maddrs()
        self._started = True
        self._publish(wait=True)
        self.dht.keep_alive(
            self.dht.key("peers"), self.peer_id, self._record, self.cfg.record_ttl_s
        )
        log.info(
            "peer %s up: data plane %s, DHT %s", self.peer_id, self.me.endpoint, self.visible_maddrs
        )

    def shutdown(self) -> None:
        """Leave any round in progress, close sockets, stop the DHT and its p2pd child.

        Safe to call twice and from another thread than the one in all_reduce (that call
        then raises RoundFailed within a fraction of a second; nothing is applied).
        """
        if getattr(self, "mailbox", None) is not None:
            self.mailbox.closing.set()
        got = self._lock.acquire(timeout=max(5.0, self.cfg.dht_timeout_s))
        try:
            if getattr(self, "transport", None) is not None:
                self.transport.close()
                self.transport = None
            self.dht.shutdown()
            self._started = False
        finally:
            if got:
                self._lock.release()

    def __enter__(self) -> Swarm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- the round ----------------------------------------------------------------------

    def all_reduce(
        self,
        local: Encoded,
        weight: float,
        *,
        arch_epoch: int,
        step: int,
        params_hash: str,
        vote: dict | None = None,
    ) -> AllReduceResult:
        """Weighted mean of `local` over a group of live peers at (arch_epoch, step)."""
        if not self._started:
            raise RuntimeError("Swarm.start() first")
        if not (weight >= 0 and weight < float("inf")):
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        if not isinstance(params_hash, str) or not 0 < len(params_hash) <= 128:
            raise ValueError("params_hash must be a non-empty str of <= 128 chars")
        try:
            opt_vote({"vote": vote})
        except Malformed as e:
            raise ValueError(f"invalid vote: {e}") from None
        req = RoundRequest(
            arch_epoch,
            step,
            float(weight),
            params_hash,
            local.numel,
            local.codec,
            local.block_size,
            vote,
        )
        with self._lock:
            return self._all_reduce(local, req)

    def _all_reduce(self, local: Encoded, req: RoundRequest) -> AllReduceResult:
        t0 = time.monotonic()
        deadline = t0 + self.cfg.round_timeout_s
        sent0, recv0 = self.transport.bytes_sent, self.transport.bytes_recv
        self._epoch = max(self._epoch, req.epoch)
        attempt, why = 0, "no attempt finished"
        while time.monotonic() < deadline:
            try:
                group = self.matchmaker.form(req, attempt, deadline)
                formed = time.monotonic()
                log.debug(
                    "step %d: group of %d formed after %.3fs (attempt %d, leader %s)",
                    req.step,
                    len(group.members),
                    formed - t0,
                    group.attempt,
                    group.leader.peer_id,
                )
                self._set_in_round((req.epoch, req.step, group.attempt))
                mean = self.runner.run(group, local, deadline)
            except RoundAborted as e:
                why, attempt = str(e), max(e.next_attempt, attempt + 1)
                log.info(
                    "step %d: attempt failed (%s); retrying at attempt %d", req.step, why, attempt
                )
                continue
            finally:
                self._set_in_round(None)
            return self._committed(req, group, mean, (t0, formed), sent0, recv0)
        raise RoundFailed(
            f"no round committed for epoch {req.epoch} step {req.step} within "
            f"{self.cfg.round_timeout_s}s after {attempt} attempts: {why}"
        )

    def _committed(
        self,
        req: RoundRequest,
        g: Group,
        mean: torch.Tensor,
        times: tuple[float, float],
        sent0: int,
        recv0: int,
    ) -> AllReduceResult:
        end = time.monotonic()
        vote = tally([m.vote for m in g.members], self.cfg.quorum, self.cfg.min_peers)
        self._last_round = req.step
        # A committed growth event moves every member to the next architecture epoch; saying
        # so at once lets laggards of the old epoch notice (NeedResync) instead of waiting.
        self._epoch = req.epoch + (1 if vote is not None else 0)
        # Others' progress checks rely on this record; it is sent now, and by the time anyone
        # could need it (after a phase timeout) the DHT has long stored it.
        self._publish(wait=False)
        if vote is not None and g.leader.peer_id == self.peer_id:
            entry = HistoryEntry(
                req.epoch,
                req.step,
                vote,
                vote_hash(vote),
                tuple(m.peer_id for m in g.members),
                self.peer_id,
            )
            self.dht.store(
                self.dht.key("history"), f"{req.epoch}", entry.to_dict(), ttl_s=30 * 24 * 3600.0
            )
        return AllReduceResult(
            mean=mean,
            members=[m.peer_id for m in g.members],
            bytes_sent=self.transport.bytes_sent - sent0,
            bytes_recv=self.transport.bytes_recv - recv0,
            seconds=end - times[0],
            data_seconds=end - times[1],
            committed_vote=vote,
            attempts=g.attempt + 1,
            leader=g.leader.peer_id,
            round_id=g.rid,
        )

    # ---- DHT records --------------------------------------------------------------------

    def publish_progress(self, info: dict) -> None:
        """Attach app progress (step, loss, tokens_per_s, params_hash, ...) to our record."""
        try:
            self._info = opt_info({"info": dict(info)})
        except Malformed as e:
            raise ValueError(f"invalid progress info: {e}") from None
        self._publish(wait=True)

    def advertise_state(self, endpoint: str, curve_key: str) -> None:
        """Publish where our state server listens (peers/state_transfer.py), for joiners."""
        self._state = (endpoint, curve_key)
        self._publish(wait=True)

    def list_peers(self) -> list[dict]:
        """Live peers' records from the DHT (may be stale by up to record_ttl_s)."""
        recs = self.dht.fetch(self.dht.key("peers"), PeerRecord.from_dict)
        return [r.public() for r in sorted(recs, key=lambda r: r.peer_id)]

    def growth_history(self) -> list[dict]:
        """Committed growth events from the DHT, oldest epoch first (one per epoch)."""
        entries = self.dht.fetch(self.dht.key("history"), HistoryEntry.from_dict)
        by_epoch = {e.arch_epoch: e for e in sorted(entries, key=lambda e: e.peer_id)}
        return [by_epoch[k].to_dict() for k in sorted(by_epoch)]

    @property
    def bytes_sent(self) -> int:
        return self.transport.bytes_sent

    @property
    def bytes_recv(self) -> int:
        return self.transport.bytes_recv

    @property
    def dropped_frames(self) -> int:
        return self.transport.dropped

    def _record(self) -> dict:
        return PeerRecord(
            self.peer_id,
            self.me.endpoint,
            self.me.curve_key,
            self._epoch,
            self._last_round,
            self._in_round,
            time.time(),
            self._state[0],
            self._state[1],
            self._info,
        ).to_dict()

    def _set_in_round(self, value: tuple[int, int, int] | None) -> None:
        if value != self._in_round:
            self._in_round = value
            # Not awaited: the flag only narrows a race (see membership.py), and a slow DHT
            # must not delay the data phase.
            self._publish(wait=False)

    def _publish(self, wait: bool) -> None:
        self.dht.store(
            self.dht.key("peers"), self.peer_id, self._record(), self.cfg.record_ttl_s, wait=wait
        )
