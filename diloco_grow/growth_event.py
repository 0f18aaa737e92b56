"""GrowthEvent: the value the swarm votes on, and the `--grow` schedule syntax.

Re-exported by diloco_grow.growth (import from there).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import msgpack

KINDS = ("experts", "depth")
MODES = ("interpose", "stack")
# Copy noise when the schedule names none. Width copies of an expert receive identical
# gradients, so without noise they never diverge and the extra experts are wasted
# compute: width defaults to a little noise. Depth copies sit at different places in the
# stack, get different gradients anyway, and stay exactly function-preserving at 0.
DEFAULT_ALPHA = {"experts": 0.01, "depth": 0.0}
_FIELDS = ("kind", "factor", "alpha", "seed", "mode", "zero_output")


@dataclass(frozen=True)
class GrowthEvent:
    """One growth step. Width ("experts"): E -> factor*E and top_k -> factor*top_k.
    Depth ("depth"): n_layers -> factor*n_layers, copies placed by `mode`."""

    kind: str
    factor: int
    # Noise std of each copy, relative to the std of its source tensor; None: the kind's
    # DEFAULT_ALPHA (resolved at construction, so to_dict() and hash() carry the number).
    alpha: float | None = None
    seed: int = 0  # seeds the noise generator; identical on every peer
    mode: str = "interpose"  # depth only: "interpose" (l1,l1',l2,l2') | "stack" (l1,l2,l1',l2')
    zero_output: bool = False  # depth only: zero the copies' output projections

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"growth kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 2:
            raise ValueError(f"growth factor must be an integer >= 2, got {self.factor!r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", DEFAULT_ALPHA[self.kind])
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"growth alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"growth alpha must be finite and >= 0, got {self.alpha!r}")
        # Normalise so GrowthEvent(alpha=0) and GrowthEvent(alpha=0.0) hash the same.
        object.__setattr__(self, "alpha", float(self.alpha))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"growth seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"growth seed must be in [0, 2**63), got {self.seed}")
        if self.mode not in MODES:
            raise ValueError(f"depth growth mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.zero_output, bool):
            raise ValueError(f"zero_output must be true or false, got {self.zero_output!r}")
        # Depth-only options on a width event would change its hash without changing what
        # it does, splitting the swarm's vote: reject them.
        if self.kind == "experts" and (self.zero_output or self.mode != "interpose"):
            raise ValueError("mode and zero_output apply to depth growth only")

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrowthEvent:
        if not isinstance(d, dict):
            raise ValueError(f"growth event must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_FIELDS), key=str)
        if unknown:
            raise ValueError(f"unknown growth event key(s) {unknown}; known: {list(_FIELDS)}")
        missing = [k for k in ("kind", "factor") if k not in d]
        if missing:
            raise ValueError(f"growth event is missing {missing}")
        return cls(**d)

    def hash(self) -> str:
        """sha256 hex of the canonical msgpack encoding (keys sorted, alpha as float64)."""
        canonical = dict(sorted(self.to_dict().items()))
        return hashlib.sha256(msgpack.packb(canonical, use_bin_type=True)).hexdigest()

    def describe(self, step: int | None = None) -> str:
        """Schedule syntax, e.g. 'depth:2:alpha=0.01:zero_output', or with a step
        'depth:2@40:alpha=0.01:zero_output' (what parse_schedule reads back)."""
        s = f"{self.kind}:{self.factor}" + ("" if step is None else f"@{step}")
        if self.alpha != DEFAULT_ALPHA[self.kind]:
            s += f":alpha={self.alpha!r}"
        if self.seed:
            s += f":seed={self.seed}"
        if self.kind == "depth" and self.mode != "interpose":
            s += f":mode={self.mode}"
        if self.zero_output:
            s += ":zero_output"
        return s


def growth_line(event: GrowthEvent, n_before: int, n_after: int, step: int) -> str:
    """The one line a peer, `simulate` and the demo print when a growth event commits,
    e.g. 'growth step=15 experts x2: params 262,976 -> 460,096 (alpha=0.01, seed=0)'."""
    opts = [f"alpha={event.alpha:g}", f"seed={event.seed}"]
    if event.kind == "depth":
        opts.append(f"mode={event.mode}")
        if event.zero_output:
            opts.append("zero_output")
    return (
        f"growth step={step} {event.kind} x{event.factor}: "
        f"params {n_before:,} -> {n_after:,} ({', '.join(opts)})"
    )


def _parse_item(item: str) -> tuple[int, GrowthEvent]:
    parts = item.split(":")
    if len(parts) < 2 or "@" not in parts[1]:
        raise ValueError(f"bad growth schedule item {item!r}: expected kind:factor@step[:opts]")
    factor_s, step_s = parts[1].split("@", 1)
    try:
        factor, step = int(factor_s), int(step_s)
    except ValueError:
        raise ValueError(
            f"bad growth schedule item {item!r}: factor and step must be ints"
        ) from None
    if step < 0:
        raise ValueError(f"bad growth schedule item {item!r}: step must be >= 0")
    kw: dict[str, Any] = {}
    for opt in parts[2:]:
        key, eq, val = opt.partition("=")
        key, val = key.strip(), val.strip()
        try:
            if key == "alpha" and eq:
                kw["alpha"] = float(val)
            elif key == "seed" and eq:
                kw["seed"] = int(val)
            elif key == "mode" and eq:
                kw["mode"] = val
            elif key in MODES and not eq:
                kw["mode"] = key
            elif key == "zero_output":
                if eq and val.lower() not in ("1", "0", "true", "false"):
                    raise ValueError(val)
                kw["zero_output"] = not eq or val.lower() in ("1", "true")
            else:
                raise KeyError(key)
        except (KeyError, ValueError):
            raise ValueError(
                f"bad growth schedule option {opt!r} in {item!r}; known: alpha=F, seed=N, "
                "mode=interpose|stack, zero_output"
            ) from None
    try:
        return step, GrowthEvent(kind=parts[0].strip(), factor=factor, **kw)
    except ValueError as e:
        raise ValueError(f"bad growth schedule item {item!r}: {e}") from None


def parse_schedule(s: str) -> list[tuple[int, GrowthEvent]]:
    """Parse "experts:2@20,depth:2@40:alpha=0.01:zero_output" -> [(step, event), ...].

    Items are kind:factor@outer_step followed by ':'-separated options. The result is
    sorted by step; events sharing a step keep their written order (applied in turn).
    """
    items = [it.strip() for it in s.split(",") if it.strip()]
    return sorted((_parse_item(it) for it in items), key=lambda se: se[0])
