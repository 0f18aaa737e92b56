"""The facade the app uses: one `Swarm` per peer process.

    swarm = Swarm(SwarmConfig(run="demo", initial_peers=(maddr,)))
    swarm.start()                  # DHT (+ its p2pd child), zmq data plane, heartbeat thread
    swarm.set_state(epoch, step, params_hash, members)   # after every change of θ_g
    swarm.report(Progress(tokens=..., tokens_per_s=..., eta_s=...))  # while training
    res = swarm.all_reduce(encoded_delta, tokens, arch_epoch=e, step=s, params_hash=h, vote=v)
    # res.mean is bit-identical on every member; res.committed_vote is the agreed growth event
    swarm.shutdown()

`all_reduce` waits until the swarm is ready for the round (every live peer of our step
announced, or the stragglers are past their own ETA), then retries internally (new group
without dead or stalled peers) until `round_timeout_s`, then raises RoundFailed; it raises
NeedResync when the majority line of the swarm holds another θ_g than ours (we are behind
or diverged; lineage.py). Calls are serialised by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import torch

from compression.codec import Encoded
from compression.wire import WireLimits
from peers.blame import Blame
from peers.config import SwarmConfig
from peers.consensus import tally, vote_hash
from peers.dht import SwarmDHT
from peers.errors import Malformed, NeedResync, RoundAborted, RoundFailed
from peers.group import AllReduceResult, Group, RoundRequest
from peers.identity import load_or_create
from peers.lineage import Verdict, verdict
from peers.mailbox import Mailbox
from peers.membership import Matchmaker
from peers.messages import Member
from peers.progress import Progress, SwarmView, at_step
from peers.records import MAX_COMMITS, MAX_LINEAGE, HistoryEntry, PeerRecord, RoundState
from peers.rounds import Hook, RoundRunner
from peers.schema import opt_info, opt_vote

log = logging.getLogger(__name__)
__all__ = ["AllReduceResult", "NeedResync", "Progress", "RoundFailed", "Swarm", "SwarmConfig"]


class Swarm:
    def __init__(
        self,
        cfg: SwarmConfig,
        *,
        state_endpoint: str | None = None,
        state_curve_key: str | None = None,
        hook: Hook | None = None,
        vote_check: Callable[[dict], None] | None = None,
    ) -> None:
        self.cfg = cfg
        # vote_check(vote) raises ValueError for a growth vote the app cannot apply (bad
        # fields, a factor past the model's limits). Such votes never count (leader.py,
        # _committed): one member's garbage vote must not crash or grow every member.
        self._vote_check = vote_check
        self.blame = Blame(cfg.ban_after, cfg.ban_steps)
        self.dht = SwarmDHT(
            cfg.run,
            cfg.host,
            cfg.port,
            cfg.announce_host,
            cfg.initial_peers,
            cfg.dht_timeout_s,
            cfg.rpc_timeout_s,
            identity=None if cfg.identity_key is None else load_or_create(cfg.identity_key),
        )
        self.peer_id = self.dht.peer_id
        # Others would ignore us: refuse to start rather than train alone (NotAdmitted).
        cfg.admission.require(self.peer_id, cfg.cert)
        self._state = (state_endpoint, state_curve_key)
        self._hook = hook
        self._lock = threading.Lock()  # one all_reduce at a time
        self._rec_lock = threading.Lock()  # our record's fields: app, round and heartbeat
        self._info: dict = {}
        # The state we hold (set by the app) and its recent history, for lineage.py.
        self._epoch, self._step, self._hash = 0, 0, "init"
        self._lineage: tuple[tuple[int, str, int], ...] = ()
        self._progress = Progress()
        self._round: RoundState | None = None
        self._commits: deque[str] = deque(maxlen=MAX_COMMITS)
        self._stop = threading.Event()
        self._beats: list[threading.Thread] = []
        self._started = False
        self.visible_maddrs: list[str] = []

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        from peers.transport import KeyGate, Transport  # zmq threads only after the DHT forked

        self.dht.start()
        # An admitted run lets only admitted peers' CURVE keys onto the data plane (ZAP),
        # fed from the view below; a key stays allowed as long as its record lives.
        gate = None if self.cfg.admission.open else KeyGate(self.cfg.record_ttl_s)
        self.transport = transport = Transport(
            self.cfg.host,
            self.cfg.data_port,
            self.cfg.announce_host,
            self.cfg.max_frame_bytes,
            gate,
        )
        self.transport.start()
        self.me = Member(self.peer_id, self.transport.endpoint, self.transport.curve_key, 0.0)
        limits = WireLimits(max_frame_bytes=self.cfg.max_frame_bytes)
        # Early PARTs (before our BEGIN) are buffered: allow a few rounds' worth of shards.
        self.mailbox = Mailbox(
            self.transport, self.cfg.run, self.peer_id, limits, 4 * self.cfg.max_frame_bytes
        )
        # Banned peers (blame.py) vanish from our view: we neither wait for them, nor count
        # their records in the majority line, nor take state from them. Peers the run's
        # owner did not admit are not in it at all (admission.py), and the admitted ones'
        # CURVE keys are all the data plane lets in.
        self.view = SwarmView(
            self.dht,
            self.peer_id,
            self.cfg,
            on_refresh=lambda recs: transport.allow(r.curve_key for r in recs),
            hidden=lambda: self.blame.banned(self._step),
        )
        self.matchmaker = Matchmaker(
            self.cfg,
            self.dht,
            self.mailbox,
            self.me,
            self.view,
            self._check_state,
            self.blame,
            self.vote_ok,
        )
        self.runner = RoundRunner(
            self.mailbox,
            self.peer_id,
            self.cfg.phase_timeout_s,
            on_phase=self._on_phase,
            records=lambda: {r.peer_id: r for r in self.view.live(fresh=True)},
            poll_s=self.cfg.heartbeat_s / 2,
            blame=self.blame,
            robust=self.cfg.robust,
            hook=self._hook,
        )
        self.visible_maddrs = self.dht.visible_maddrs()
        self._started = True
        self._publish(wait=True)
        self.view.refresh()
        self._beats = [
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
            threading.Thread(target=self._watch, name="swarm-view", daemon=True),
        ]
        for t in self._beats:
            t.start()
        log.info(
            "peer %s up: data plane %s, DHT %s", self.peer_id, self.me.endpoint, self.visible_maddrs
        )

    def leave(self) -> None:
        """Make a round in progress end now (RoundFailed) and refuse new ones; safe from a
        signal handler (it only sets an event). shutdown() still has to follow."""
        if getattr(self, "mailbox", None) is not None:
            self.mailbox.closing.set()

    def shutdown(self) -> None:
        """Leave any round in progress, close sockets, stop the DHT and its p2pd child.

        Safe to call twice and from another thread than the one in all_reduce (that call
        then raises RoundFailed within a fraction of a second; nothing is applied).
        """
        if getattr(self, "mailbox", None) is not None:
            self.mailbox.closing.set()
        self._stop.set()
        for t in self._beats:
            t.join(timeout=self.cfg.dht_timeout_s + self.cfg.heartbeat_s)
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
        if not (weight > 0 and weight < float("inf")):
            # A round never commits an empty mean: a peer with nothing trained keeps training.
            raise ValueError(f"weight must be finite and > 0 (tokens trained), got {weight}")
        if (arch_epoch, step, params_hash) != (self._epoch, self._step, self._hash):
            raise ValueError(
                f"all_reduce for epoch {arch_epoch} step {step} hash {params_hash}, but "
                f"set_state says epoch {self._epoch} step {self._step} hash {self._hash}"
            )
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
            # Every member's frames have our layout: a shard is at most our whole encoding.
            whole = local.payload.numel() + 4 * local.scales.numel() + (64 << 10)
            self.mailbox.bound(min(whole, self.cfg.max_frame_bytes))
            return self._all_reduce(local, req)

    def _all_reduce(self, local: Encoded, req: RoundRequest) -> AllReduceResult:
        t0 = time.monotonic()
        ready_at = time.time()
        self.report(replace(self._progress, ready=True, eta_s=0.0, tokens=int(req.weight)))
        # Waiting for stragglers is bounded by max_wait_s (in _gather); the round itself,
        # retries included, by round_timeout_s after that.
        deadline = t0 + self.cfg.max_wait_s + self.cfg.round_timeout_s
        sent0, recv0 = self.transport.bytes_sent, self.transport.bytes_recv
        attempt, why = 0, "no attempt finished"
        try:
            while time.monotonic() < deadline:
                self._set_round(RoundState(req.epoch, req.step, attempt, "", "forming"))
                try:
                    group = self.matchmaker.form(req, attempt, deadline, ready_at)
                    formed = time.monotonic()
                    log.debug(
                        "step %d: group of %d formed after %.3fs (attempt %d, leader %s)",
                        req.step,
                        len(group.members),
                        formed - t0,
                        group.attempt,
                        group.leader.peer_id,
                    )
                    # Once formed, the data phase has round_timeout_s, whatever the wait was.
                    deadline = max(deadline, formed + self.cfg.round_timeout_s)
                    mean = self.runner.run(group, local, deadline)
                except RoundAborted as e:
                    why, attempt = str(e), max(e.next_attempt, attempt + 1)
                    log.info(
                        "step %d: attempt failed (%s); retrying at attempt %d",
                        req.step,
                        why,
                        attempt,
                    )
                    continue
                return self._committed(req, group, mean, (t0, formed), sent0, recv0)
        finally:
            self.report(replace(self._progress, ready=False))
        raise RoundFailed(
            f"no round committed for epoch {req.epoch} step {req.step} after {attempt} "
            f"attempts: {why}"
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
        # Invalid votes abstain; every member runs the same check on the same list.
        votes = [m.vote if self.vote_ok(m.vote) else None for m in g.members]
        vote = tally(votes, self.cfg.quorum, self.cfg.min_peers)
        with self._rec_lock:
            self._commits.append(g.rid)
        # Stuck members (outcome.py) learn the outcome from this record: send it now.
        self._publish(wait=False)
        if vote is not None and g.leader.peer_id == self.peer_id:
            entry = HistoryEntry(
                req.epoch,
                req.step,
                vote,
                vote_hash(vote),
                tuple(m.peer_id for m in g.members),
                self.peer_id,
                self.cfg.cert,
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

    # ---- the state we hold, our progress, and what the swarm says -----------------------

    def set_state(
        self,
        arch_epoch: int,
        step: int,
        params_hash: str,
        members: int,
        lineage: list | tuple | None = None,
    ) -> None:
        """Declare the θ_g we hold: before start() (so our first record carries it), after
        every committed round, and after every download. Until then our record says we are
        still starting and nobody counts or waits for us.

        `members`: how many peers signed the round that produced it (0 for a fresh init).
        `lineage`: after a download, the source's lineage (so we are on its line)."""
        if not isinstance(params_hash, str) or not 0 < len(params_hash) <= 128:
            raise ValueError("params_hash must be a non-empty str of <= 128 chars")
        with self._rec_lock:
            if lineage is not None:
                base = tuple((int(s), str(h), int(m)) for s, h, m in lineage if int(s) < step)
            else:
                base = tuple(x for x in self._lineage if x[0] < step)
            self._lineage = (*base, (step, params_hash, int(members)))[-MAX_LINEAGE:]
            self._epoch, self._step, self._hash = arch_epoch, step, params_hash
            self._progress = Progress()
        if self._started:  # before start(): the first record published carries it
            self._publish(wait=False)

    def report(self, progress: Progress) -> None:
        """Our inner-phase progress; goes out with the next heartbeat (at once if `ready`
        changed, since others wait on it)."""
        with self._rec_lock:
            flipped = progress.ready != self._progress.ready
            self._progress = progress
        if flipped and self._started:
            self._publish(wait=False)

    def peers_at_my_step(self) -> list[PeerRecord]:
        """Other live peers training for the same round as us (cached; costs nothing)."""
        return at_step(self.view.live(), self.peer_id, self._epoch, self._step)

    def verdict(self, fresh: bool = False) -> Verdict:
        """Does the swarm's majority line hold our θ_g? (lineage.py)"""
        return verdict(self._my_record(), self.view.live(fresh))

    def vote_ok(self, vote: dict | None) -> bool:
        """Would the app accept this growth vote? (None, no vote, is always fine.)"""
        if vote is None or self._vote_check is None:
            return True
        try:
            self._vote_check(vote)
        except (ValueError, TypeError, KeyError) as e:
            log.warning("ignoring invalid growth vote %r: %s", vote, e)
            return False
        return True

    def _check_state(self, fresh: bool) -> None:
        v = self.verdict(fresh)
        if not v.ok:
            raise NeedResync(v.reason, None if v.source is None else v.source.public())

    def publish_progress(self, info: dict) -> None:
        """Attach app info (loss, tokens_per_s, ...) to our record, shown by `status`."""
        try:
            info = opt_info({"info": dict(info)})
        except Malformed as e:
            raise ValueError(f"invalid progress info: {e}") from None
        with self._rec_lock:
            self._info = info
        self._publish(wait=False)

    def advertise_state(self, endpoint: str, curve_key: str) -> None:
        """Publish where our state server listens (peers/state_transfer.py), for joiners."""
        self._state = (endpoint, curve_key)
        self._publish(wait=True)

    def list_peers(self) -> list[dict]:
        """Live peers' records (fresh from the DHT), as plain dicts."""
        recs = self.view.live(fresh=True)
        return [r.public() for r in sorted(recs, key=lambda r: r.peer_id)]

    def growth_history(self) -> list[dict]:
        """Committed growth events from the DHT, oldest epoch first (one per epoch)."""
        entries = self.view.history()  # (admitted writers only)
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

    @property
    def denied(self) -> int:
        """Data-plane connections and frames refused because their key is not admitted."""
        return self.transport.denied

    def _my_record(self) -> PeerRecord:
        with self._rec_lock:
            p = self._progress
            return PeerRecord(
                self.peer_id,
                self.me.endpoint,
                self.me.curve_key,
                self._epoch,
                self._step,
                self._hash,
                self._lineage,
                int(p.tokens),
                float(p.tokens_per_s),
                float(p.eta_s),
                p.ready,
                p.late,
                self._round,
                tuple(self._commits),
                time.time(),
                self._state[0],
                self._state[1],
                dict(self._info),
                self.cfg.cert,
            )

    def _on_phase(self, g: Group, phase: str) -> None:
        self._set_round(RoundState(g.epoch, g.step, g.attempt, g.rid, phase))

    def _set_round(self, value: RoundState) -> None:
        with self._rec_lock:
            self._round = value
        # Not awaited: a slow DHT must not delay the data phase.
        self._publish(wait=False)

    def _heartbeat(self) -> None:
        """Republish our record every heartbeat_s, at a fixed rate: the store is not awaited,
        so a slow DHT never stretches the interval others measure our liveness by."""
        next_beat = time.monotonic()
        while True:
            next_beat += self.cfg.heartbeat_s
            if self._stop.wait(max(0.0, next_beat - time.monotonic())):
                return
            try:
                self._publish(wait=False)
            except Exception as e:  # never let the heartbeat die silently
                log.warning("heartbeat failed: %s", e)

    def _watch(self) -> None:
        """Refresh the swarm view every heartbeat (reads block, so in their own thread)."""
        beats = 0
        while not self._stop.wait(self.cfg.heartbeat_s):
            beats += 1
            try:
                self.view.refresh()
                if beats % 5 == 0:
                    self.dht.rejoin()
            except Exception as e:
                log.warning("swarm view refresh failed: %s", e)

    def _publish(self, wait: bool) -> None:
        ttl = self.cfg.record_ttl_s
        self.dht.store(
            self.dht.key("peers"), self.peer_id, self._my_record().to_dict(), ttl, wait=wait
        )
