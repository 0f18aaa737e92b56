"""Local control channel of one peer: `status` queries and a graceful `leave`.

The peer app passes a handler (dict -> dict); ControlServer answers msgpack requests on a
REP socket from a background thread. The endpoint is local only (ipc:// or a loopback
tcp://) because anyone who can reach it can make the peer leave. control_request() is the
matching client: one fresh REQ socket per request, so a timed-out request can never wedge
the REQ/REP lockstep for the next one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import zmq

from compression.wire import WireError, pack_message, unpack_message

log = logging.getLogger(__name__)

MAX_CONTROL_BYTES = 1 << 20  # control messages are small; bigger ones are not ours
_POLL_MS = 50  # how often the server thread looks at its stop flag
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class ControlError(RuntimeError):
    """control_request failed: timeout, unreachable endpoint or a garbled reply."""


def _check_local(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        return
    if endpoint.startswith("tcp://") and endpoint[6:].rsplit(":", 1)[0] in _LOOPBACK:
        return
    raise ValueError(f"control endpoint must be ipc:// or loopback tcp://, got {endpoint!r}")


class ControlServer:
    """Answers {"cmd": ...} requests with handler(request); never dies on a bad request."""

    def __init__(
        self, handler: Callable[[dict], dict], endpoint: str = "tcp://127.0.0.1:0"
    ) -> None:
        _check_local(endpoint)
        self.handler = handler
        self.endpoint = endpoint
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Bind in the caller's thread so errors surface here and .endpoint is final on
        # return; afterwards only the server thread touches the socket.
        sock = zmq.Context.instance().socket(zmq.REP)
        sock.linger = 0
        sock.maxmsgsize = MAX_CONTROL_BYTES
        bind_to = self.endpoint
        if bind_to.startswith("tcp://") and bind_to.endswith(":0"):
            bind_to = bind_to[:-1] + "*"  # libzmq's spelling of "any free port"
        try:
            sock.bind(bind_to)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.endpoint = sock.last_endpoint.decode()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._serve, args=(sock,), name="control-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self.endpoint.startswith("ipc://"):
            # libzmq normally unlinks its ipc file on close; make sure no stale path stays
            # behind to confuse the next peer that binds the same name.
            try:
                os.unlink(self.endpoint[len("ipc://") :])
            except OSError:
                pass

    def _serve(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                frames = sock.recv_multipart()
                # REP must answer every request it received, even garbage, or it wedges.
                reply = self._reply(frames)
                try:
                    sock.send(reply, flags=zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("control: client gone, reply dropped")
        except zmq.ZMQError as e:
            log.error("control server stopped on socket error: %s", e)
        finally:
            sock.close(linger=0)

    def _reply(self, frames: list[bytes]) -> bytes:
        if len(frames) != 1:
            log.warning("control: dropped request with %d frames", len(frames))
            return _error(f"expected 1 frame, got {len(frames)}")
        try:
            req = unpack_message(frames[0], max_bytes=MAX_CONTROL_BYTES)
        except WireError as e:
            log.warning("control: malformed request: %s", e)
            return _error(f"malformed request: {e}")
        if not isinstance(req.get("cmd"), str):
            return _error("request needs a string 'cmd'")
        try:
            out = self.handler(req)
        except Exception as e:  # a handler bug answers this request, not the whole peer
            log.exception("control: handler failed on %r", req.get("cmd"))
            return _error(f"{type(e).__name__}: {e}")
        if not isinstance(out, dict):
            return _error(f"handler returned {type(out).__name__}, not a dict")
        try:
            return pack_message(out)
        except (WireError, TypeError, ValueError) as e:
            log.error("control: reply to %r is not msgpack-able: %s", req.get("cmd"), e)
            return _error(f"reply not serializable: {e}")


def _error(message: str) -> bytes:
    return pack_message({"ok": False, "error": message})


def control_request(endpoint: str, msg: dict, timeout: float) -> dict:
    """Send msg (e.g. {"cmd": "status"}) and return the reply dict.

    Raises ControlError on timeout, an unusable endpoint or a reply that is not a msgpack
    map; an {"ok": False, ...} reply is returned as is (the server did answer).
    """
    timeout_ms = max(1, int(timeout * 1000))
    try:
        payload = pack_message(msg)
    except (WireError, TypeError, ValueError) as e:
        raise ControlError(f"request is not msgpack-able: {e}") from e
    sock = zmq.Context.instance().socket(zmq.REQ)
    try:
        sock.linger = 0
        sock.maxmsgsize = MAX_CONTROL_BYTES
        sock.sndtimeo = sock.rcvtimeo = timeout_ms
        sock.connect(endpoint)
        sock.send(payload)
        data = sock.recv()
    except zmq.Again:
        raise ControlError(f"no reply from {endpoint} within {timeout:.3g}s") from None
    except zmq.ZMQError as e:
        raise ControlError(f"control request to {endpoint} failed: {e}") from e
    finally:
        sock.close(linger=0)
    try:
        return unpack_message(data, max_bytes=MAX_CONTROL_BYTES)
    except WireError as e:
        raise ControlError(f"garbled reply from {endpoint}: {e}") from e
