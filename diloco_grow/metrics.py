"""Metrics: one JSON record per line, and a plot of validation loss vs tokens and bytes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends records to a JSONL file, flushing each so a crash loses at most one line."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a" if append else "w")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
    return out


def plot_runs(paths: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Validation loss against tokens (left) and bytes sent per worker (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, p in enumerate(paths):
        recs = [r for r in read_jsonl(p) if r.get("val_loss") is not None and "event" not in r]
        if not recs:
            continue
        label = labels[i] if labels and i < len(labels) else str(Path(p).parent.name or p)
        tokens = [r["tokens"] for r in recs]
        loss = [r["val_loss"] for r in recs]
        ax_t.plot(tokens, loss, label=label)
        sent = [r.get("bytes_sent_per_worker", 0) for r in recs]
        if any(b > 0 for b in sent):
            ax_b.plot([max(b, 1) for b in sent], loss, label=label)
        for r in read_jsonl(p):
            if "event" in r and r.get("tokens") is not None:
                ax_t.axvline(r["tokens"], color="grey", lw=0.6, ls="--")
    ax_t.set_xlabel("tokens (all workers)")
    ax_b.set_xlabel("bytes sent per worker")
    ax_b.set_xscale("log")
    for ax in (ax_t, ax_b):
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
