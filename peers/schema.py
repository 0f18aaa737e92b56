"""Typed accessors for untrusted dicts (DHT records and network message headers).

Everything that arrives from another peer is a msgpack map that might be hostile. Instead of
trusting `d["step"]` we read every field through these helpers, which check the type, the
range and the size, and raise `Malformed` with a message that names the field. Callers catch
`Malformed`, log one line and drop the input.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack

from peers.errors import Malformed

MAX_STR = 256
MAX_VOTE_BYTES = 4096  # a growth proposal is a handful of scalars; anything larger is abuse
MAX_INT = 1 << 62
# zmq endpoints we are willing to connect to: plain tcp host:port, nothing else (no ipc/inproc).
ENDPOINT_RE = re.compile(r"^tcp://[A-Za-z0-9.\-\[\]:]{1,200}:[0-9]{1,5}$")
Z85_KEY_RE = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")
HEX_RE = re.compile(r"^[0-9a-f]{1,128}$")


def req_str(d: dict, key: str, max_len: int = MAX_STR, pattern: re.Pattern | None = None) -> str:
    v = d.get(key)
    if not isinstance(v, str) or len(v) > max_len:
        raise Malformed(f"field {key!r}: expected str of <= {max_len} chars, got {_brief(v)}")
    if pattern is not None and not pattern.match(v):
        raise Malformed(f"field {key!r}: {v[:60]!r} does not match the expected format")
    return v


def req_int(d: dict, key: str, lo: int = 0, hi: int = MAX_INT) -> int:
    v = d.get(key)
    # bool is an int subclass; a True where a step number belongs is a bug or an attack.
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise Malformed(f"field {key!r}: expected int in [{lo}, {hi}], got {_brief(v)}")
    return v


def req_float(d: dict, key: str, lo: float = 0.0, hi: float = 1e30) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Malformed(f"field {key!r}: expected a number, got {_brief(v)}")
    v = float(v)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise Malformed(f"field {key!r}: {v} not finite or outside [{lo}, {hi}]")
    return v


def req_hex(d: dict, key: str, max_len: int = 128) -> str:
    return req_str(d, key, max_len, HEX_RE)


def req_endpoint(d: dict, key: str) -> str:
    return req_str(d, key, 220, ENDPOINT_RE)


def req_curve_key(d: dict, key: str) -> str:
    return req_str(d, key, 40, Z85_KEY_RE)


def opt_vote(d: dict, key: str = "vote") -> dict | None:
    """A growth vote: None or a small dict of msgpack scalars/lists/dicts (opaque to peers/)."""
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise Malformed(f"field {key!r}: expected dict or None, got {_brief(v)}")
    try:
        size = len(canonical_bytes(v))
    except (TypeError, ValueError) as e:
        raise Malformed(f"field {key!r}: not canonically serialisable ({e})") from None
    if size > MAX_VOTE_BYTES:
        raise Malformed(f"field {key!r}: {size} bytes > {MAX_VOTE_BYTES}")
    return v


def opt_info(d: dict, key: str = "info", max_items: int = 64) -> dict[str, Any]:
    """App progress info: flat str -> scalar map (shown by `status`, never acted upon)."""
    v = d.get(key, {})
    if not isinstance(v, dict) or len(v) > max_items:
        raise Malformed(f"field {key!r}: expected a dict of <= {max_items} items")
    for k, x in v.items():
        if not isinstance(k, str) or len(k) > 64:
            raise Malformed(f"field {key!r}: bad key {_brief(k)}")
        if x is not None and not isinstance(x, (bool, int, float, str)):
            raise Malformed(f"field {key!r}.{k}: expected a scalar, got {_brief(x)}")
        if isinstance(x, str) and len(x) > MAX_STR:
            raise Malformed(f"field {key!r}.{k}: string too long")
    return dict(v)


def canonical_bytes(obj: Any) -> bytes:
    """Deterministic msgpack: dict keys sorted recursively, so equal dicts hash equally."""
    return msgpack.packb(_canonical(obj, 0), use_bin_type=True)


def _canonical(obj: Any, depth: int) -> Any:
    if depth > 8:
        raise ValueError("nested too deeply")
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ValueError("dict keys must be str")
        # msgpack keeps insertion order, so inserting sorted keys gives one byte string.
        return {k: _canonical(obj[k], depth + 1) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(x, depth + 1) for x in obj]
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("non-finite float")
        return obj
    raise TypeError(f"unsupported type {type(obj).__name__}")


def _brief(v: object) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r[:40]}{'...' if len(r) > 40 else ''}"
