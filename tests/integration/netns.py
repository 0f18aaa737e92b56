"""Real network partitions for multi-process tests, built from Linux network namespaces.

Layout (nothing is added to the host's own namespace, so no test traffic can leave it)::

    <prefix>-0  eth0 10.213.0.1 ──veth── p0 ┐
    <prefix>-1  eth0 10.213.0.2 ──veth── p1 ├─ br0   (in <prefix>-hub)
    ...                                     ┘

Every host namespace has its loopback up and one veth whose other end is a port of a Linux
bridge in a hub namespace. Host i is reachable at ``ips[i]`` from every other host, and a
process started with ``cmd(i, argv)`` binds and connects from there.

``partition({0, 1, 2}, {3})`` moves the hub-side ports of every group but one onto a bridge of
their own: frames between groups have nowhere to go and vanish, both ways, while hosts of one
group keep talking. Links stay up and no host sees a carrier change or an ICMP error; ARP
entries are static (``nud permanent``), so a partition looks like a black hole: established
TCP connections stall and retransmit, new connects time out. ``heal()`` puts every port back
on br0, and the stalled connections resume at their next retransmission.

The subnet is the same for every instance; that is fine, because each instance's namespaces
only see each other. Names carry the creating pid, so concurrent runs never collide, and a
run that died without cleaning up is swept by the next one (its namespaces are deleted and
the processes still inside them killed, only once its pid is gone).

Needs root and iproute2 (``ip``); ``available()`` tells why not otherwise.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence

SUBNET = "10.213.0"
BASE = "dgn"  # default prefixes are f"{BASE}{pid}_{seq}"
_STALE = re.compile(rf"^{BASE}(\d+)_\d+-")
_seq = itertools.count()


def _ip_binary() -> str | None:
    for cand in (shutil.which("ip"), "/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


IP = _ip_binary() or "ip"


class NetnsError(RuntimeError):
    pass


def _run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    try:
        p = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"{' '.join(argv)}: {e}") from e
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def _batch(ns: str, lines: Iterable[str]) -> None:
    """Run several `ip` commands inside namespace ns with one fork (ip -batch)."""
    script = "\n".join(lines) + "\n"
    if script.strip():
        _run([IP, "-n", ns, "-batch", "-"], stdin=script)


def list_namespaces() -> list[str]:
    out = _run([IP, "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    """SIGKILL whatever still runs inside namespace ns (processes our tests started there)."""
    out = _run([IP, "netns", "pids", ns], check=False)
    for tok in out.split():
        if tok.isdigit() and int(tok) != os.getpid():
            try:
                os.kill(int(tok), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _delete(ns: str, kill: bool) -> None:
    if kill:
        _kill_inside(ns)
    _run([IP, "netns", "del", ns], check=False)


def cleanup_stale(prefix: str | None = None) -> list[str]:
    """Delete namespaces left by runs that died: default-named ones whose pid is gone, and
    any named ``<prefix>-...`` (a previous owner of this very prefix). Returns their names."""
    gone = []
    for ns in list_namespaces():
        m = _STALE.match(ns)
        stale = m is not None and not _pid_alive(int(m.group(1)))
        if stale or (prefix is not None and ns.startswith(prefix + "-")):
            _delete(ns, kill=True)
            gone.append(ns)
    return gone


class Netns:
    """n hosts on one virtual switch that tests can partition and heal; a context manager.

    ips[i]       address of host i inside its namespace (10.213.0.{i+1})
    names[i]     its namespace name; hub is the bridge's namespace
    cmd(i, argv) argv prefixed so that it runs inside host i's namespace
    partition(*groups) / heal() / close(): see their docstrings
    """

    def __init__(self, n: int, prefix: str | None = None, *, static_arp: bool = True) -> None:
        if not 1 <= n <= 250:
            raise ValueError("1 <= n <= 250 hosts")
        if prefix is None:
            prefix = f"{BASE}{os.getpid()}_{next(_seq)}"
        self.n = n
        self.prefix = prefix
        self.hub = f"{prefix}-hub"
        self.names = [f"{prefix}-{i}" for i in range(n)]
        self.ips = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.macs = [f"02:d6:00:00:00:{i + 1:02x}" for i in range(n)]
        self._bridge_of = dict.fromkeys(range(n), "br0")
        self._created: list[str] = []
        self._closed = False
        cleanup_stale(prefix)
        atexit.register(self.close)
        try:
            self._build(static_arp)
        except BaseException:
            self.close()
            raise

    # -- construction ---------------------------------------------------------------------

    def _add_ns(self, name: str) -> None:
        _run([IP, "netns", "add", name])
        self._created.append(name)

    def _build(self, static_arp: bool) -> None:
        self._add_ns(self.hub)
        hub = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
        for i, name in enumerate(self.names):
            self._add_ns(name)
            # Created inside the hub, the host end goes straight into its namespace: no
            # interface ever exists in the host's namespace, so names cannot collide there.
            hub.append(f"link add p{i} type veth peer name eth0 netns {name}")
            hub.append(f"link set p{i} master br0 up")
        _batch(self.hub, hub)
        for i, name in enumerate(self.names):
            cmds = [
                "link set lo up",
                f"link set eth0 address {self.macs[i]}",
                f"addr add {self.ips[i]}/24 dev eth0",
                "link set eth0 up",
            ]
            if static_arp:
                cmds += [
                    f"neigh replace {self.ips[j]} lladdr {self.macs[j]} dev eth0 nud permanent"
                    for j in range(self.n)
                    if j != i
                ]
            _batch(name, cmds)

    # -- use ------------------------------------------------------------------------------

    def cmd(self, i: int, argv: Sequence[str]) -> list[str]:
        """argv prefixed to run inside host i's namespace (`ip netns exec` execs argv, so a
        Popen of it has argv's own pid; its children stay in that namespace too)."""
        return [IP, "netns", "exec", self.names[i], *argv]

    def popen(self, i: int, argv: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(i, argv), **kw)

    def run(self, i: int, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(i, argv), **kw)

    @property
    def groups(self) -> list[list[int]]:
        """The current connectivity classes (one group when healed)."""
        by: dict[str, list[int]] = {}
        for i in range(self.n):
            by.setdefault(self._bridge_of[i], []).append(i)
        return sorted(by.values())

    def partition(self, *groups: Iterable[int]) -> None:
        """Cut all traffic between the given groups, both ways; hosts within a group still
        talk. Hosts not named in any group form one more group together, so
        partition({3}) cuts host 3 off from everybody else. A later call replaces the
        previous partition directly (no healed moment in between)."""
        sets = [sorted(set(g)) for g in groups]
        seen: set[int] = set()
        for g in sets:
            for i in g:
                if not 0 <= i < self.n:
                    raise ValueError(f"no host {i}")
                if i in seen:
                    raise ValueError(f"host {i} is in two groups")
                seen.add(i)
        rest = [i for i in range(self.n) if i not in seen]
        sets = [g for g in ([rest] if rest else []) + sets if g]
        # The first group keeps br0; the others each get a fresh bridge.
        target = {i: ("br0" if k == 0 else f"brg{k}") for k, g in enumerate(sets) for i in g}
        self._apply(target)

    def isolate(self, *hosts: int) -> None:
        """Cut each of these hosts off from every other host."""
        self.partition(*[[h] for h in hosts])

    def heal(self) -> None:
        """Undo any partition: every host sees every other again."""
        self._apply(dict.fromkeys(range(self.n), "br0"))

    def _apply(self, target: dict[int, str]) -> None:
        if self._closed:
            raise NetnsError("Netns is closed")
        have = set(self._bridge_of.values()) | {"br0"}
        want = set(target.values())
        cmds = [f"link add {b} type bridge\nlink set {b} up" for b in sorted(want - have)]
        cmds += [f"link set p{i} master {b}" for i, b in target.items() if self._bridge_of[i] != b]
        cmds += [f"link del {b}" for b in sorted(have - want - {"br0"})]
        _batch(self.hub, cmds)
        self._bridge_of = dict(target)

    # -- teardown -------------------------------------------------------------------------

    def close(self, kill: bool = True) -> None:
        """Delete every namespace this instance created (the veths and bridges go with them).
        kill=True first SIGKILLs processes still running inside them. Idempotent; never
        raises."""
        if self._closed:
            return
        self._closed = True
        for name in reversed(self._created):
            try:
                _delete(name, kill)
            except Exception:
                pass
        self._created.clear()
        atexit.unregister(self.close)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"groups={self.groups}"
        return f"Netns({self.n}, prefix={self.prefix!r}, {state})"


@functools.cache
def available() -> str | None:
    """None if namespaces, veths and bridges can be made here, else the reason why not."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root"
    if _ip_binary() is None:
        return "iproute2 `ip` not found"
    try:
        with Netns(2) as net:
            net.partition([0], [1])
            net.heal()
    except Exception as e:  # any failure means "not usable here"
        return f"cannot build network namespaces: {e}"
    return None
