"""Fetching the swarm's θ_g: for a joiner, a peer that missed a round, or a diverged one.

The state to adopt is the one the majority line of the swarm holds (peers/lineage.py
names it: a source record with its θ_g hash). We download it from that source, or any live
peer holding the same (epoch, step, hash), and accept it only if the bytes hash to exactly
that θ_g: a server cannot hand us another state than the one the majority signed.
"""

from __future__ import annotations

import dataclasses
import logging

from diloco_grow import checkpoint as ckpt
from diloco_grow.model_config import ModelConfig
from diloco_grow.worker import GlobalState
from peers.state_transfer import StateTransferError, download_state

log = logging.getLogger("diloco_grow.state_sync")

GROWN_FIELDS = ("n_experts", "top_k", "n_layers")  # what growth events change


def check_arch(ours: ModelConfig, theirs: ModelConfig) -> None:
    """A downloaded state must be our run's model, possibly grown within our limits."""
    for f in dataclasses.fields(ours):
        if f.name not in GROWN_FIELDS and getattr(ours, f.name) != getattr(theirs, f.name):
            raise ckpt.CheckpointError(
                f"served model has {f.name}={getattr(theirs, f.name)!r}, this run "
                f"{getattr(ours, f.name)!r}: not our run's model"
            )


def holders(source: dict, peers: list[dict], me: str) -> list[dict]:
    """The source first, then every other live peer that holds its exact state."""
    claim = (source.get("arch_epoch"), source.get("step"), source.get("params_hash"))
    same = [
        p
        for p in peers
        if (p.get("arch_epoch"), p.get("step"), p.get("params_hash")) == claim
        and p.get("peer_id") not in (me, source.get("peer_id"))
    ]
    return [source, *same]


def fetch_state(
    candidates: list[dict], model: ModelConfig, timeout: float = 60.0
) -> tuple[GlobalState, dict] | None:
    """The first candidate's state whose θ_g hashes to the claimed `params_hash` (the state
    the majority line confirmed: lineage.target) and whose architecture is our run's."""
    for p in candidates:
        if not p.get("state_endpoint"):
            continue
        try:
            _, blob = download_state(
                p["state_endpoint"],
                p.get("state_curve_key"),
                timeout=timeout,
                max_bytes=ckpt.max_state_bytes(model),
            )
            g = ckpt.global_from(*ckpt.unpack_state(blob))
            check_arch(model, g.model_cfg)
        except (StateTransferError, ckpt.CheckpointError) as e:
            log.warning("state download from %s failed: %s", p.get("peer_id"), e)
            continue
        if g.hash() != p.get("params_hash") or g.step != p.get("step"):
            log.warning(
                "state from %s is step %d θ_g %s, not the claimed step %s θ_g %s; ignored",
                p.get("peer_id"),
                g.step,
                g.hash(),
                p.get("step"),
                p.get("params_hash"),
            )
            continue
        return g, p
    return None
