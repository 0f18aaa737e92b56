"""Local control channel over real zmq sockets (tcp loopback and ipc) in one process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from compression.wire import pack_message, unpack_message
from peers.control import ControlError, ControlServer, control_request


class Peer:
    """Stands in for the peer app: answers status, sets a flag on leave."""

    def __init__(self) -> None:
        self.left = threading.Event()
        self.delay = 0.0

    def handle(self, req: dict) -> dict:
        time.sleep(self.delay)
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, "step": 12, "arch_epoch": 1, "params_hash": "ab" * 32}
        if cmd == "leave":
            self.left.set()
            return {"ok": True, "leaving": True}
        if cmd == "boom":
            raise RuntimeError("handler exploded")
        if cmd == "not_a_dict":
            return ["nope"]  # type: ignore[return-value]
        return {"ok": False, "error": f"unknown cmd {cmd!r}"}


@pytest.fixture
def served() -> Iterator[tuple[Peer, ControlServer]]:
    peer = Peer()
    srv = ControlServer(peer.handle)
    srv.start()
    yield peer, srv
    srv.stop()


def test_status_and_leave_round_trip(served: tuple[Peer, ControlServer]) -> None:
    peer, srv = served
    assert srv.endpoint.startswith("tcp://127.0.0.1:") and not srv.endpoint.endswith(":0")
    status = control_request(srv.endpoint, {"cmd": "status"}, timeout=2.0)
    assert status == {"ok": True, "step": 12, "arch_epoch": 1, "params_hash": "ab" * 32}
    assert not peer.left.is_set()
    assert control_request(srv.endpoint, {"cmd": "leave"}, timeout=2.0)["leaving"] is True
    assert peer.left.is_set()
    assert control_request(srv.endpoint, {"cmd": "dance"}, 2.0)["ok"] is False


def test_handler_errors_become_error_replies(served: tuple[Peer, ControlServer]) -> None:
    _, srv = served
    reply = control_request(srv.endpoint, {"cmd": "boom"}, timeout=2.0)
    assert reply["ok"] is False and "handler exploded" in reply["error"]
    reply = control_request(srv.endpoint, {"cmd": "not_a_dict"}, timeout=2.0)
    assert reply["ok"] is False and "not a dict" in reply["error"]
    assert control_request(srv.endpoint, {"cmd": "status"}, timeout=2.0)["step"] == 12


def test_malformed_requests_get_error_replies(served: tuple[Peer, ControlServer]) -> None:
    _, srv = served
    assert control_request(srv.endpoint, {"no_cmd": 1}, timeout=2.0)["ok"] is False
    raw = zmq.Context.instance().socket(zmq.REQ)
    raw.linger, raw.rcvtimeo = 0, 2000
    raw.connect(srv.endpoint)
    try:
        for frames in ([b"\xc1garbage"], [pack_message({"cmd": 5})], [b"a", b"b"]):
            raw.send_multipart(frames)
            reply = unpack_message(raw.recv())
            assert reply["ok"] is False and reply["error"]
    finally:
        raw.close(linger=0)
    assert control_request(srv.endpoint, {"cmd": "status"}, timeout=2.0)["ok"] is True


def test_timeout_raises_and_next_request_works(served: tuple[Peer, ControlServer]) -> None:
    peer, srv = served
    peer.delay = 0.5  # slower than the client is willing to wait
    with pytest.raises(ControlError, match="no reply"):
        control_request(srv.endpoint, {"cmd": "status"}, timeout=0.1)
    peer.delay = 0.0  # the server first answers the abandoned request into the void
    assert control_request(srv.endpoint, {"cmd": "status"}, timeout=2.0)["step"] == 12


def test_no_server_and_bad_endpoint() -> None:
    srv = ControlServer(lambda req: {"ok": True})
    srv.start()
    endpoint = srv.endpoint
    srv.stop()
    t0 = time.monotonic()
    with pytest.raises(ControlError):
        control_request(endpoint, {"cmd": "status"}, timeout=0.2)
    assert time.monotonic() - t0 < 2.0  # gives up near its timeout instead of hanging
    with pytest.raises(ControlError):
        control_request("nonsense://x", {"cmd": "status"}, timeout=0.2)
    with pytest.raises(ControlError, match="msgpack"):
        control_request(endpoint, {"cmd": object()}, timeout=0.2)


def test_ipc_endpoint_and_loopback_only(tmp_path: Path) -> None:
    path = tmp_path / "peer.ctl"
    srv = ControlServer(lambda req: {"ok": True, "echo": req["cmd"]}, f"ipc://{path}")
    srv.start()
    try:
        reply = control_request(srv.endpoint, {"cmd": "status"}, 2.0)
        assert reply == {"ok": True, "echo": "status"}
    finally:
        srv.stop()
    assert not path.exists()
    with pytest.raises(ValueError, match="loopback"):
        ControlServer(lambda req: req, "tcp://0.0.0.0:0")
