"""One swarm peer as a process, for the integration tests and the all-reduce benchmark.

Runs `--rounds` all-reduces of a deterministic random vector per (seed, step), int8-encoded,
each after an "inner phase" of `--inner-s` seconds (sleeping, and reporting progress with an
ETA as a training peer does: the protocol's timing sees exactly what it sees in a real run,
without burning the test machine's cores), and prints one JSON line per event on stdout:
  {"event": "ready", "maddr", "peer_id", "endpoint", "curve_key"}
  {"event": "round", "step", "sha256", "members", "bytes_sent", "bytes_recv", "attempts", ...}
  {"event": "fault", "step", "phase"}     (then hangs until the test kills or stops it)
  {"event": "error", "step", "kind", "msg"}
  {"event": "probe", "sent", "to"}       (--probe-s: JOINs sent straight to others' data planes)
  {"event": "done", "dropped", "denied", "peers", "history"}
θ_g is simulated by the hash chain: the params_hash of step s is the sha256 of the mean of
step s-1, so members only agree if every earlier round was bit-identical on all of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np
import torch

from compression.codec import get_codec
from peers.admission import Certificate, peer_settings
from peers.errors import NeedResync, RoundFailed
from peers.lineage import members_at
from peers.messages import header
from peers.swarm import Progress, Swarm, SwarmConfig

GROW = {"kind": "experts", "factor": 2, "alpha": 0.0, "seed": 7}


def contribution(seed: int, step: int, numel: int) -> torch.Tensor:
    """The vector peer `seed` contributes at `step` (the tests recompute it)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randn(numel, generator=g) * (1.0 + 0.5 * seed)


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def fault_hook(spec: str | None):
    """`--fault STEP:PHASE[:SECONDS]` makes this peer announce the fault and hang right
    there (for SECONDS, then carry on: a stall; without it, until the test kills us)."""
    if not spec:
        return None
    step_s, phase, *stall = spec.split(":")

    def hook(at_phase: str, step: int) -> None:
        if step == int(step_s) and at_phase == phase:
            emit(event="fault", step=step, phase=phase)
            time.sleep(float(stall[0]) if stall else 3600)

    return hook


def inner_phase(swarm: Swarm, seconds: float, weight: float) -> None:
    """Stand-in for H inner steps: sleep, reporting tokens and the ETA to ready."""
    t0 = time.monotonic()
    while (left := seconds - (time.monotonic() - t0)) > 0:
        done = seconds - left
        swarm.report(Progress(tokens=int(1000 * weight * done / seconds), eta_s=left))
        time.sleep(min(left, 0.1))


def probe(swarm: Swarm, args: argparse.Namespace) -> None:
    """What a stranger would do: JOIN every peer's round at step 0 directly (here, from the
    main thread, before any all_reduce uses the transport)."""
    sent, to = 0, set()
    block = get_codec(args.codec).block_size
    until = time.monotonic() + args.probe_s
    while time.monotonic() < until:
        for r in swarm.view.live(fresh=True):
            if r.peer_id == swarm.peer_id:
                continue
            h = header(
                "JOIN", args.run, 0, 0, 0, swarm.peer_id, endpoint=swarm.me.endpoint,
                curve_key=swarm.me.curve_key, weight=args.weight, params_hash="init",
                numel=args.numel, codec=args.codec, block_size=block, vote=None,
            )  # fmt: skip
            sent += swarm.transport.send(r.endpoint, r.curve_key, h)
            to.add(r.peer_id)
        time.sleep(0.3)
    emit(event="probe", sent=sent, to=sorted(to))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="test")
    ap.add_argument("--join", action="append", default=[])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--numel", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--matchmaking-s", type=float, default=1.0)
    ap.add_argument("--heartbeat-s", type=float, default=0.5)
    ap.add_argument("--inner-s", type=float, default=0.0, help="seconds of 'training' per round")
    ap.add_argument("--max-wait-s", type=float, default=60.0)
    ap.add_argument("--phase-timeout", type=float, default=5.0)
    ap.add_argument("--round-timeout", type=float, default=60.0)
    ap.add_argument("--min-peers", type=int, default=1)
    ap.add_argument("--wait-peers", type=int, default=1, help="start rounds once this many")
    ap.add_argument("--max-frame-bytes", type=int, default=256 << 20)
    ap.add_argument("--fault", default=None, help="STEP:PHASE (after_parts, after_reduce, ...)")
    ap.add_argument("--out", default=None, help="directory for <seed>_<step>.npy results")
    ap.add_argument(
        "--vote-step",
        type=int,
        action="append",
        default=[],
        help="vote for GROW at this step (repeatable)",
    )
    ap.add_argument(
        "--bad-hash-step",
        type=int,
        default=-1,
        help="claim a wrong θ_g hash at this step (expect NeedResync)",
    )
    ap.add_argument("--linger", type=float, default=1.0, help="seconds to stay up at the end")
    ap.add_argument(
        "--resync",
        action="store_true",
        help="on NeedResync adopt the majority's state and go on (default: report and stop)",
    )
    ap.add_argument("--host", default="127.0.0.1", help="interface (a netns address in tests)")
    ap.add_argument("--run-file", default=None, help="an admitted run's file (admission.py)")
    ap.add_argument("--key", default=None, help="identity key file")
    ap.add_argument("--cert", default=None, help="the owner's certificate for our key")
    ap.add_argument(
        "--stranger",
        action="store_true",
        help="ignore the run file's policy: publish --cert (if any) as it is, read everyone",
    )
    ap.add_argument(
        "--probe-s",
        type=float,
        default=0.0,
        help="before the rounds, send JOINs straight to every peer's data plane for this long",
    )
    args = ap.parse_args()
    logging.basicConfig(
        level=os.environ.get("SWARM_LOG", "INFO"),
        stream=sys.stderr,
        format=f"%(created).2f [seed {args.seed}] %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(1)

    if args.stranger:  # a valid DHT node with its own key, not admitted (or expired)
        admission = {
            "identity_key": args.key,
            "cert": Certificate.load(args.cert) if args.cert else None,
        }
    elif args.run_file:
        admission = peer_settings(args.run, args.run_file, args.key, args.cert, False)
        del admission["run"]  # (checked against --run)
    else:
        admission = {"identity_key": args.key}
    cfg = SwarmConfig(
        run=args.run,
        **admission,
        initial_peers=tuple(args.join),
        host=args.host,
        matchmaking_s=args.matchmaking_s,
        heartbeat_s=args.heartbeat_s,
        max_wait_s=args.max_wait_s,
        phase_timeout_s=args.phase_timeout,
        round_timeout_s=args.round_timeout,
        min_peers=args.min_peers,
        max_frame_bytes=args.max_frame_bytes,
    )
    swarm = Swarm(cfg, hook=fault_hook(args.fault))
    swarm.set_state(0, 0, "init", 0)  # as the app does: our first record carries our state
    swarm.start()
    try:
        emit(
            event="ready",
            maddr=swarm.visible_maddrs[0],
            peer_id=swarm.peer_id,
            endpoint=swarm.me.endpoint,
            curve_key=swarm.me.curve_key,
            pid=os.getpid(),
        )
        until = time.monotonic() + 60
        while len(swarm.list_peers()) < args.wait_peers and time.monotonic() < until:
            time.sleep(0.2)
        if args.probe_s:
            probe(swarm, args)
        codec = get_codec(args.codec)
        params_hash, epoch, members = "init", 0, 0
        step, lineage = 0, None
        while step < args.rounds:
            enc = codec.encode(contribution(args.seed, step, args.numel))
            claimed = "forged" if step == args.bad_hash_step else params_hash
            swarm.set_state(epoch, step, claimed, members, lineage)
            lineage = None
            emit(event="phase", step=step, t=time.time())
            inner_phase(swarm, args.inner_s, args.weight)
            vote = GROW if step in args.vote_step else None
            try:
                res = swarm.all_reduce(
                    enc, args.weight, arch_epoch=epoch, step=step, params_hash=claimed, vote=vote
                )
            except (NeedResync, RoundFailed) as e:
                emit(event="error", step=step, kind=type(e).__name__, msg=str(e), t=time.time())
                if isinstance(e, NeedResync) and args.resync and e.source:
                    # The "state" here is the hash chain: adopt the majority line's tip.
                    src = e.source
                    epoch, step, params_hash = src["arch_epoch"], src["step"], src["params_hash"]
                    lineage = src["lineage"]
                    members = members_at(lineage, step)
                    emit(event="resync", step=step, source=src["peer_id"])
                    continue
                if isinstance(e, RoundFailed) and args.resync:
                    continue
                break
            if res.committed_vote is not None:
                epoch += 1  # what the app does: apply the growth event, next arch epoch
            params_hash = hashlib.sha256(res.mean.numpy().tobytes()).hexdigest()
            members = len(res.members)
            if args.out:
                np.save(os.path.join(args.out, f"{args.seed}_{step}.npy"), res.mean.numpy())
            emit(
                event="round",
                t=time.time(),
                step=step,
                sha256=params_hash,
                members=res.members,
                bytes_sent=res.bytes_sent,
                bytes_recv=res.bytes_recv,
                attempts=res.attempts,
                seconds=round(res.seconds, 3),
                leader=res.leader,
                committed=res.committed_vote,
                epoch=epoch,
            )
            swarm.publish_progress({"step": step, "params_hash": params_hash})
            step += 1
        time.sleep(args.linger)  # let a slower member receive our last COMMIT
        emit(
            event="done",
            dropped=swarm.dropped_frames,
            denied=swarm.denied,
            peers=[p["peer_id"] for p in swarm.list_peers()],
            history=swarm.growth_history(),
        )
    finally:
        swarm.shutdown()


if __name__ == "__main__":
    main()
