"""Run configuration: small frozen dataclasses per component, loadable from TOML.

Every field is validated when the object is built, so a bad value fails at start-up
with a message naming the field, not deep inside training.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diloco_grow.model import PRESETS, ModelConfig, model_config_from_dict


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


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
    """The outer Nesterov step on the global parameters and the codec it averages with."""

    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    compression: str = "int8"
    block_size: int = 256
    error_feedback: bool = True

    def __post_init__(self) -> None:
        from compression.codec import codec_names

        _check(self.lr > 0, f"outer.lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"outer.momentum must lie in [0, 1), got {self.momentum}")
        _check(
            self.compression in codec_names(),
            f"outer.compression must be one of {codec_names()}, got {self.compression!r}",
        )
        _check(
            self.block_size >= 2 and self.block_size % 2 == 0,
            f"outer.block_size must be an even number >= 2, got {self.block_size}",
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


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: PRESETS["tiny"])
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    data: DataConfig = field(default_factory=DataConfig)
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


_SECTIONS = {"inner": InnerConfig, "outer": OuterConfig, "data": DataConfig}


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _check(not unknown, f"unknown key(s) {unknown} in [{where}]; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as e:  # e.g. a string where a number belongs
        raise ConfigError(f"bad value in [{where}]: {e}") from None


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
