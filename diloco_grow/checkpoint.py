"""Checkpoints: safetensors tensors + JSON metadata, written atomically.

The same encoding serves state transfer to joining peers, so nothing here is ever
unpickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from diloco_grow.model import model_config_from_dict
from diloco_grow.outer import make_outer

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or state blob is unreadable, from another version, or inconsistent."""


def pack_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    meta = {"format_version": FORMAT_VERSION, **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={"meta": json.dumps(meta)})


def unpack_state(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["meta"])
    except Exception as e:  # safetensors raises several types on garbage
        raise CheckpointError(f"not a diloco-grow state blob: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"state format version {meta.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; upgrade diloco-grow on both ends"
        )
    return tensors, meta


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename: a crash never leaves a
    half-written checkpoint under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the shared (global) part: θ_g, outer optimizer state, arch, step, growth history --


def global_tensors_meta(g: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"theta_g": g.theta}
    tensors.update({f"outer.{k}": v for k, v in g.outer.state_dict().items()})
    meta = {
        "model_cfg": dataclasses.asdict(g.model_cfg),
        "step": g.step,
        "arch_epoch": g.arch_epoch,
        "history": g.history,
        "outer": {"optimizer": g.outer.kind, **g.outer.hparams()},
    }
    return tensors, meta


def global_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Any:
    from diloco_grow.config import OuterConfig
    from diloco_grow.worker import GlobalState

    try:
        cfg = model_config_from_dict(meta["model_cfg"])
        # The outer hyperparameters pass the [outer] section's own checks (a served state
        # is untrusted). A meta written before the optimizer choice has none of the newer
        # keys: it is sgd, and the missing fields take their defaults.
        o = dict(meta["outer"])
        # Likewise a meta written before the momentum ramp: that run took its steps without
        # one, so it resumes without one (not with today's default).
        o.setdefault("momentum_warmup_steps", 0)
        keys = ("optimizer", "lr", "momentum", "nesterov", "beta2", "eps", "warmup_steps",
                "momentum_warmup_steps")
        outer = make_outer(OuterConfig(**{k: o[k] for k in keys if k in o}))
        outer.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("outer.")})
        theta = tensors["theta_g"].float()
        g = GlobalState(
            cfg, theta, outer, int(meta["step"]), int(meta["arch_epoch"]), list(meta["history"])
        )
    except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"state is missing or has a bad field: {e}") from None
    n = sum(p.numel() for p in _shapes(cfg))
    if theta.dim() != 1 or theta.numel() != n:
        raise CheckpointError(f"theta_g has {theta.numel()} elements; architecture needs {n}")
    if not torch.isfinite(theta).all():
        raise CheckpointError("theta_g contains NaN or Inf")
    for name, buf in outer.buffers().items():
        # Served by another peer: a buffer of the wrong shape, with NaN, or a negative
        # second moment (√ of it) would poison every later outer step of ours without
        # changing θ_g's hash now.
        if buf.shape != theta.shape or not torch.isfinite(buf).all():
            raise CheckpointError(
                f"outer {name} has shape {tuple(buf.shape)} (θ_g: {tuple(theta.shape)}) "
                "or is not finite"
            )
        if name == "second_moment" and (buf < 0).any():
            raise CheckpointError("outer second_moment has negative entries")
    return g


def max_params(cfg: Any) -> int:
    """θ_g's length at the largest architecture growth can reach from `cfg`."""
    import dataclasses as dc

    top = dc.replace(
        cfg,
        n_experts=cfg.max_experts,
        top_k=min(cfg.max_experts, cfg.top_k * (cfg.max_experts // cfg.n_experts)),
        n_layers=cfg.max_layers,
    )
    return sum(p.numel() for p in _shapes(top))


def max_state_bytes(cfg: Any) -> int:
    """An upper bound on a state blob for this run: θ_g and the outer optimizer's buffers
    (at most two: Adam's moments) in fp32 at the largest architecture, plus room for the
    header. A joiner takes its download limit from its own config, never from what the
    server says."""
    return 3 * 4 * max_params(cfg) + (16 << 20)


def _shapes(cfg: Any) -> list[torch.Tensor]:
    from diloco_grow.model import MoETransformer

    with torch.device("meta"):
        return list(MoETransformer(cfg).parameters())


# --- a worker's private part: AdamW, error feedback, data position --------------------


def worker_tensors_meta(w: Any, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = w.inner.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, st in sd["opt"]["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    if w.feedback is not None:
        tensors.update({f"{prefix}ef.{k}": v for k, v in w.feedback.state_dict().items()})
    meta = {
        "param_groups": sd["opt"]["param_groups"],
        "step": sd["step"],
        "warmup_from": sd["warmup_from"],
        "data_position": sd["data_position"],
        "tokens_since_sync": w.tokens_since_sync,
    }
    return tensors, meta


def load_worker(
    w: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith(prefix + "opt."):
            idx, name = k[len(prefix) + 4 :].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    opt = {"state": state, "param_groups": meta["param_groups"]}
    w.inner.load_state_dict(
        {
            "opt": opt,
            "step": meta["step"],
            "warmup_from": meta["warmup_from"],
            "data_position": meta["data_position"],
        }
    )
    if w.feedback is not None:
        w.feedback.load_state_dict(
            {k[len(prefix) + 3 :]: v for k, v in tensors.items() if k.startswith(prefix + "ef.")}
        )
    w.tokens_since_sync = int(meta["tokens_since_sync"])


def save_checkpoint(path: str | Path, g: Any, workers: list[Any], extra: dict[str, Any]) -> None:
    tensors, meta = global_tensors_meta(g)
    meta["workers"] = []
    for i, w in enumerate(workers):
        t, m = worker_tensors_meta(w, f"w{i}.")
        tensors.update(t)
        meta["workers"].append(m)
    meta["extra"] = extra
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_write(path, pack_state(tensors, meta))


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(p)!r}")
    return unpack_state(p.read_bytes())


def restore_workers(
    workers: list[Any], tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    if len(meta["workers"]) != len(workers):
        raise CheckpointError(
            f"checkpoint has {len(meta['workers'])} workers, run has {len(workers)}"
        )
    for i, (w, m) in enumerate(zip(workers, meta["workers"], strict=True)):
        load_worker(w, tensors, m, f"w{i}.")
    torch.set_rng_state(tensors["rng.torch"])


# --- the trained model, for generate and export --------------------------------------

CHECKPOINT_NAMES = ("checkpoint.safetensors", "peer.safetensors")  # simulate, peer


def load_trained_model(path: str | Path) -> tuple[Any, Any]:
    """(model, global state) from a checkpoint as `simulate` or `peer` write it, or from
    the folder holding one. The model carries θ_g, the parameters the swarm agreed on,
    not any worker's local copy; it is in eval mode, on the CPU."""
    from diloco_grow.model import MoETransformer
    from diloco_grow.outer import assign_flat

    p = Path(path)
    if p.is_dir():
        found = [p / n for n in CHECKPOINT_NAMES if (p / n).is_file()]
        if not found:
            raise CheckpointError(
                f"no {' or '.join(CHECKPOINT_NAMES)} in folder {str(p)!r} (simulate writes "
                "OUT/checkpoint.safetensors, peer writes CHECKPOINT_DIR/peer.safetensors)"
            )
        p = found[0]
    g = global_from(*read_checkpoint(p))
    model = MoETransformer(g.model_cfg)
    assign_flat(model, g.theta)
    return model.eval(), g
