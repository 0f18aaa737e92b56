"""Client side of state transfer: download_state() and the protocol limits it enforces.

Kept apart from the server (peers/state_transfer.py, which re-exports everything here) so
each file holds one idea. The client trusts nothing from the server: every reply is
type- and size-checked, the blob is sha256-verified, and every wait ends at a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time

import zmq

from compression.wire import WireError, pack_message, unpack_message

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 64 << 20  # a server may not make a client buffer frames larger than this
MAX_REQUEST_BYTES = 4096  # requests are tiny; the server's libzmq drops peers that send more
META_REPLY_BYTES = 1 << 20  # the meta dict is small; the blob carries the tensors


class StateTransferError(RuntimeError):
    """The only exception download_state raises: server gone, refused, lied or too big."""


class _Conn:
    """One DEALER connection; replies are matched to requests by rid so a late reply to a
    retried request is recognised and ignored instead of being taken for a newer one."""

    def __init__(self, endpoint: str, server_key: str | bytes | None, max_frame: int) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        try:
            self.sock.linger = 0
            self.sock.maxmsgsize = max_frame  # libzmq drops a server that sends bigger frames
            if server_key is not None:
                key = server_key.encode("ascii") if isinstance(server_key, str) else server_key
                if len(key) != 40:
                    raise StateTransferError("server_key must be a 40-character z85 CURVE key")
                public, secret = zmq.curve_keypair()  # ephemeral: server does not auth clients
                self.sock.curve_serverkey, self.sock.curve_publickey = key, public
                self.sock.curve_secretkey = secret
            self.sock.connect(endpoint)
        except BaseException:
            self.sock.close(linger=0)  # the caller never gets a _Conn to close
            raise
        self._next_rid = secrets.randbelow(1 << 30)

    def send(self, msg: dict) -> int:
        self._next_rid += 1
        try:
            self.sock.send(pack_message({**msg, "rid": self._next_rid}), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise StateTransferError("send queue full: server unreachable") from None
        return self._next_rid

    def recv(self, until: float, max_bytes: int) -> dict | None:
        """Next reply, or None once the monotonic time `until` passes."""
        wait_ms = max(0, int((until - time.monotonic()) * 1000))
        if not self.sock.poll(wait_ms, zmq.POLLIN):
            return None
        try:
            # depth 16: the app's meta (config, growth history) nests below the reply map
            return unpack_message(self.sock.recv(), max_bytes=max_bytes, max_depth=16)
        except WireError as e:
            raise StateTransferError(f"malformed reply from server: {e}") from e


class _SnapshotGone(Exception):
    """The server evicted our snapshot mid-download; start again from META."""


def download_state(
    endpoint: str,
    server_key: str | bytes | None,
    *,
    timeout: float,
    max_bytes: int,
    request_timeout: float = 5.0,
    retries: int = 3,
    window: int = 4,
) -> tuple[dict, bytes]:
    """Fetch (meta, blob) from a StateServer; raises only StateTransferError.

    timeout bounds the whole download; each request waits at most request_timeout (and
    never past the deadline) and is resent at most `retries` times.
    """
    deadline = time.monotonic() + timeout
    conn: _Conn | None = None
    try:
        conn = _Conn(endpoint, server_key, min(max_bytes, MAX_CHUNK_BYTES) + META_REPLY_BYTES)
        for _ in range(3):
            info = _fetch_meta(conn, deadline, request_timeout, retries, max_bytes)
            try:
                blob = _fetch_chunks(conn, info, deadline, request_timeout, retries,
                                     max(1, window))  # fmt: skip
            except _SnapshotGone:
                log.info("state snapshot %s evicted mid-download; restarting", info["snapshot"])
                continue
            if hashlib.sha256(blob).hexdigest() != info["sha256"]:
                raise StateTransferError("sha256 mismatch: downloaded state is corrupt")
            return info["meta"], blob
        raise StateTransferError("server kept evicting snapshots; state changes too fast")
    except StateTransferError:
        raise
    except Exception as e:  # the contract: callers handle exactly one exception type
        raise StateTransferError(f"state download failed: {type(e).__name__}: {e}") from e
    finally:
        if conn is not None:
            conn.sock.close(linger=0)


def _fetch_meta(conn: _Conn, deadline: float, req_timeout: float, retries: int,
                max_bytes: int) -> dict:  # fmt: skip
    for _ in range(retries + 1):
        rid = conn.send({"op": "meta"})
        until = min(deadline, time.monotonic() + req_timeout)
        while (r := conn.recv(until, META_REPLY_BYTES)) is not None and r.get("rid") != rid:
            pass  # a stale reply to an earlier attempt
        if r is not None:
            return _check_meta(r, max_bytes)
        if time.monotonic() >= deadline:
            break
    raise StateTransferError("timed out waiting for state META from server")


def _check_meta(r: dict, max_bytes: int) -> dict:
    if r.get("ok") is not True:
        raise StateTransferError(f"server refused state: {r.get('error')!r}")
    size, n, cb, sha = r.get("size"), r.get("n_chunks"), r.get("chunk_bytes"), r.get("sha256")
    if not isinstance(r.get("meta"), dict) or not isinstance(r.get("snapshot"), str):
        raise StateTransferError("bad META: meta must be a map and snapshot a string")
    if not all(type(v) is int for v in (size, n, cb)) or not isinstance(sha, str):
        raise StateTransferError("bad META: size/n_chunks/chunk_bytes/sha256 have wrong types")
    if not 0 <= size <= max_bytes:
        raise StateTransferError(f"state of {size} bytes exceeds max_bytes={max_bytes}")
    if not 0 < cb <= MAX_CHUNK_BYTES or n != -(-size // cb):
        raise StateTransferError(f"bad META: {n} chunks of {cb} bytes cannot hold {size}")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise StateTransferError("bad META: sha256 is not a hex digest")
    return r


def _fetch_chunks(conn: _Conn, info: dict, deadline: float, req_timeout: float,
                  retries: int, window: int) -> bytes:  # fmt: skip
    size, n, cb, sid = info["size"], info["n_chunks"], info["chunk_bytes"], info["snapshot"]
    chunks: list[bytes | None] = [None] * n
    todo, sends = list(range(n - 1, -1, -1)), [0] * n  # todo is a stack, lowest index on top
    inflight: dict[int, tuple[int, float]] = {}  # rid -> (chunk index, expiry)
    while todo or inflight:
        now = time.monotonic()
        if now >= deadline:
            raise StateTransferError(f"timed out with {chunks.count(None)}/{n} chunks missing")
        for rid, (i, expiry) in list(inflight.items()):
            if expiry <= now:  # lost or slow: resend (a late reply is then ignored)
                del inflight[rid]
                todo.append(i)
        while todo and len(inflight) < window:
            i = todo.pop()
            sends[i] += 1
            if sends[i] > retries + 1:
                raise StateTransferError(f"chunk {i} timed out {retries + 1} times")
            rid = conn.send({"op": "chunk", "snapshot": sid, "index": i})
            inflight[rid] = (i, min(deadline, now + req_timeout))
        r = conn.recv(min(e for _, e in inflight.values()), cb + 4096)
        if r is None or r.get("rid") not in inflight:
            continue
        i, _ = inflight.pop(r["rid"])
        if r.get("ok") is not True:
            if r.get("code") == "unknown_snapshot":
                raise _SnapshotGone()
            raise StateTransferError(f"server refused chunk {i}: {r.get('error')!r}")
        data, want = r.get("data"), min(cb, size - i * cb)
        if not isinstance(data, bytes) or len(data) != want or r.get("index") != i:
            raise StateTransferError(f"bad chunk {i}: expected {want} bytes")
        chunks[i] = data
    return b"".join(chunks)  # type: ignore[arg-type]  # every slot is filled here
