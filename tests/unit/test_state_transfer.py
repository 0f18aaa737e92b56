"""State transfer over real zmq sockets on 127.0.0.1 (server thread + client in one process)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from compression.wire import pack_message, unpack_message
from peers.state_transfer import StateServer, StateTransferError, download_state

BLOB = os.urandom(10_000 + 123)  # not a multiple of the chunk size: the last chunk is short
META = {"step": 7, "arch_epoch": 1, "config": {"d_model": 64}, "history": [{"kind": "experts"}]}


@pytest.fixture
def server() -> Iterator[StateServer]:
    srv = StateServer(lambda: (META, BLOB), chunk_bytes=1024)
    srv.start()
    yield srv
    srv.stop()


def _get(srv: StateServer, **kw: object) -> tuple[dict, bytes]:
    kw = {"timeout": 5.0, "max_bytes": 1 << 20, **kw}
    return download_state(srv.endpoint, srv.public_key, **kw)  # type: ignore[arg-type]


def test_multi_chunk_round_trip_is_exact(server: StateServer) -> None:
    assert server.endpoint.startswith("tcp://127.0.0.1:") and len(server.public_key or "") == 40
    meta, blob = _get(server)
    assert meta == META and blob == BLOB
    meta, blob = _get(server, window=1)  # strictly sequential fetch gives the same bytes
    assert blob == BLOB


def test_plain_tcp_and_empty_state() -> None:
    srv = StateServer(lambda: ({"step": 0}, b""), curve=False)
    srv.start()
    try:
        assert srv.public_key is None
        assert download_state(srv.endpoint, None, timeout=5.0, max_bytes=10) == ({"step": 0}, b"")
    finally:
        srv.stop()


def test_download_is_consistent_while_state_changes() -> None:
    calls = [0]

    def provider() -> tuple[dict, bytes]:  # training moves on between every request
        calls[0] += 1
        return {"version": calls[0]}, bytes([calls[0] % 256]) * 5000

    srv = StateServer(provider, chunk_bytes=700)
    srv.start()
    try:
        for _ in range(2):
            meta, blob = _get(srv)
            assert blob == bytes([meta["version"] % 256]) * 5000
    finally:
        srv.stop()


def test_max_bytes_exceeded_fails_before_download(server: StateServer) -> None:
    with pytest.raises(StateTransferError, match="exceeds max_bytes"):
        _get(server, max_bytes=len(BLOB) - 1)


def test_provider_failure_is_reported_and_server_survives() -> None:
    fail = [True]

    def provider() -> tuple[dict, bytes]:
        if fail[0]:
            raise OSError("disk on fire")
        return META, BLOB

    srv = StateServer(provider, chunk_bytes=4096)
    srv.start()
    try:
        with pytest.raises(StateTransferError, match="disk on fire"):
            _get(srv)
        fail[0] = False
        assert _get(srv) == (META, BLOB)
    finally:
        srv.stop()


def test_server_gone_times_out_within_bound() -> None:
    srv = StateServer(lambda: (META, BLOB))
    srv.start()
    endpoint, key = srv.endpoint, srv.public_key
    srv.stop()
    t0 = time.monotonic()
    with pytest.raises(StateTransferError, match="timed out"):
        download_state(endpoint, key, timeout=0.6, max_bytes=1 << 20, request_timeout=0.2)
    assert time.monotonic() - t0 < 3.0  # a bound on giving up, not a performance number


def test_wrong_server_key_fails(server: StateServer) -> None:
    other = zmq.curve_keypair()[0]  # CURVE handshake never completes -> timeout, not a hang
    with pytest.raises(StateTransferError):
        download_state(server.endpoint, other, timeout=0.5, max_bytes=1 << 20)
    with pytest.raises(StateTransferError, match="z85"):
        download_state(server.endpoint, "short", timeout=0.5, max_bytes=1 << 20)


def test_bad_endpoint_raises_only_state_transfer_error() -> None:
    with pytest.raises(StateTransferError):
        download_state("nonsense://x", None, timeout=0.5, max_bytes=10)


def test_garbage_requests_do_not_kill_server(server: StateServer) -> None:
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.linger, raw.rcvtimeo = 0, 2000
    raw.curve_serverkey = server.public_key.encode()  # type: ignore[union-attr]
    raw.curve_publickey, raw.curve_secretkey = zmq.curve_keypair()
    raw.connect(server.endpoint)
    bad_requests = [
        b"\xc1 not msgpack",
        pack_message({"op": "meta"}),  # no rid
        pack_message({"op": "launch", "rid": 1}),
        pack_message({"op": "chunk", "rid": 2, "snapshot": "nope", "index": 0}),
        pack_message({"op": "chunk", "rid": 3, "snapshot": ["x"], "index": "0"}),
    ]
    try:
        raw.send_multipart([b"a", b"b", b"c"])  # wrong frame count: dropped with a log line
        for payload in bad_requests:  # in order on one connection, after the one above
            raw.send(payload)
            reply = unpack_message(raw.recv(), max_bytes=4096)
            assert reply["ok"] is False and reply["error"]
        raw.send(b"x" * 100_000)  # over the request size limit: libzmq drops this client
    finally:
        raw.close(linger=500)  # let the oversized frame actually leave
    with socket.create_connection(("127.0.0.1", int(server.endpoint.rsplit(":", 1)[1]))) as s:
        s.sendall(os.urandom(4096))  # not even ZMTP
    assert _get(server) == (META, BLOB)


def _fake_server(
    answer: Callable[[dict], dict | None],
) -> tuple[str, Callable[[], None], list[dict]]:
    """A hostile/buggy server without CURVE: answer(request) -> reply (None: stay silent)."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    seen: list[dict] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if sock.poll(20):
                ident, payload = sock.recv_multipart()
                req = unpack_message(payload)
                seen.append(req)
                reply = answer(req)
                if reply is not None:
                    sock.send_multipart([ident, pack_message({"rid": req["rid"], **reply})])
        sock.close(linger=0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def close() -> None:
        stop.set()
        thread.join(5)

    return f"tcp://127.0.0.1:{port}", close, seen


def _meta_reply(blob: bytes, sha: str, size: int | None = None, n: int | None = None) -> dict:
    size = len(blob) if size is None else size
    return {"ok": True, "meta": {}, "size": size, "sha256": sha, "chunk_bytes": 100,
            "n_chunks": -(-size // 100) if n is None else n, "snapshot": "s1"}  # fmt: skip


LIES = {
    "hash": "sha256 mismatch",
    "huge": "exceeds max_bytes",
    "chunks": "cannot hold",
    "short_chunk": "bad chunk",
    "silent_chunks": "timed out",
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_server_is_caught(lie: str) -> None:
    blob = os.urandom(1000)
    good = hashlib.sha256(blob).hexdigest()

    def answer(req: dict) -> dict | None:
        if req["op"] == "meta":
            if lie == "hash":
                return _meta_reply(blob, hashlib.sha256(b"other").hexdigest())
            if lie == "huge":
                return _meta_reply(blob, good, size=10**12)
            if lie == "chunks":
                return _meta_reply(blob, good, n=3)
            return _meta_reply(blob, good)
        if lie == "silent_chunks":
            return None
        i = req["index"]
        data = blob[i * 100 : (i + 1) * 100]
        return {"ok": True, "index": i, "data": data[:-1] if lie == "short_chunk" else data}

    endpoint, close, seen = _fake_server(answer)
    try:
        with pytest.raises(StateTransferError, match=LIES[lie]):
            download_state(endpoint, None, timeout=2.0, max_bytes=1 << 20, request_timeout=0.2)
        if lie in ("huge", "chunks"):  # rejected on META alone: no chunk was requested
            assert [r["op"] for r in seen] == ["meta"]
    finally:
        close()


def test_evicted_snapshot_restarts_from_meta() -> None:
    blob = os.urandom(250)
    metas = iter(["old", "new"])

    def answer(req: dict) -> dict | None:
        if req["op"] == "meta":  # the first snapshot is evicted before its chunks are read
            return {**_meta_reply(blob, hashlib.sha256(blob).hexdigest()), "snapshot": next(metas)}
        if req["snapshot"] == "old":
            return {"ok": False, "code": "unknown_snapshot", "error": "evicted"}
        i = req["index"]
        return {"ok": True, "index": i, "data": blob[i * 100 : (i + 1) * 100]}

    endpoint, close, seen = _fake_server(answer)
    try:
        assert download_state(endpoint, None, timeout=5.0, max_bytes=1000) == ({}, blob)
        assert [r["op"] for r in seen].count("meta") == 2
    finally:
        close()
