"""The peer app: one island of the swarm, running the DiLoCo loop over the network.

start DHT + data plane + state server + control channel → print `ready <multiaddr>`
join: download θ_g from a live peer (or start from the seed if nobody has state)
loop: H inner steps → encode Δ → all-reduce with the round's members → Nesterov on θ_g
      → apply a committed growth event → checkpoint, metrics, progress record
"""

from __future__ import annotations

import contextlib
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
from diloco_grow.data import load_corpus, val_batches
from diloco_grow.growth import GrowthEvent, growth_line, n_params_before
from diloco_grow.metrics import MetricsWriter
from diloco_grow.model import MoETransformer
from diloco_grow.net_averager import NetworkAverager
from diloco_grow.outer import assign_flat
from diloco_grow.train import InnerStats, evaluate
from diloco_grow.worker import GlobalState, Worker
from peers.control import ControlServer
from peers.state_transfer import StateServer, StateTransferError, download_state
from peers.swarm import NeedResync, RoundFailed, Swarm, SwarmConfig

log = logging.getLogger("diloco_grow.peer")

MAX_STATE_BYTES = 8 << 30


@dataclass(frozen=True)
class PeerOptions:
    run: str = "diloco"
    join: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str | None = None
    out_dir: str = "runs/peer"
    checkpoint_dir: str | None = None
    device: str = "cpu"
    max_rounds: int | None = None  # stop after this many completed rounds (None: forever)
    grow: tuple[tuple[int, GrowthEvent], ...] = ()  # votes: (outer step, event)
    matchmaking_s: float = 2.0
    round_timeout_s: float = 60.0
    min_peers: int = 1
    quorum: float = 2 / 3
    eval_every: int = 1
    extra_swarm: dict[str, Any] = field(default_factory=dict)


class PeerApp:
    def __init__(self, cfg: RunConfig, opts: PeerOptions) -> None:
        self.cfg, self.opts = cfg, opts
        self.lock = threading.Lock()  # guards g against the state server's thread
        self.stopping = threading.Event()
        self.corpus = load_corpus(cfg.data.path, cfg.data.val_fraction)
        self.val = val_batches(
            self.corpus,
            seq_len=cfg.model.seq_len,
            batch_size=cfg.inner.batch_size,
            n_batches=cfg.data.val_batches,
        )
        self.last_inner_s = 0.0
        self.catch_up = False  # set when θ_g was just downloaded
        self.stats: dict[str, Any] = {
            "loss": None,
            "val_loss": None,
            "tokens_per_s": 0.0,
            "bytes_sent": 0,
            "rounds": 0,
            "tokens": 0,
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
        self.swarm = Swarm(
            SwarmConfig(
                run=o.run,
                host=o.host,
                port=o.port,
                announce_host=o.announce_host,
                initial_peers=tuple(o.join),
                matchmaking_s=o.matchmaking_s,
                round_timeout_s=o.round_timeout_s,
                min_peers=o.min_peers,
                quorum=o.quorum,
                **o.extra_swarm,
            ),
            state_endpoint=state_ep,
            state_curve_key=self.state_server.public_key,
        )
        self.swarm.start()
        self.g = self._initial_state()
        # Each peer draws its own batches: the data stream is keyed by the peer id.
        worker_id = int.from_bytes(self.swarm.peer_id.encode()[-6:], "little") % (1 << 30)
        self.worker = Worker(self.cfg, self.g, self.corpus, worker=worker_id, device=o.device)
        self._restore_private()
        self.averager = NetworkAverager(self.swarm, lambda: self.g.arch_epoch)
        self.metrics = MetricsWriter(Path(o.out_dir) / "metrics.jsonl", append=True)
        self._publish()
        return self.swarm.visible_maddrs[0]

    def _initial_state(self) -> GlobalState:
        ckpt_file = self._ckpt_file()
        local = None
        if ckpt_file is not None and ckpt_file.is_file():
            tensors, meta = ckpt.read_checkpoint(ckpt_file)
            local = ckpt.global_from(tensors, meta)
            self._private = (tensors, meta)
            log.info("resumed checkpoint %s at step %d", ckpt_file, local.step)
        remote = self._download_from_swarm(min_step=local.step + 1 if local else 0)
        if remote is not None:
            return remote
        return local or GlobalState.init(self.cfg)

    def _download_from_swarm(self, min_step: int = 0) -> GlobalState | None:
        """Newest state any live peer serves, if newer than `min_step`; None if nobody has."""
        peers = sorted(self.swarm.list_peers(), key=lambda p: -int(p.get("step", 0)))
        for p in peers:
            if p.get("peer_id") == self.swarm.peer_id or not p.get("state_endpoint"):
                continue
            if int(p.get("step", 0)) < min_step:
                continue
            try:
                meta, blob = download_state(
                    p["state_endpoint"],
                    p.get("state_curve_key"),
                    timeout=60.0,
                    max_bytes=MAX_STATE_BYTES,
                )
                g = ckpt.global_from(*ckpt.unpack_state(blob))
            except (StateTransferError, ckpt.CheckpointError) as e:
                log.warning("state download from %s failed: %s", p.get("peer_id"), e)
                continue
            log.info(
                "downloaded state at step %d (arch epoch %d) from %s",
                g.step,
                g.arch_epoch,
                p.get("peer_id"),
            )
            # Our next round is this very step: join it at once with nothing to add
            # (weight 0) so we are in the group before the others finish their phase.
            self.catch_up = True
            return g
        return None

    def _restore_private(self) -> None:
        private = getattr(self, "_private", None)
        if private and private[1]["step"] == self.g.step:
            ckpt.restore_workers([self.worker], *private)

    # --- the DiLoCo loop ------------------------------------------------------------
    def run(self) -> None:
        o, H = self.opts, self.cfg.inner.steps
        votes = dict(o.grow)
        while not self.stopping.is_set():
            if o.max_rounds is not None and self.stats["rounds"] >= o.max_rounds:
                break
            # --- inner phase -----------------------------------------------------------
            t0 = time.perf_counter()
            if self.catch_up:  # just downloaded θ_g: sync first, train after
                inner = InnerStats(self.stats["loss"] or float("nan"), float("nan"), 0, 0)
                self.catch_up = False
            else:
                inner = self.worker.inner_phase(H)
                self.last_inner_s = time.perf_counter() - t0
                self.stats["loss"] = inner.ce_loss
                self.stats["tokens_per_s"] = inner.tokens / max(1e-9, self.last_inner_s)
            if self.stopping.is_set():
                break
            # --- outer round: all-reduce Δ, Nesterov on θ_g ----------------------------
            contrib = self.worker.contribution(self.g)
            vote = votes.get(self.g.step + 1)
            try:
                res = self.averager.average(
                    [contrib],
                    step=self.g.step,
                    params_hash=self.g.hash(),
                    vote=vote.to_dict() if vote else None,
                )
            except NeedResync as e:
                self.worker.round_failed()
                log.warning("resync: %s", e)
                self._resync()
                continue
            except RoundFailed as e:
                # Keep the local progress; the next Δ covers this phase too.
                self.worker.round_failed()
                log.warning("round at step %d failed (%s); continuing locally", self.g.step, e)
                continue
            with self.lock:
                self.g.outer_step(res.mean)
                self.worker.sync_to(self.g)
                event = GrowthEvent.from_dict(res.committed) if res.committed else None
                if event is not None:
                    index_map = self.g.grow(event)
                    self.worker.follow_growth(self.g, index_map)
            self.stats["rounds"] += 1
            self.stats["bytes_sent"] += res.bytes_sent
            self.stats["tokens"] += inner.tokens
            self._after_round(res, inner, event)

    def _resync(self) -> None:
        g = None
        deadline = time.monotonic() + self.opts.round_timeout_s
        while g is None and time.monotonic() < deadline and not self.stopping.is_set():
            g = self._download_from_swarm(min_step=0)
            if g is None:
                time.sleep(1.0)
        if g is None:
            log.warning("no peer could serve state; continuing from our own")
            return
        with self.lock:
            self.g = g
            self.worker.resync(g)

    def _after_round(self, res: Any, inner: Any, event: GrowthEvent | None) -> None:
        g = self.g
        val_loss = None
        if self.opts.eval_every and g.step % self.opts.eval_every == 0:
            model = MoETransformer(g.model_cfg)
            assign_flat(model, g.theta)
            val_loss = evaluate(model, self.val)
            self.stats["val_loss"] = val_loss
        h = g.hash()
        record = {
            "step": g.step,
            "arch_epoch": g.arch_epoch,
            "params_hash": h,
            "members": res.members,
            "train_loss": inner.ce_loss if inner.steps else None,
            "val_loss": val_loss,
            "tokens": self.stats["tokens"],
            "bytes_sent": res.bytes_sent,
            "bytes_sent_per_worker": self.stats["bytes_sent"],
            "round_s": round(res.seconds, 3),
            "inner_s": round(self.last_inner_s, 3),
            "n_params": int(g.theta.numel()),
            "time": time.time(),
            "peer_id": self.swarm.peer_id,
        }
        if event is not None:
            record["event"] = {
                **event.to_dict(),
                "hash": event.hash(),
                "outer_step": g.step,
                "n_params_before": n_params_before(g.model_cfg, event),
                "n_params_after": int(g.theta.numel()),
            }
        self.metrics.write(record)
        loss = f"{inner.ce_loss:.4f}" if inner.steps else "- (catch-up)"
        print(
            f"round step={g.step} members={res.members} loss={loss} "
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
        under the lock gives it a consistent copy without costing every round a copy."""
        with self.lock:
            g = getattr(self, "g", None)
            if g is None:
                raise RuntimeError("this peer is still starting and has no state to serve yet")
            tensors, meta = ckpt.global_tensors_meta(g)
            info = {"step": g.step, "arch_epoch": g.arch_epoch, "params_hash": g.hash()}
            return info, ckpt.pack_state(tensors, meta)

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
            self.stopping.set()
            return {"ok": True}
        return {"ok": False, "error": f"unknown cmd {req.get('cmd')!r}; use status or leave"}

    def _ckpt_file(self) -> Path | None:
        d = self.opts.checkpoint_dir
        return Path(d) / "peer.safetensors" if d else None

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
        signal.signal(sig, lambda *_: app.stopping.set())
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
