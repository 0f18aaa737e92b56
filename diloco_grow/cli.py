"""`diloco-grow` command line: simulate, plot, peer, status, demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from diloco_grow.config import ConfigError, build_config


def fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Low-communication decentralized training of a growing Mixture-of-Experts LM."""


@main.command()
@click.option("--workers", "-m", default=4, show_default=True, help="Simulated workers (M).")
@click.option("--inner-steps", "-H", type=int, help="Inner AdamW steps per outer step.")
@click.option("--outer-steps", "-S", default=10, show_default=True, help="Outer steps to run.")
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), help="Model preset.")
@click.option("--config", type=click.Path(dir_okay=False), help="Run TOML file.")
@click.option("--compression", type=click.Choice(["int8", "int4", "bnb8", "fp16", "none"]))
@click.option("--outer-lr", type=float, help="Outer (Nesterov) learning rate.")
@click.option("--inner-lr", type=float, help="Inner AdamW peak learning rate.")
@click.option("--batch-size", type=int, help="Sequences per inner step per worker.")
@click.option("--data", type=click.Path(exists=True), help="Text file or folder (default: stdlib).")
@click.option("--data-mode", type=click.Choice(["iid", "non-iid"]))
@click.option("--seed", type=int, help="Random seed.")
@click.option("--grow", default="", help='Growth schedule, e.g. "experts:2@20,depth:2@40".')
@click.option("--baseline", type=click.Choice(["sync"]), help="Run synchronous data-parallel instead.")
@click.option("--out", default="runs/simulate", show_default=True, help="Output folder.")
@click.option("--checkpoint-every", default=0, help="Checkpoint every N outer steps (0: end only).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.safetensors.")
@click.option("--json", "as_json", is_flag=True, help="Print one final JSON line.")
def simulate(workers: int, inner_steps: int | None, outer_steps: int, preset: str | None,
             config: str | None, compression: str | None, outer_lr: float | None,
             inner_lr: float | None, batch_size: int | None, data: str | None,
             data_mode: str | None, seed: int | None, grow: str, baseline: str | None, out: str,
             checkpoint_every: int, resume: bool, as_json: bool) -> None:
    """Run M DiLoCo workers in one process (research, quick experiments)."""
    from diloco_grow.growth import parse_schedule
    from diloco_grow.simulate import SimSpec, simulate as run_sim, train_sync

    try:
        cfg = build_config(config, preset, {
            "inner.steps": inner_steps, "outer.compression": compression, "outer.lr": outer_lr,
            "inner.lr": inner_lr, "inner.batch_size": batch_size, "data.path": data,
            "data.mode": data_mode, "run.seed": seed})
        schedule = tuple(parse_schedule(grow)) if grow else ()
        if workers < 1 or outer_steps < 1:
            raise ConfigError("--workers and --outer-steps must be >= 1")
    except (ConfigError, ValueError) as e:
        fail(str(e))
    spec = SimSpec(workers=workers, outer_steps=outer_steps, out_dir=out, grow=schedule,
                   checkpoint_every=checkpoint_every, resume=resume,
                   progress=sys.stderr.isatty() and not as_json)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    try:
        summary = train_sync(cfg, spec) if baseline == "sync" else run_sim(cfg, spec)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    summary = {k: v for k, v in summary.items() if k != "params_hash"} | {
        "metrics": str(Path(out) / "metrics.jsonl")}
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(f"done: val_loss {summary['val_loss']:.4f} after {summary['outer_steps']} outer "
                   f"steps, {summary['tokens']} tokens, {summary['bytes_sent_per_worker']} bytes "
                   f"sent per worker; metrics in {summary['metrics']}")


@main.command()
@click.argument("metrics", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="loss.png", show_default=True, help="PNG to write.")
@click.option("--label", multiple=True, help="Legend label per file (in order).")
def plot(metrics: tuple[str, ...], out: str, label: tuple[str, ...]) -> None:
    """Plot validation loss vs tokens and vs bytes for one or more metrics.jsonl files."""
    from diloco_grow.metrics import plot_runs

    path = plot_runs(list(metrics), out, list(label) or None)
    click.echo(f"wrote {path}")
