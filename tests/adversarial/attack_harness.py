"""An honest swarm of three real `diloco-grow peer` processes and one hostile peer, and
what the honest peers must keep to whatever the hostile one does (issue #9):

(a) at every step after the attack that two or more honest peers committed, their θ_g
    hashes are equal (before it the attacker behaved as an honest peer: a split there, e.g.
    two rival groups at a loaded machine's first round, is the round protocol's own; the
    majority line heals it, and must do so with a forger on one side: test_round_rules.py
    `test_a_forger_on_one_of_two_rival_lines_takes_nothing_over`);
(b) every loss is finite, and the val loss at the end is below its value at the attack;
(c) the attacker is excluded: not a member after its offence (for attacks by a member),
    no invented member ever, no state adopted from it, no growth nobody honest voted for;
(d) liveness: every honest peer commits `ROUNDS_AFTER` rounds after the attack.

`violations()` returns every broken rule, so one run shows everything an attack did.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import TypeVar

import psutil

from diloco_grow.metrics import read_jsonl

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
# The honest peers' command line (after `peer --run R`), one list for every test. Inner
# phases of H=60 steps (~5-10 s here) are 15-30 heartbeats and several matchmaking graces
# and phase timeouts long, as in tests/integration/test_peer_app.py. --min-peers 2: the
# bootstrap's first round waits for a second peer.
HONEST_ARGS = [
    "--open", "--preset", "tiny", "--inner-steps", "60",
    "--heartbeat-s", "0.3", "--matchmaking-s", "0.5", "--phase-timeout-s", "4",
    "--min-peers", "2",
]  # fmt: skip
SLOWDOWNS = (1.0, 1.0, 2.0)  # one honest peer is twice as slow as the others
# The hostile peer speaks the same protocol with the same settings, but trains two steps a
# phase: it needs a weight > 0, not a good Δ, and must not take the 2 shared cores.
HOSTILE_ARGS = ["--inner-steps", "2"]
ROUNDS_AFTER = 3  # (d): rounds each honest peer must commit after the attack
HUGE_STEP = 10**6  # no honest run of these tests gets near it
_runs = count()
# The app's log lines for a commit and for a download (diloco_grow/peer.py).
_ROUND = re.compile(r"round step=(\d+) .* hash=(\w+)")
_ADOPTED = re.compile(r"adopted the swarm's θ_g (\w+) at step (\d+)")


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip


@dataclass
class Peer:
    name: str
    proc: subprocess.Popen
    log: Path
    out: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []

    @property
    def peer_id(self) -> str | None:
        m = re.search(r"peer ([0-9a-f]+) up: data plane", self.text())
        return m.group(1) if m else None

    def events(self) -> list[dict]:
        out = []
        for line in self.text().splitlines():
            if line.startswith('{"event"'):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


@dataclass
class AttackRun:
    tmp: Path
    procs: list[subprocess.Popen]
    run: str = field(default_factory=lambda: f"adv{os.getpid()}x{next(_runs)}")
    honest: list[Peer] = field(default_factory=list)
    hostile: Peer | None = None

    # ---- processes --------------------------------------------------------------------------

    def _peer(self, name: str, cmd: list[str]) -> Peer:
        log = self.tmp / f"{name}.log"
        p = Peer(name, spawn(cmd, log), log, self.tmp / name)
        self.procs.append(p.proc)
        return p

    def start(self, attacks: str, *hostile_opts: str) -> None:
        """Bootstrap, then two honest peers (one slow) and the hostile peer join it."""
        cli = [sys.executable, "-m", "diloco_grow.cli", "peer", "--run", self.run, *HONEST_ARGS]
        boot = self._peer("honest0", [*cli, "--out-dir", str(self.tmp / "honest0")])
        self.honest.append(boot)
        maddr = self.wait_for(lambda: _ready(boot.text()), 120, "the bootstrap's ready line")
        for i, slow in enumerate(SLOWDOWNS[1:], start=1):
            name = f"honest{i}"
            extra = ["--slowdown", str(slow)] if slow != 1.0 else []
            args = [*cli, "--join", maddr, "--out-dir", str(self.tmp / name), *extra]
            self.honest.append(self._peer(name, args))
        hostile = [
            sys.executable, "-m", "tests.adversarial.hostile_peer", "--attack", attacks,
            *hostile_opts, "--", *cli[3:], *HOSTILE_ARGS, "--join", maddr,
            "--out-dir", str(self.tmp / "hostile"),
        ]  # fmt: skip
        self.hostile = self._peer("hostile", hostile)

    def wait_for(self, pred: Callable[[], T | None], timeout: float, what: str) -> T:
        """pred()'s first truthy value; fails early if any of our processes exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            dead = [p.name for p in self.all() if p.proc.poll() is not None]
            if dead:
                raise AssertionError(f"{dead} exited while waiting for {what}\n{self.report()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.report()}")

    def all(self) -> list[Peer]:
        return [*self.honest, *([self.hostile] if self.hostile else [])]

    def wait_attack(self, *names: str, timeout: float = 240) -> dict:
        """The hostile peer's first event performing any of `names`."""
        assert self.hostile is not None
        host = self.hostile

        def first() -> dict | None:
            return next((e for e in host.events() if e.get("name") in names), None)

        return self.wait_for(first, timeout, f"the hostile peer's attack {names}")

    def wait_rounds_after(self, step: int, timeout: float = 300) -> bool:
        """Until every honest peer committed ROUNDS_AFTER rounds past `step` (True). False
        once no honest peer committed for `max(60 s, 4 typical rounds)`, every honest peer
        exited, or `timeout` passed: the test then reports what it saw."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = [p.rows() for p in self.honest]
            if all(len([r for r in rs if r["step"] > step]) >= ROUNDS_AFTER for rs in rows):
                return True
            if all(p.proc.poll() is not None for p in self.honest):
                return False
            # A round's length: the median gap between one peer's consecutive commits.
            gaps = sorted(
                b["time"] - a["time"] for rs in rows for a, b in zip(rs, rs[1:], strict=False)
            )
            typical = gaps[len(gaps) // 2] if gaps else 30.0
            last = max((r["time"] for rs in rows for r in rs), default=time.time())
            if time.time() - last > max(60.0, 4 * typical):
                return False  # stalled: nothing committed for four rounds' time
            time.sleep(1.0)
        return False

    def stop(self) -> None:
        """SIGTERM to every process group, SIGKILL to what is left after 30 s."""
        for p in self.all():
            if p.proc.poll() is None:
                os.killpg(p.proc.pid, signal.SIGTERM)
        for p in self.all():
            try:
                p.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.proc.pid, signal.SIGKILL)
                p.proc.wait()

    def attack(self, spec: str, *names: str, hostile_opts: tuple[str, ...] = ()) -> int:
        """Start the swarm with the hostile peer running `spec`, wait for the first of the
        attacks `names` and the rounds after it, stop everything; the θ_g step attacked."""
        self.start(spec, *hostile_opts)
        step = self.wait_attack(*names)["step"]
        self.wait_rounds_after(step)
        self.stop()
        return step

    # ---- what the honest peers must keep to ---------------------------------------------------

    def violations(self, attack_step: int, *, member_offence: bool) -> list[str]:
        """Every rule of the module docstring the honest peers broke. `attack_step`: θ_g step
        of the first attacked round (its outcome is the row at attack_step + 1).
        `member_offence`: the attacker offended as a member, so it must not be one after."""
        assert self.hostile is not None
        bad: list[str] = []
        evil = self.hostile_id
        honest_ids = {p.peer_id for p in self.honest}
        real = honest_ids | {evil}
        rows = {p.name: p.rows() for p in self.honest}
        # (a) one θ_g per step, from the attacked round's outcome (attack_step + 1) on
        hashes: dict[int, dict[str, str]] = {}
        for name, rs in rows.items():
            for r in rs:
                if r["step"] > attack_step:
                    hashes.setdefault(r["step"], {})[name] = r["params_hash"]
        for step, by in sorted(hashes.items()):
            if len(set(by.values())) > 1:
                bad.append(f"(a) step {step}: honest θ_g hashes differ: {by}")
        for name, rs in rows.items():
            # (b) finite losses, and learning on after the attack
            for r in rs:
                for key in ("train_loss", "val_loss"):
                    if r.get(key) is not None and not math.isfinite(r[key]):
                        bad.append(f"(b) {name} step {r['step']}: {key} = {r[key]}")
            before = [r for r in rs if r["step"] <= attack_step and r.get("val_loss") is not None]
            after = [r for r in rs if r["step"] > attack_step and r.get("val_loss") is not None]
            if before and after:
                v0, v1 = before[-1]["val_loss"], after[-1]["val_loss"]
                if not v1 < v0:  # (NaN fails this too)
                    bad.append(
                        f"(b) {name}: val loss {v1} at step {after[-1]['step']} is not below "
                        f"{v0} at step {before[-1]['step']} (the attack)"
                    )
            # (c) the attacker is excluded; nobody invented is ever a member
            for r in rs:
                ids = set(r.get("member_ids", []))
                if member_offence and r["step"] > attack_step + 1 and evil in ids:
                    bad.append(f"(c) {name} step {r['step']}: the attacker is still a member")
                if ids - real:
                    bad.append(
                        f"(c) {name} step {r['step']}: {len(ids - real)} invented member(s) "
                        f"among {len(ids)}"
                    )
                if r["step"] >= HUGE_STEP:
                    bad.append(f"(c) {name}: θ_g at step {r['step']} (a forged claim)")
            grown = [r["step"] for r in rs if "event" in r]
            if grown:
                bad.append(f"(c) {name}: grew at step(s) {grown}, though no honest peer voted")
            sizes = sorted({r["n_params"] for r in rs})
            if len(sizes) > 1:
                bad.append(f"(c) {name}: architecture changed, n_params {sizes}")
            # (d) liveness
            done = [r["step"] for r in rs if r["step"] > attack_step]
            if len(done) < ROUNDS_AFTER:
                bad.append(
                    f"(d) {name}: {len(done)} round(s) committed after the attack at step "
                    f"{attack_step} (need {ROUNDS_AFTER}): {done}"
                )
        # (c) resyncs: onto a state no honest peer ever committed (a forged one, maybe
        # second-hand), or onto the state the peer already held (a resync someone ordered
        # for nothing). Downloading the swarm's own state from the attacker is no harm.
        committed = {(r["step"], r["params_hash"][:16]) for rs in rows.values() for r in rs}
        for p in self.honest:
            held: set[tuple[int, str]] = set()
            pointless = 0
            for ln in p.text().splitlines():
                if m := _ROUND.match(ln):
                    held.add((int(m[1]), m[2]))
                if not (m := _ADOPTED.search(ln)):
                    continue
                state = (int(m[2]), m[1])
                if state not in committed:
                    bad.append(f"(c) {p.name} adopted a state no honest peer committed: {ln}")
                elif state in held:
                    pointless += 1
                held.add(state)
            if pointless:
                bad.append(f"(c) {p.name} was made to resync {pointless}x onto θ_g it held")
        return bad

    def kept_out(self, after_step: int, share: float = 0.5) -> list[str]:
        """Honest peers that were members of fewer than `share` of the rounds the honest
        peers committed after `after_step` (a straggler may miss one now and then; an
        evicted peer misses most of them)."""
        members: dict[int, set[str]] = {}
        for p in self.honest:
            for r in p.rows():
                if r["step"] > after_step:
                    members.setdefault(r["step"], set()).update(r.get("member_ids", []))
        bad = []
        for p in self.honest:
            n = sum(p.peer_id in ids for ids in members.values())
            if members and n < share * len(members):
                bad.append(
                    f"(c) {p.name} was a member of {n} of the {len(members)} rounds after "
                    f"step {after_step}: kept out"
                )
        return bad

    @property
    def honest_ids(self) -> list[str | None]:
        return [p.peer_id for p in self.honest]

    @property
    def hostile_id(self) -> str:
        assert self.hostile is not None
        ready = next((e for e in self.hostile.events() if e["event"] == "ready"), None)
        assert ready is not None, "the hostile peer never got ready"
        return ready["peer_id"]

    def report(self, problems: list[str] = ()) -> str:  # type: ignore[assignment]
        """Everything a reader of a failed test needs: the broken rules, each honest peer's
        rounds, the attacks performed and the honest peers' telling log lines."""
        lines = ["violations:", *(f"  {p}" for p in problems)] if problems else []
        for p in self.honest:
            rs = [
                f"{r['step']}:{r['members']}:{_num(r.get('val_loss'))}:{r['params_hash'][:6]}"
                for r in p.rows()
            ]
            lines.append(f"{p.name} {p.peer_id} rounds (step:members:val:hash): {' '.join(rs)}")
        if self.hostile is not None:
            evs = self.hostile.events()
            lines.append(
                f"hostile events ({len(evs)}): "
                + "; ".join(
                    json.dumps({k: v for k, v in e.items() if k != "time"})[:200] for e in evs[:8]
                )
            )
        keys = (
            "aborting",
            "resync",
            "adopted",
            "growth",
            "not applied",
            "invalid",
            "failed",
            "Traceback",
            "Error",
            "not waiting",
            "alone",
            "dropped",
        )
        for p in self.honest:
            hits = [ln[:240] for ln in p.text().splitlines() if any(k in ln for k in keys)]
            lines.append(f"--- {p.name}: {len(hits)} telling log lines, first 12:")
            lines.extend(hits[:12])
        return "\n".join(lines)


def _ready(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("ready "):
            return line.split()[1]
    return None


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


class RssSampler(threading.Thread):
    """Resident memory of some processes, every `period_s`, for as long as the test runs."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.2) -> None:
        super().__init__(name="rss", daemon=True)
        self.pids, self.period_s = pids, period_s
        self.samples: list[tuple[float, str, int]] = []  # (wall time, name, rss bytes)
        self.halt = threading.Event()

    def run(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self.halt.wait(self.period_s):
            now = time.time()
            for name, proc in procs.items():
                try:
                    self.samples.append((now, name, proc.memory_info().rss))
                except psutil.Error:
                    continue

    def peak(self, name: str, t0: float, t1: float) -> int:
        return max((r for t, n, r in self.samples if n == name and t0 <= t <= t1), default=0)
