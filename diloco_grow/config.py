"""Run configuration: small frozen dataclasses per component, loadable from TOML.

Every field is validated when the object is built, so a bad value fails at start-up
with a message naming the field, not deep inside training. One TOML file describes a
run: [model], [inner], [outer], [data] for training, [robust] for how a round combines
contributions (peers/robust.py owns that section), [swarm] for how a peer joins.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diloco_grow.model import PRESETS, ModelConfig, model_config_from_dict
from peers.config import RUN_RE, SwarmConfig
from peers.robust import RobustConfig

if TYPE_CHECKING:
    from diloco_grow.peer import PeerOptions


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


OUTER_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class InnerConfig:
    """The inner AdamW loop each worker runs between outer steps."""

    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    clip: float = 1.0
    warmup_steps: int = 50
    # "constant" after warmup suits open-ended swarms; "cosine" needs a known total.
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    batch_size: int = 16
    steps: int = 50  # H: inner steps per outer step
    rewarmup_steps: int = 10  # after growth the AdamW state is fresh and needs a ramp

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"inner.lr must be > 0, got {self.lr}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "inner betas must lie in [0, 1)")
        _check(self.weight_decay >= 0, "inner.weight_decay must be >= 0")
        _check(self.clip > 0, "inner.clip must be > 0")
        _check(self.warmup_steps >= 0, "inner.warmup_steps must be >= 0")
        _check(
            self.schedule in ("constant", "cosine"),
            f"inner.schedule must be 'constant' or 'cosine', got {self.schedule!r}",
        )
        _check(0 <= self.min_lr_ratio <= 1, "inner.min_lr_ratio must lie in [0, 1]")
        _check(self.batch_size >= 1, f"inner.batch_size must be >= 1, got {self.batch_size}")
        _check(self.steps >= 1, f"inner.steps (H) must be >= 1, got {self.steps}")
        _check(self.rewarmup_steps >= 0, "inner.rewarmup_steps must be >= 0")


@dataclass(frozen=True)
class OuterConfig:
    """The outer step on the global parameters and the codec it averages with."""

    # "sgd": momentum (Nesterov if `nesterov`; momentum 0 = plain averaging step);
    # "adam": Adam on the pseudo-gradient with β1 = momentum, β2 = beta2, ε = eps.
    optimizer: str = "sgd"
    lr: float = 0.7
    momentum: float = 0.6  # tuned (issue #10): 0.9 lags at tens to a hundred outer steps
    nesterov: bool = True  # sgd only
    beta2: float = 0.99  # adam only
    eps: float = 1e-8  # adam only
    warmup_steps: int = 0  # lr ramps linearly over the first N outer steps; 0 = off
    # sgd only: momentum ramps linearly from μ/N to μ over the first N outer steps; 0 = off.
    # Tuned (issue #10): early steps as plain averaging, later ones Nesterov.
    momentum_warmup_steps: int = 10
    compression: str = "int8"
    block_size: int = 256
    error_feedback: bool = True
    # β of the error-feedback accumulator, e <- β·e + Δ (compression/feedback.py); < 1 is
    # SparseLoCo's local momentum for sparse codecs, used with momentum 0. A worker's own
    # setting: it changes what the worker sends, not how θ_g is computed from the mean.
    error_feedback_decay: float = 1.0

    def __post_init__(self) -> None:
        from compression.codec import codec_names

        _check(
            self.optimizer in OUTER_OPTIMIZERS,
            f"outer.optimizer must be one of {list(OUTER_OPTIMIZERS)}, got {self.optimizer!r}",
        )
        # Finite, too: a checkpoint or a served state is validated through this class.
        _check(
            _is_num(self.lr) and math.isfinite(self.lr) and self.lr > 0,
            f"outer.lr must be a finite number > 0, got {self.lr!r}",
        )
        _check(
            _is_num(self.momentum) and 0 <= self.momentum < 1,
            f"outer.momentum must lie in [0, 1), got {self.momentum!r}",
        )
        _check(
            isinstance(self.nesterov, bool),
            f"outer.nesterov must be true or false, got {self.nesterov!r}",
        )
        _check(
            _is_num(self.beta2) and 0 <= self.beta2 < 1,
            f"outer.beta2 must lie in [0, 1), got {self.beta2!r}",
        )
        _check(
            _is_num(self.eps) and math.isfinite(self.eps) and self.eps > 0,
            f"outer.eps must be a finite number > 0, got {self.eps!r}",
        )
        _check(
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            f"outer.warmup_steps must be an integer >= 0 (0: off), got {self.warmup_steps!r}",
        )
        _check(
            _is_int(self.momentum_warmup_steps) and self.momentum_warmup_steps >= 0,
            "outer.momentum_warmup_steps must be an integer >= 0 (0: off), "
            f"got {self.momentum_warmup_steps!r}",
        )
        _check(
            _is_num(self.error_feedback_decay) and 0 < self.error_feedback_decay <= 1,
            f"outer.error_feedback_decay must lie in (0, 1], got {self.error_feedback_decay!r}",
        )
        _check(
            self.compression in codec_names(),
            f"outer.compression must be one of {codec_names()}, got {self.compression!r}",
        )
        _check(
            self.block_size >= 2 and self.block_size % 2 == 0,
            f"outer.block_size must be an even number >= 2, got {self.block_size}",
        )
        from compression.codec import reduced_name
        from compression.topk import K_OF, MAX_BLOCK

        for name in {self.compression, reduced_name(self.compression)} & set(K_OF):
            _check(
                K_OF[name] <= self.block_size <= MAX_BLOCK,
                f"outer.block_size must lie in [{K_OF[name]}, {MAX_BLOCK}] for {name} (a "
                f"position is one byte), got {self.block_size}",
            )


@dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are split among workers."""

    path: str | None = None  # None: the embedded corpus (the Python standard library)
    mode: str = "iid"  # "iid" or "non-iid" (each worker its own contiguous file range)
    val_fraction: float = 0.05
    val_batches: int = 8

    def __post_init__(self) -> None:
        _check(
            self.mode in ("iid", "non-iid"),
            f"data.mode must be 'iid' or 'non-iid', got {self.mode!r}",
        )
        _check(0 < self.val_fraction < 0.5, "data.val_fraction must lie in (0, 0.5)")
        _check(self.val_batches >= 1, "data.val_batches must be >= 1")


def _net_default(name: str) -> Any:
    """The network layer's default for a swarm setting: peers/config.py owns these, so
    the run file, the CLI and the swarm can never disagree (one default per setting)."""
    return next(f.default for f in dataclasses.fields(SwarmConfig) if f.name == name)


_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SwarmSection:
    """[swarm]: every `diloco-grow peer` option; a CLI flag, when given, wins.

    To add a setting: add a field here (with its check). If PeerOptions or SwarmConfig
    has a field of the same name, peer_options() carries it over; nothing else to wire.
    """

    run: str | None = None  # swarm name peers of one run share; None: the run file's, or diloco
    # Admission (peers/admission.py): a peer joins with the run file its owner wrote
    # (`run init`), plus, in an admitted run, its identity key (`keygen`) and the owner's
    # certificate for it (`admit`); or, explicitly, an open run that admits everyone.
    run_file: str | None = None
    key_file: str | None = None  # identity key (created if missing): a stable peer id
    cert_file: str | None = None
    open: bool = False
    join: tuple[str, ...] = ()  # multiaddrs of live peers (their `ready` lines)
    host: str = _net_default("host")
    port: int = _net_default("port")  # DHT (libp2p) port; 0 = any free port
    announce_host: str | None = _net_default("announce_host")  # public address behind NAT
    data_port: int = _net_default("data_port")  # zmq data-plane port; 0 = any free port
    target_tokens: int | None = None  # tokens per round for the swarm; None: fixed H steps
    slowdown: float = 1.0  # emulate a machine this many times slower (experiments)
    heartbeat_s: float = _net_default("heartbeat_s")
    matchmaking_s: float = _net_default("matchmaking_s")
    max_wait_s: float = _net_default("max_wait_s")
    phase_timeout_s: float = _net_default("phase_timeout_s")
    round_timeout_s: float = _net_default("round_timeout_s")
    min_peers: int = _net_default("min_peers")
    quorum: float = _net_default("quorum")
    grow: str = ""  # this peer's growth votes, schedule syntax ("experts:2@20")
    max_rounds: int | None = None  # leave after this many rounds (None: run until stopped)
    eval_every: int = 1  # validation loss every N rounds (0: never)
    out_dir: str = "runs/peer"
    checkpoint_dir: str | None = None
    device: str = "cpu"
    threads: int = 0  # torch threads; 0: sized to the cores (diloco_grow.threads)

    def __post_init__(self) -> None:
        if isinstance(self.join, str):  # `join = "/ip4/..."` in TOML: one address
            object.__setattr__(self, "join", (self.join,))
        if isinstance(self.join, list):
            object.__setattr__(self, "join", tuple(self.join))
        _check(
            self.run is None or (isinstance(self.run, str) and bool(RUN_RE.match(self.run))),
            f"swarm.run must match {RUN_RE.pattern}, got {self.run!r}",
        )
        for name in ("run_file", "key_file", "cert_file"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and bool(v)), f"swarm.{name} must be a path")
        _check(isinstance(self.open, bool), f"swarm.open must be true or false, got {self.open!r}")
        _check(
            isinstance(self.join, tuple)
            and all(isinstance(a, str) and a.startswith("/") for a in self.join),
            f"swarm.join must be multiaddrs like /ip4/1.2.3.4/tcp/4000/p2p/12D3Koo..., "
            f"got {self.join!r}",
        )
        _check(isinstance(self.host, str) and bool(self.host), "swarm.host must be an address")
        _check(
            self.announce_host is None
            or (isinstance(self.announce_host, str) and self.announce_host),
            f"swarm.announce_host must be an address, got {self.announce_host!r}",
        )
        for name in ("port", "data_port"):
            v = getattr(self, name)
            _check(_is_int(v) and 0 <= v < 65536, f"swarm.{name} must be in [0, 65535], got {v!r}")
        for name in ("heartbeat_s", "matchmaking_s", "phase_timeout_s", "round_timeout_s"):
            v = getattr(self, name)
            _check(_is_num(v) and v > 0, f"swarm.{name} must be > 0 seconds, got {v!r}")
        _check(
            _is_num(self.max_wait_s) and self.max_wait_s >= 0,
            f"swarm.max_wait_s must be >= 0 seconds, got {self.max_wait_s!r}",
        )
        _check(
            _is_num(self.slowdown) and 1 <= self.slowdown <= 1000,
            f"swarm.slowdown must lie in [1, 1000], got {self.slowdown!r}",
        )
        _check(
            self.target_tokens is None or (_is_int(self.target_tokens) and self.target_tokens >= 1),
            f"swarm.target_tokens must be an integer >= 1 (or unset), got {self.target_tokens!r}",
        )
        _check(
            _is_int(self.min_peers) and self.min_peers >= 1,
            f"swarm.min_peers must be an integer >= 1, got {self.min_peers!r}",
        )
        _check(
            _is_num(self.quorum) and 0 < self.quorum <= 1,
            f"swarm.quorum must lie in (0, 1], got {self.quorum!r}",
        )
        _check(
            self.max_rounds is None or (_is_int(self.max_rounds) and self.max_rounds >= 1),
            f"swarm.max_rounds must be an integer >= 1, got {self.max_rounds!r}",
        )
        _check(
            _is_int(self.eval_every) and self.eval_every >= 0,
            f"swarm.eval_every must be an integer >= 0, got {self.eval_every!r}",
        )
        _check(
            isinstance(self.device, str) and bool(_DEVICE_RE.match(self.device)),
            f"swarm.device must be cpu, cuda, cuda:N or mps, got {self.device!r}",
        )
        _check(
            _is_int(self.threads) and self.threads >= 0,
            f"swarm.threads must be an integer >= 0 (0: automatic), got {self.threads!r}",
        )
        _check(isinstance(self.out_dir, str) and bool(self.out_dir), "swarm.out_dir is empty")
        _check(
            self.checkpoint_dir is None or isinstance(self.checkpoint_dir, str),
            f"swarm.checkpoint_dir must be a path, got {self.checkpoint_dir!r}",
        )
        _check(
            isinstance(self.grow, str), f"swarm.grow must be a schedule string, got {self.grow!r}"
        )
        try:
            self.schedule()
        except ValueError as e:
            raise ConfigError(f"swarm.grow: {e}") from None

    def schedule(self) -> tuple:
        from diloco_grow.growth_event import parse_schedule

        return tuple(parse_schedule(self.grow)) if self.grow else ()

    def peer_options(self) -> PeerOptions:
        """The peer app's options. Fields named like a PeerOptions field go there; fields
        named like a SwarmConfig field that PeerOptions lacks ride in extra_swarm."""
        from diloco_grow.peer import PeerOptions

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["grow"] = self.schedule()
        own = {f.name for f in dataclasses.fields(PeerOptions)}
        net = {f.name for f in dataclasses.fields(SwarmConfig)}
        app_only = {"threads"}  # the process, not the peer: run_peer(threads=...)
        stray = sorted(set(values) - own - net - app_only)
        if stray:  # a field added here but wired nowhere: fail loudly, not silently
            raise ConfigError(f"swarm setting(s) {stray} have no place in PeerOptions")
        opts = {k: v for k, v in values.items() if k in own}
        extra = {k: v for k, v in values.items() if k not in own and k in net}
        return PeerOptions(**opts, extra_swarm=extra)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny"])
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    swarm: SwarmSection = field(default_factory=SwarmSection)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> RunConfig:
        """Copy with some fields of some sections replaced: replace(inner={"steps": 10})."""
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            if isinstance(value, dict):
                changes[name] = dataclasses.replace(getattr(self, name), **value)
            else:
                changes[name] = value
        return dataclasses.replace(self, **changes)


_SECTIONS = {
    "inner": InnerConfig,
    "outer": OuterConfig,
    "data": DataConfig,
    "robust": RobustConfig,
    "swarm": SwarmSection,
}


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _check(not unknown, f"unknown key(s) {unknown} in [{where}]; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as e:  # e.g. a string where a number belongs
        raise ConfigError(f"bad value in [{where}]: {e}") from None
    except ValueError as e:  # [robust] is validated by peers/robust.py, in its own words
        raise ConfigError(str(e)) from None


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts (TOML layout); `preset` picks a model preset."""
    top = {"model", "preset", "seed", *_SECTIONS}
    unknown = sorted(set(d) - top)
    _check(not unknown, f"unknown top-level key(s) {unknown}; known: {sorted(top)}")
    preset = d.get("preset", "tiny")
    _check(preset in PRESETS, f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    model_dict = {**dataclasses.asdict(PRESETS[preset]), **d.get("model", {})}
    try:
        model = model_config_from_dict(model_dict)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad [model] section: {e}") from None
    sections = {k: _section(cls, d.get(k, {}), k) for k, cls in _SECTIONS.items()}
    seed = d.get("seed", 0)
    _check(isinstance(seed, int) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    return RunConfig(model=model, seed=seed, **sections)


def load_config_dict(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    _check(p.is_file(), f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML run file; see README for the layout."""
    return config_from_dict(load_config_dict(path))


def build_config(
    config: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """TOML file, then `preset`, then "section.field" overrides (None values skipped);
    later ones win. "run.seed" sets a top-level key."""
    d = load_config_dict(config) if config else {}
    if preset:
        d["preset"] = preset
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, name = key.split(".")
        if section == "run":
            d[name] = value
        else:
            d.setdefault(section, {})[name] = value
    return config_from_dict(d)
