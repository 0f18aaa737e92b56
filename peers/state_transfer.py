"""State transfer to joiners and laggards: chunked, size-limited, hash-verified, over zmq.

A live peer runs a StateServer whose provider returns (meta, blob) for its current θ_g,
outer momentum, arch spec, step and growth history (what is inside is the app's business).
A joiner calls download_state(): META pins one *snapshot* (so a download stays consistent
while training goes on), then CHUNK requests fetch it piecewise with a small window in
flight. Every message is a safe msgpack map (compression.wire); nothing is unpickled.
The client half (download_state, StateTransferError) lives in peers/state_client.py and is
re-exported here, so callers import both from this module.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from compression.wire import WireError, pack_message, unpack_message
from peers.state_client import (
    MAX_CHUNK_BYTES,
    MAX_REQUEST_BYTES,
    META_REPLY_BYTES,
    StateTransferError,
    download_state,
)

__all__ = ["StateServer", "StateTransferError", "download_state", "DEFAULT_CHUNK_BYTES",
           "MAX_CHUNK_BYTES", "MAX_REQUEST_BYTES", "META_REPLY_BYTES"]  # fmt: skip

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
_POLL_MS = 50  # how often the server thread looks at its stop flag


@dataclass(frozen=True)
class _Snapshot:
    sid: str
    meta: dict
    blob: bytes
    sha256: str


class StateServer:
    """Serves META / CHUNK requests from a background thread with its own ROUTER socket.

    provider() runs on that thread, once per META request, so it must return a consistent
    copy (bytes serialized under the app's own lock), never live tensors' storage.
    """

    def __init__(
        self,
        provider: Callable[[], tuple[dict, bytes]],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_state_bytes: int = 16 << 30,
        keep_snapshots: int = 2,
        curve: bool = True,
    ) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
        if keep_snapshots < 1:
            raise ValueError("keep_snapshots must be >= 1")
        self.provider, self.host, self.port = provider, host, port
        self.chunk_bytes, self.max_state_bytes = chunk_bytes, max_state_bytes
        self.keep_snapshots = keep_snapshots
        self.public_key: str | None = None
        self._secret_key: bytes | None = None
        if curve:
            public, secret = zmq.curve_keypair()
            self.public_key, self._secret_key = public.decode("ascii"), secret
        self.endpoint = ""
        self._snapshots: OrderedDict[str, _Snapshot] = OrderedDict()  # server thread only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Bind here (not in the thread) so bind errors surface to the caller and the port
        # is known on return; the socket is then used only by the server thread.
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.linger = 0
        sock.maxmsgsize = MAX_REQUEST_BYTES
        sock.sndhwm = 8  # a client that requests but never reads cannot pin GBs of chunks
        sock.rcvhwm = 64  # requests are tiny and answered in order: no backlog is needed
        if self._secret_key is not None:
            sock.curve_server = True
            sock.curve_secretkey = self._secret_key
        try:
            sock.bind(f"tcp://{self.host}:{self.port or '*'}")
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.endpoint = sock.last_endpoint.decode()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name="state-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._snapshots.clear()

    def _serve(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                frames = sock.recv_multipart()
                if len(frames) != 2:  # a DEALER request is [identity, payload]
                    log.warning("state server: dropped request with %d frames", len(frames))
                    continue
                try:
                    reply = self._handle(frames[1])
                except Exception:  # a bug on one request must not stop serving the others
                    log.exception("state server: request failed")
                    reply = _error(None, "internal", "internal server error")
                try:
                    sock.send_multipart([frames[0], reply], flags=zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("state server: client not reading, reply dropped")
        except zmq.ZMQError as e:
            log.error("state server stopped on socket error: %s", e)
        finally:
            sock.close(linger=0)

    def _handle(self, payload: bytes) -> bytes:
        try:
            req = unpack_message(payload, max_bytes=MAX_REQUEST_BYTES)
        except WireError as e:
            log.warning("state server: malformed request: %s", e)
            return _error(None, "bad_request", f"malformed request: {e}")
        rid = req.get("rid")
        if type(rid) is not int:
            log.warning("state server: request without an int rid")
            return _error(None, "bad_request", "rid must be an int")
        op = req.get("op")
        if op == "meta":
            return self._meta(rid)
        if op == "chunk":
            return self._chunk(rid, req.get("snapshot"), req.get("index"))
        log.warning("state server: unknown op %r", op)
        return _error(rid, "bad_request", f"unknown op {op!r}")

    def _meta(self, rid: int) -> bytes:
        try:
            meta, blob = self.provider()
        except RuntimeError as e:  # the app says it cannot serve yet (still starting)
            log.warning("state server: not serving yet: %s", e)
            return _error(rid, "provider_failed", f"provider failed: {e}")
        except Exception as e:
            log.exception("state server: provider failed")
            return _error(rid, "provider_failed", f"provider failed: {e}")
        if not isinstance(meta, dict) or not isinstance(blob, (bytes, bytearray, memoryview)):
            return _error(rid, "provider_failed", "provider must return (dict, bytes)")
        blob = bytes(blob)
        if len(blob) > self.max_state_bytes:
            return _error(rid, "too_large", f"state of {len(blob)} bytes exceeds server limit")
        sha = hashlib.sha256(blob).hexdigest()
        snap = next(
            (s for s in self._snapshots.values() if s.sha256 == sha and s.meta == meta), None
        )
        if snap is None:  # state changed since the last META: pin a new snapshot
            snap = _Snapshot(secrets.token_hex(8), meta, blob, sha)
            self._snapshots[snap.sid] = snap
            while len(self._snapshots) > self.keep_snapshots:
                self._snapshots.popitem(last=False)
        n_chunks = -(-len(blob) // self.chunk_bytes)
        reply = {
            "ok": True, "rid": rid, "meta": snap.meta, "size": len(blob), "sha256": sha,
            "n_chunks": n_chunks, "chunk_bytes": self.chunk_bytes, "snapshot": snap.sid,
        }  # fmt: skip
        try:
            return pack_message(reply)
        except (WireError, TypeError, ValueError) as e:
            return _error(rid, "provider_failed", f"meta is not msgpack-able: {e}")

    def _chunk(self, rid: int, sid: object, index: object) -> bytes:
        snap = self._snapshots.get(sid) if isinstance(sid, str) else None
        if snap is None:  # evicted by newer snapshots: the client restarts from META
            return _error(rid, "unknown_snapshot", f"unknown snapshot {sid!r}")
        start = index * self.chunk_bytes if type(index) is int else -1
        if not 0 <= start < len(snap.blob):
            return _error(rid, "bad_request", f"chunk index {index!r} out of range")
        data = snap.blob[start : start + self.chunk_bytes]
        return pack_message({"ok": True, "rid": rid, "index": index, "data": data})


def _error(rid: int | None, code: str, message: str) -> bytes:
    return pack_message({"ok": False, "rid": rid, "code": code, "error": message})
