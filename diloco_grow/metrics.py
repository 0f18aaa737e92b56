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


def plot_runs(
    paths: list[str | Path], out: str | Path, labels: list[str] | None = None, x: str = "tokens"
) -> Path:
    """Validation loss against `x` (left: "tokens" or "step") and bytes sent per worker
    (right). Peers of one swarm share steps, not token counts, so the demo plots steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, p in enumerate(paths):
        # A peer's growth round carries its event and its val loss: keep the point.
        recs = [r for r in read_jsonl(p) if r.get("val_loss") is not None]
        if not recs:
            continue
        label = labels[i] if labels and i < len(labels) else str(Path(p).parent.name or p)
        ax_t.plot([r[x] for r in recs], [r["val_loss"] for r in recs], label=label)
        sent = [(r.get("bytes_sent_per_worker", 0), r["val_loss"]) for r in recs]
        sent = [(b, v) for b, v in sent if b > 0]  # a log axis has no place for 0 bytes
        if sent:
            ax_b.plot(*zip(*sent, strict=True), label=label)
    for at, label in growth_marks(paths, x):
        ax_t.axvline(at, color="tab:red", lw=0.8, ls="--")
        ax_t.annotate(
            label,
            xy=(at, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="tab:red",
        )
    ax_t.set_xlabel("tokens (all workers)" if x == "tokens" else "outer step")
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


def growth_marks(paths: list[str | Path], x: str = "tokens") -> list[tuple[float, str]]:
    """(x position, label) of each growth event in the metrics files, once per event:
    every peer of a swarm logs the same event at the same step."""
    marks: dict[tuple, str] = {}
    for p in paths:
        for r in read_jsonl(p):
            e = r.get("event")
            if not e or r.get(x) is None:
                continue
            label = f"{e['kind']} x{e['factor']}"
            if e.get("n_params_before") and e.get("n_params_after"):
                label += f"\n{e['n_params_before'] / 1e6:.2f}M→{e['n_params_after'] / 1e6:.2f}M"
            marks.setdefault((r[x], e.get("hash", label)), label)
    return [(at, label) for (at, _), label in sorted(marks.items(), key=lambda kv: kv[0][0])]


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
