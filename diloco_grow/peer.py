"""The peer app: one island of the swarm, running the DiLoCo loop over the network.

start DHT + data plane + state server + control channel → print `ready <multiaddr>`
join: if the swarm's majority line holds another θ_g, download it (hash-verified)
loop: inner phase (H steps, or until the swarm is ready: pacing.py), reporting progress
      → one DiLoCo round (loop.outer_round over the swarm) → checkpoint, metrics
      → if the swarm moved past us: download its θ_g and *shift* our progress onto it
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import logging
import multiprocessing
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from diloco_grow import checkpoint as ckpt
from diloco_grow.config import RunConfig
from diloco_grow.data import load_corpus, val_set
from diloco_grow.growth import GrowthEvent, grow_config, growth_line
from diloco_grow.loop import RoundOutcome, outer_round
from diloco_grow.metrics import MetricsWriter
from diloco_grow.net_averager import NetworkAverager
from diloco_grow.pacing import PhasePacer
from diloco_grow.state_sync import fetch_state, holders
from diloco_grow.train import InnerStats, evaluate_theta
from diloco_grow.worker import GlobalState, Worker
from peers.admission import peer_settings
from peers.control import ControlServer
from peers.lineage import members_at
from peers.state_transfer import StateServer
from peers.swarm import NeedResync, Progress, RoundFailed, Swarm, SwarmConfig

log = logging.getLogger("diloco_grow.peer")
_NET = {f.name: f.default for f in dataclasses.fields(SwarmConfig)}


@dataclass(frozen=True)
class PeerOptions:
    """What the app needs; built from the [swarm] section and flags (config.SwarmSection).
    Network defaults are SwarmConfig's, so each setting has one default."""

    run: str | None = None  # None: the run file's name, or "diloco"
    run_file: str | None = None
    key_file: str | None = None
    cert_file: str | None = None
    open: bool = False
    join: tuple[str, ...] = ()
    host: str = _NET["host"]
    port: int = _NET["port"]
    announce_host: str | None = _NET["announce_host"]
    out_dir: str = "runs/peer"
    checkpoint_dir: str | None = None
    device: str = "cpu"
    max_rounds: int | None = None  # stop after this many completed rounds (None: forever)
    grow: tuple[tuple[int, GrowthEvent], ...] = ()  # votes: (outer step, event)
    target_tokens: int | None = None  # tokens per round for the whole swarm (None: fixed H)
    # Emulate a slower machine (experiments, tests): each inner step takes this many times
    # its real time, the rest spent sleeping, so the cores stay free for other peers.
    slowdown: float = 1.0
    heartbeat_s: float = _NET["heartbeat_s"]
    matchmaking_s: float = _NET["matchmaking_s"]
    max_wait_s: float = _NET["max_wait_s"]
    phase_timeout_s: float = _NET["phase_timeout_s"]
    round_timeout_s: float = _NET["round_timeout_s"]
    min_peers: int = _NET["min_peers"]
    quorum: float = _NET["quorum"]
    eval_every: int = 1
    extra_swarm: dict[str, Any] = field(default_factory=dict)

    def swarm_config(self) -> SwarmConfig:
        """ValueError if the admission files are missing or do not admit this peer."""
        admission = peer_settings(self.run, self.run_file, self.key_file, self.cert_file, self.open)
        return SwarmConfig(
            **admission,
            host=self.host,
            port=self.port,
            announce_host=self.announce_host,
            initial_peers=tuple(self.join),
            heartbeat_s=self.heartbeat_s,
            matchmaking_s=self.matchmaking_s,
            max_wait_s=self.max_wait_s,
            phase_timeout_s=self.phase_timeout_s,
            round_timeout_s=self.round_timeout_s,
            min_peers=self.min_peers,
            quorum=self.quorum,
            **self.extra_swarm,
        )


class PeerApp:
    def __init__(self, cfg: RunConfig, opts: PeerOptions) -> None:
        self.cfg, self.opts = cfg, opts
        self.lock = threading.Lock()  # guards g against the state server's thread
        self.stopping = threading.Event()
        self.corpus = load_corpus(cfg.data.path, cfg.data.val_fraction)
        self.val = val_set(self.corpus, cfg)
        self.late = False  # this phase started from downloaded state (pacing.py)
        self._served: tuple | None = None  # (state key, info, blob): _provide_state's cache
        self.stats: dict[str, Any] = {
            "loss": None,
            "val_loss": None,
            "tokens_per_s": 0.0,
            "bytes_sent": 0,
            "rounds": 0,
            "tokens": 0,
            "inner_s": 0.0,  # wall time spent in inner steps, since start
            "discarded_phases": 0,  # inner phases thrown away (only on an architecture change)
            "resyncs": 0,
        }

    # --- start-up -------------------------------------------------------------------
    def start(self) -> str:
        o = self.opts
        self.state_server = StateServer(self._provide_state, host=o.host, port=0)
        self.state_server.start()
        self.control = ControlServer(self._control, "tcp://127.0.0.1:0")
        self.control.start()
        # Joiners dial the state server at the announced address, not a wildcard bind.
        state_ep = self.state_server.endpoint
        if o.announce_host:
            state_ep = f"tcp://{o.announce_host}:{state_ep.rsplit(':', 1)[1]}"
        # The reducers combine contributions as the run's [robust] section says, the same
        # aggregator simulate uses.
        net = dataclasses.replace(o.swarm_config(), robust=self.cfg.robust)
        if "max_frame_bytes" not in o.extra_swarm:
            # The largest frame this run can produce: all of θ_g in fp32 (a shard is at
            # most the whole vector) at the largest architecture growth can reach.
            whole = 4 * ckpt.max_params(self.cfg.model) + (1 << 20)
            net = dataclasses.replace(net, max_frame_bytes=min(net.max_frame_bytes, whole))
        self.swarm = Swarm(
            net,
            state_endpoint=state_ep,
            state_curve_key=self.state_server.public_key,
            vote_check=self._check_vote,
        )
        self.g = self._local_state()
        self.swarm.set_state(self.g.arch_epoch, self.g.step, self.g.hash(), 0)
        self.swarm.start()
        # Each peer draws its own batches: the data stream is keyed by the peer id.
        worker_id = int.from_bytes(self.swarm.peer_id.encode()[-6:], "little") % (1 << 30)
        self.worker = Worker(self.cfg, self.g, self.corpus, worker=worker_id, device=o.device)
        self._restore_private()
        self.averager = NetworkAverager(self.swarm, lambda: self.g.arch_epoch)
        self.metrics = MetricsWriter(Path(o.out_dir) / "metrics.jsonl", append=True)
        # Join: adopt the majority line's θ_g if it is not ours (a fresh peer, a restart).
        v = self.swarm.verdict(fresh=True)
        if not v.ok and v.source is not None:
            log.info("joining: %s", v.reason)
            self._resync(v.source.public())
        # Joining a round already under way: stop with the others, not H steps later.
        self.late = self.late or any(r.tokens > 0 for r in self.swarm.peers_at_my_step())
        self._publish()
        return self.swarm.visible_maddrs[0]

    def _local_state(self) -> GlobalState:
        ckpt_file = self._ckpt_file()
        if ckpt_file is not None and ckpt_file.is_file():
            tensors, meta = ckpt.read_checkpoint(ckpt_file)
            self._private = (tensors, meta)
            g = ckpt.global_from(tensors, meta)
            log.info("resumed checkpoint %s at step %d", ckpt_file, g.step)
            return g
        return GlobalState.init(self.cfg)

    def _restore_private(self) -> None:
        private = getattr(self, "_private", None)
        if private and private[1]["step"] == self.g.step:
            ckpt.restore_workers([self.worker], *private)

    # --- the DiLoCo loop ------------------------------------------------------------
    def run(self) -> None:
        o = self.opts
        votes = dict(o.grow)
        while not self.stopping.is_set():
            if o.max_rounds is not None and self.stats["rounds"] >= o.max_rounds:
                break
            # --- inner phase: until H steps, the swarm's token target, or (late) the others
            inner = self._inner_phase()
            self.stats["tokens"] += inner.tokens
            if self.stopping.is_set():
                break
            weight = self.worker.tokens_since_sync  # this phase and any unapplied ones
            if weight == 0:
                continue  # the swarm moved on before we trained a step: resync first
            # --- outer round: all-reduce Δ, Nesterov on θ_g, growth (loop.py) -----------
            vote = votes.get(self.g.step + 1)
            try:
                out = outer_round(self.g, [self.worker], self.averager, vote=vote, guard=self.lock)
            except NeedResync as e:
                log.warning("resync: %s", e)
                self._resync(e.source)
                self.late = True  # our progress is kept: bring it to the next round asap
                continue
            except RoundFailed as e:
                # Keep the local progress; the next Δ covers this phase too.
                log.warning("round at step %d failed (%s); training on", self.g.step, e)
                self.late = True
                continue
            except ValueError as e:  # a committed vote that is no valid growth event
                log.error("round at step %d not applied: %s", self.g.step, e)
                continue
            self.swarm.set_state(self.g.arch_epoch, self.g.step, self.g.hash(), out.result.members)
            self.late = False
            self.stats["rounds"] += 1
            self.stats["bytes_sent"] += out.result.bytes_sent
            self._after_round(out, inner, weight)

    def _inner_phase(self) -> InnerStats:
        """Train until pacing.py says the phase is over, reporting progress every step."""
        w = self.worker
        pacer = PhasePacer(
            self.cfg.inner.steps,
            w.inner.tokens_per_step,
            self.opts.target_tokens,
            late=self.late,
            step_s=getattr(self, "_step_s", 0.0),
        )
        t0 = last = time.perf_counter()

        def step_done(done: int) -> bool:
            nonlocal last
            if self.opts.slowdown > 1:
                time.sleep((self.opts.slowdown - 1) * (time.perf_counter() - last))
            now = time.perf_counter()
            pacer.observe(now - last)
            last = now
            others = self.swarm.peers_at_my_step()
            mine = w.tokens_since_sync
            self.swarm.report(
                Progress(
                    tokens=mine,
                    tokens_per_s=w.inner.tokens_per_step / max(pacer.step_s, 1e-6),
                    eta_s=pacer.eta(done, mine, others),
                    late=self.late,
                )
            )
            if self.stopping.is_set() or pacer.over(done, mine, others):
                return True
            # The swarm moved past our θ_g (we were stopped, partitioned, too slow): stop
            # now; the round raises NeedResync and our progress is shifted, not lost.
            return done % 10 == 0 and not self.swarm.verdict().ok

        # Fixed H bounds the phase; with a token target only the swarm's progress does.
        limit = self.cfg.inner.steps if not self.opts.target_tokens else 1 << 40
        inner = w.inner_phase(limit, step_done)
        self._step_s = pacer.step_s
        elapsed = time.perf_counter() - t0
        self.stats["inner_s"] += elapsed
        if inner.steps:
            self.stats["loss"] = inner.ce_loss
            self.stats["tokens_per_s"] = inner.tokens / max(1e-9, elapsed)
        return inner

    def _resync(self, source: dict | None) -> None:
        """Adopt the majority line's θ_g, shifting our inner progress onto it."""
        got = None
        deadline = time.monotonic() + self.opts.round_timeout_s
        while got is None and time.monotonic() < deadline and not self.stopping.is_set():
            if source is None:
                v = self.swarm.verdict(fresh=True)
                if v.ok:
                    return  # the swarm came back to us
                source = None if v.source is None else v.source.public()
            if source is not None:
                peers = self.swarm.list_peers()
                got = fetch_state(holders(source, peers, self.swarm.peer_id), self.cfg.model)
            if got is None:
                source = None  # it moved on (or died): ask the swarm again
                time.sleep(self.opts.heartbeat_s)
        if got is None:
            log.warning("no peer could serve the swarm's state; training on from our own")
            return
        new, src = got
        with self.lock:
            old = self.g
            if new.model_cfg == old.model_cfg:
                self.worker.shift(old, new)  # keeps the inner progress of this phase
            else:
                if self.worker.tokens_since_sync:
                    self.stats["discarded_phases"] += 1
                    log.warning("architecture changed while we were away: local progress lost")
                self.worker.resync(new)
            self.g = new
        members = members_at(src.get("lineage", []), new.step)
        self.swarm.set_state(new.arch_epoch, new.step, new.hash(), members, src.get("lineage"))
        self.stats["resyncs"] += 1
        self.late = True
        log.info(
            "adopted the swarm's θ_g %s at step %d (epoch %d) from %s",
            new.hash(),
            new.step,
            new.arch_epoch,
            src.get("peer_id"),
        )

    def _after_round(self, out: RoundOutcome, inner: InnerStats, weight: int) -> None:
        g, res, event = self.g, out.result, out.event
        val_loss = None
        if self.opts.eval_every and g.step % self.opts.eval_every == 0:
            val_loss = evaluate_theta(g.model_cfg, g.theta, self.val)
            self.stats["val_loss"] = val_loss
        h = g.hash()
        record = {
            "step": g.step,
            "arch_epoch": g.arch_epoch,
            "params_hash": h,
            "members": res.members,
            "member_ids": res.member_ids,
            "weight": weight,  # tokens in our Δ: this phase's, plus any unapplied earlier
            "train_loss": inner.ce_loss if inner.steps else None,
            "val_loss": val_loss,
            "tokens": self.stats["tokens"],
            "inner_steps": inner.steps,
            "bytes_sent": res.bytes_sent,
            "bytes_sent_per_worker": self.stats["bytes_sent"],
            "round_s": round(res.seconds, 3),
            "inner_s_total": round(self.stats["inner_s"], 3),
            "discarded_phases": self.stats["discarded_phases"],
            "resyncs": self.stats["resyncs"],
            "n_params": int(g.theta.numel()),
            "time": time.time(),
            "peer_id": self.swarm.peer_id,
        }
        if event is not None:
            record["event"] = {
                **event.to_dict(),
                "hash": event.hash(),
                "outer_step": g.step,
                "n_params_before": out.n_params_before,
                "n_params_after": out.n_params_after,
            }
        self.metrics.write(record)
        loss = f"{inner.ce_loss:.4f}" if inner.steps else "-"
        print(
            f"round step={g.step} members={res.members} steps={inner.steps} loss={loss} "
            f"val={val_loss if val_loss is None else round(val_loss, 4)} "
            f"bytes={res.bytes_sent} seconds={res.seconds:.2f} hash={h}"
            + (f" grew={event.kind}x{event.factor}" if event else ""),
            flush=True,
        )
        if event is not None:
            e = record["event"]
            print(growth_line(event, e["n_params_before"], e["n_params_after"], g.step), flush=True)
        self._publish()
        if self._ckpt_file() is not None:
            ckpt.save_checkpoint(self._ckpt_file(), g, [self.worker], {})

    # --- serving others -------------------------------------------------------------
    def _provide_state(self) -> tuple[dict, bytes]:
        """Runs on the state server's thread, only when a joiner asks: serialising θ_g
        under the lock gives it a consistent copy without costing every round a copy.
        The blob is cached per state, so a stream of META requests costs one
        serialisation per outer step, not one each (and holds the lock only once)."""
        with self.lock:
            g = getattr(self, "g", None)
            if g is None:
                raise RuntimeError("this peer is still starting and has no state to serve yet")
            key = (id(g), g.step, g.arch_epoch)
            if self._served is None or self._served[0] != key:
                tensors, meta = ckpt.global_tensors_meta(g)
                info = {"step": g.step, "arch_epoch": g.arch_epoch, "params_hash": g.hash()}
                self._served = (key, info, ckpt.pack_state(tensors, meta))
            return self._served[1], self._served[2]

    def _check_vote(self, vote: dict) -> None:
        """Raise ValueError unless `vote` is a growth event our current model can take:
        checked before a vote counts, so a garbage or oversized vote can neither crash
        nor grow anyone (peers/swarm.py)."""
        grow_config(self.g.model_cfg, GrowthEvent.from_dict(vote))

    def _status(self) -> dict[str, Any]:
        return {
            "peer_id": self.swarm.peer_id,
            "step": self.g.step,
            "arch_epoch": self.g.arch_epoch,
            "params_hash": self.g.hash(),
            "loss": self.stats["loss"],
            "val_loss": self.stats["val_loss"],
            "tokens_per_s": round(self.stats["tokens_per_s"], 1),
            "bytes_sent": self.stats["bytes_sent"],
            "n_params": int(self.g.theta.numel()),
            "discarded_phases": self.stats["discarded_phases"],
            "resyncs": self.stats["resyncs"],
            "control": self.control.endpoint,
        }

    def _publish(self) -> None:
        try:
            self.swarm.publish_progress(self._status())
        except Exception as e:  # the DHT being slow must never stop training
            log.warning("progress record not published: %s", e)

    def _control(self, req: dict) -> dict:
        if req.get("cmd") == "status":
            return {"ok": True, **self._status()}
        if req.get("cmd") == "leave":
            self.leave()
            return {"ok": True}
        return {"ok": False, "error": f"unknown cmd {req.get('cmd')!r}; use status or leave"}

    def _ckpt_file(self) -> Path | None:
        d = self.opts.checkpoint_dir
        return Path(d) / "peer.safetensors" if d else None

    def leave(self) -> None:
        """Stop soon (a signal handler may call this): a round in progress is left at once
        (before our vote: ABORT, the others retry without us; after it: silence, they
        settle it from the records) instead of running to its end."""
        self.stopping.set()
        swarm = getattr(self, "swarm", None)
        if swarm is not None:
            swarm.leave()

    def shutdown(self) -> None:
        self.stopping.set()
        for part in ("metrics", "control", "state_server", "swarm"):
            obj = getattr(self, part, None)
            if obj is None:
                continue
            try:
                stop = {"metrics": "close", "swarm": "shutdown"}.get(part, "stop")
                getattr(obj, stop)()
            except Exception as e:
                log.warning("error stopping %s: %s", part, e)
        reap_children()


def reap_children(grace: float = 5.0) -> None:
    """Stop whatever child processes are left (the DHT process, its p2pd daemon).

    A Ctrl-C or a group SIGTERM also hits hivemind's DHT child, which may then never
    answer its own shutdown; multiprocessing would wait for it forever at exit."""
    children = psutil.Process().children(recursive=True)
    for c in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for c in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.kill()
    for c in multiprocessing.active_children():  # reaps them, so exit does not wait
        c.join(timeout=1.0)


def run_peer(cfg: RunConfig, opts: PeerOptions, threads: int = 0) -> None:
    """CLI entry: start, print the ready line, train until stopped, shut down cleanly.
    `threads`: torch threads, 0 = sized to this machine's cores (one worker here)."""
    from diloco_grow.threads import default_threads

    torch.set_num_threads(threads or default_threads(workers=1))
    log.info("torch threads: %d (--threads to change)", torch.get_num_threads())
    app = PeerApp(cfg, opts)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: app.leave())
    try:
        try:
            maddr = app.start()
        except Exception as e:  # a bad multiaddr, an unreachable swarm, a busy port
            log.debug("start-up failed", exc_info=True)
            print(
                f"error: could not start the peer: {e}\n  check --join (the multiaddr from a "
                "live peer's `ready` line), --host/--port and the network",
                file=sys.stderr,
            )
            raise SystemExit(2) from None
        print(f"ready {maddr}", flush=True)
        app.run()
    finally:
        app.shutdown()
        print("stopped", flush=True)
        # A library thread that ignores shutdown must not keep a stopped peer alive:
        # dump every thread's stack (for the bug report) and exit after a grace period.
        faulthandler.dump_traceback_later(30, exit=True)
