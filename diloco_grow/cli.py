"""`diloco-grow` command line: simulate, plot, peer, status, demo; run init, keygen, admit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from compression.codec import codec_names
from diloco_grow.config import ConfigError, SwarmSection, build_config

THREADS_HELP = (
    "torch intra-op threads; 0: this process's cores divided by its workers "
    "(or OMP_NUM_THREADS if set)."
)


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
@click.option("--compression", type=click.Choice(codec_names()))
@click.option("--outer-lr", type=float, help="Outer learning rate (default: tuned, see README).")
@click.option("--outer-momentum", type=float, help="Outer momentum (adam: beta1).")
@click.option("--outer-optimizer", type=click.Choice(["sgd", "adam"]),
              help="sgd: Nesterov (momentum 0: FedAvg-style); adam: outer Adam.")
@click.option("--inner-lr", type=float, help="Inner AdamW peak learning rate.")
@click.option("--batch-size", type=int, help="Sequences per inner step per worker.")
@click.option("--data", type=click.Path(exists=True), help="Text file or folder (default: stdlib).")
@click.option("--data-mode", type=click.Choice(["iid", "non-iid"]))
@click.option("--seed", type=int, help="Random seed.")
@click.option("--grow", default="", help='Growth schedule, e.g. "experts:2@20,depth:2@40".')
@click.option(
    "--baseline", type=click.Choice(["sync"]), help="Run synchronous data-parallel instead."
)
@click.option("--out", default="runs/simulate", show_default=True, help="Output folder.")
@click.option("--checkpoint-every", default=0, help="Checkpoint every N outer steps (0: end only).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.safetensors.")
@click.option("--json", "as_json", is_flag=True, help="Print one final JSON line.")
@click.option("--threads", default=0, show_default=True, help=THREADS_HELP)
def simulate(
    workers: int,
    inner_steps: int | None,
    outer_steps: int,
    preset: str | None,
    config: str | None,
    compression: str | None,
    outer_lr: float | None,
    outer_momentum: float | None,
    outer_optimizer: str | None,
    inner_lr: float | None,
    batch_size: int | None,
    data: str | None,
    data_mode: str | None,
    seed: int | None,
    grow: str,
    baseline: str | None,
    out: str,
    checkpoint_every: int,
    resume: bool,
    as_json: bool,
    threads: int,
) -> None:
    """Run M DiLoCo workers in one process (research, quick experiments)."""
    from diloco_grow.growth import parse_schedule
    from diloco_grow.simulate import SimSpec, train_sync
    from diloco_grow.simulate import simulate as run_sim
    from diloco_grow.threads import set_threads

    try:
        cfg = build_config(
            config,
            preset,
            {
                "inner.steps": inner_steps,
                "outer.compression": compression,
                "outer.lr": outer_lr,
                "outer.momentum": outer_momentum,
                "outer.optimizer": outer_optimizer,
                "inner.lr": inner_lr,
                "inner.batch_size": batch_size,
                "data.path": data,
                "data.mode": data_mode,
                "run.seed": seed,
            },
        )
        schedule = tuple(parse_schedule(grow)) if grow else ()
        if workers < 1 or outer_steps < 1:
            raise ConfigError("--workers and --outer-steps must be >= 1")
        n_threads = set_threads(threads, workers)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    click.echo(f"torch threads: {n_threads} for {workers} worker(s) (--threads)", err=True)
    spec = SimSpec(
        workers=workers,
        outer_steps=outer_steps,
        out_dir=out,
        grow=schedule,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=sys.stderr.isatty() and not as_json,
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    try:
        summary = train_sync(cfg, spec) if baseline == "sync" else run_sim(cfg, spec)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    summary = {k: v for k, v in summary.items() if k != "params_hash"} | {
        "metrics": str(Path(out) / "metrics.jsonl")
    }
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    else:
        click.echo(
            f"done: val_loss {summary['val_loss']:.4f} after {summary['outer_steps']} outer "
            f"steps, {summary['tokens']} tokens, {summary['bytes_sent_per_worker']} bytes "
            f"sent per worker; metrics in {summary['metrics']}"
        )


@main.command()
@click.argument("metrics", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="loss.png", show_default=True, help="PNG to write.")
@click.option("--label", multiple=True, help="Legend label per file (in order).")
def plot(metrics: tuple[str, ...], out: str, label: tuple[str, ...]) -> None:
    """Plot validation loss vs tokens and vs bytes for one or more metrics.jsonl files."""
    from diloco_grow.metrics import plot_runs

    path = plot_runs(list(metrics), out, list(label) or None)
    click.echo(f"wrote {path}")


def _swarm_opt(flag: str, help: str, name: str | None = None, **kw: Any) -> Any:
    """A `peer` flag backed by the [swarm] field of the same name. It has no click default,
    so an absent flag does not override the run file; its help shows the one default."""
    name = name or flag.lstrip("-").replace("-", "_")
    default = getattr(SwarmSection(), name)
    if isinstance(default, float):
        default = f"{default:g}"
    shown = f"[default: {default}]" if default not in (None, (), "") else ""
    return click.option(flag, name, default=None, help=f"{help} {shown}".strip(), **kw)


RUN_FILE_HELP = "The run's file from its owner (`run init`): run name, owner key, mode."
OPEN_HELP = "Public run without a run file: every peer is admitted."


@main.command()
@_swarm_opt("--run", "Run (swarm) name [default: the run file's, else diloco].")
@_swarm_opt("--run-file", RUN_FILE_HELP, type=click.Path(dir_okay=False, exists=True))
@_swarm_opt(
    "--key",
    "This peer's identity key file (created if missing): a stable peer id.",
    name="key_file",
    type=click.Path(dir_okay=False),
)
@_swarm_opt(
    "--cert",
    "The owner's certificate for this peer (`admit`); admitted runs.",
    name="cert_file",
    type=click.Path(dir_okay=False, exists=True),
)
@_swarm_opt("--open", OPEN_HELP, is_flag=True)
@_swarm_opt("--join", "Multiaddr of a live peer (repeatable).", multiple=True)
@_swarm_opt("--host", "Interface to listen on.")
@_swarm_opt("--port", "DHT port (0: any free port).", type=int)
@_swarm_opt("--announce-host", "Public address to announce (behind NAT / in a container).")
@_swarm_opt("--data-port", "zmq data-plane port (0: any free port).", type=int)
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]), help="Model preset.")
@click.option("--config", type=click.Path(dir_okay=False), help="Run TOML file.")
@click.option("--data", type=click.Path(exists=True), help="Text file or folder (default: stdlib).")
@click.option("--inner-steps", "-H", type=int, help="Inner AdamW steps per round.")
@click.option("--compression", type=click.Choice(codec_names()))
@_swarm_opt("--checkpoint-dir", "Checkpoint folder.", type=click.Path(file_okay=False))
@_swarm_opt("--out-dir", "Metrics folder.")
@_swarm_opt("--device", "cpu or cuda.")
@_swarm_opt("--threads", THREADS_HELP, type=int)
@_swarm_opt("--grow", 'Growth votes, e.g. "experts:2@20" (kind:factor@step).')
@_swarm_opt("--max-rounds", "Leave after this many rounds.", type=int)
@_swarm_opt(
    "--target-tokens",
    "Tokens per round for the whole swarm: each peer trains until the live peers together "
    "reached them (fast peers do more steps). Unset: fixed H steps per peer.",
    type=int,
)
@_swarm_opt("--slowdown", "Emulate a machine this many times slower (experiments).", type=float)
@_swarm_opt("--heartbeat-s", "Progress heartbeat (s); silent for two beats = dead.", type=float)
@_swarm_opt("--matchmaking-s", "Grace for announcements once the swarm is ready (s).", type=float)
@_swarm_opt(
    "--max-wait-s", "Cap on the wait for stragglers, from when this peer is ready (s).", type=float
)
@_swarm_opt("--phase-timeout-s", "Abort a round silent this long (s).", type=float)
@_swarm_opt("--round-timeout-s", "Give up a round after (s).", type=float)
@_swarm_opt("--min-peers", "Fewest members to average and to commit growth.", type=int)
@_swarm_opt("--quorum", "Fraction of a round's members that must vote for growth.", type=float)
@_swarm_opt("--eval-every", "Validation loss every N rounds (0: never).", type=int)
@click.option("--seed", type=int, help="Seed of the initial θ_g (same on every peer).")
def peer(
    join: tuple[str, ...],
    preset: str | None,
    config: str | None,
    data: str | None,
    inner_steps: int | None,
    compression: str | None,
    seed: int | None,
    **swarm: Any,
) -> None:
    """Run one peer of a swarm; prints `ready <multiaddr>` once others can join it.

    A private run needs --run-file, --key and --cert (see `run init`, `keygen`, `admit`);
    a public one --open. Every swarm flag can also come from the [swarm] section of
    --config; a flag wins."""
    import logging

    from diloco_grow.peer import run_peer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    swarm["join"] = join or None  # click gives () for an absent repeatable flag
    try:
        cfg = build_config(
            config,
            preset,
            {
                "inner.steps": inner_steps,
                "data.path": data,
                "outer.compression": compression,
                "run.seed": seed,
                **{f"swarm.{k}": v for k, v in swarm.items()},
            },
        )
        opts = cfg.swarm.peer_options()
        opts.swarm_config()  # admission files: fail here, not after loading the data
        if opts.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "--device cuda but torch sees no GPU; install a CUDA build "
                    "(make install TORCH_SPEC=...) or use --device cpu"
                )
    except (ConfigError, ValueError) as e:
        fail(str(e))
    run_peer(cfg, opts, threads=cfg.swarm.threads)


@main.command()
@click.argument("ckpt", type=click.Path(exists=True))
@click.option("--prompt", "-p", default="\n", show_default=True, help="Text to continue.")
@click.option("--max-new-tokens", "-n", default=256, show_default=True, help="Tokens (bytes).")
@click.option("--temperature", "-t", default=0.8, show_default=True, help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, help="Sample from the k likeliest (0: all).")
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--threads", default=0, show_default=True, help=THREADS_HELP)
def generate(
    ckpt: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    threads: int,
) -> None:
    """Continue PROMPT with the model in checkpoint CKPT, streaming text as it comes.

    CKPT is a file `simulate` or `peer` wrote (OUT/checkpoint.safetensors,
    CHECKPOINT_DIR/peer.safetensors) or the folder holding it. Tokens are bytes; the
    model sees at most its context (seq_len) of them, the newest ones."""
    import codecs
    import itertools
    import time

    from diloco_grow.checkpoint import CheckpointError, load_trained_model
    from diloco_grow.generate import generate_tokens
    from diloco_grow.threads import set_threads

    try:
        set_threads(threads)
        model, _ = load_trained_model(ckpt)
        tokens = generate_tokens(
            model, prompt.encode(), max_new_tokens, temperature, top_k or None, seed
        )
        first = next(tokens, None)  # argument errors surface here, before any output
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    out = sys.stdout
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out.write(prompt)
    t0, n = time.perf_counter(), 0
    for tok in itertools.chain([] if first is None else [first], tokens):
        out.write(decoder.decode(bytes([tok])))
        out.flush()
        n += 1
    out.write(decoder.decode(b"", final=True) + "\n")
    dt = time.perf_counter() - t0
    click.echo(f"{n} tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tokens/s)", err=True)


@main.command()
@click.argument("ckpt", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True)
def export(ckpt: str, out: str, fmt: str) -> None:
    """Write checkpoint CKPT as a Hugging Face model folder OUT (safetensors, config.json,
    byte-level tokenizer): MixtralForCausalLM, or Qwen2MoeForCausalLM with a shared
    expert. Load it with AutoModelForCausalLM.from_pretrained(OUT)."""
    from diloco_grow.checkpoint import CheckpointError
    from diloco_grow.export import export_hf

    try:
        summary = export_hf(ckpt, out)
    except CheckpointError as e:
        fail(str(e))
    click.echo(json.dumps(summary, sort_keys=True))


@main.command()
@click.option("--join", multiple=True, required=True, help="Multiaddr of a live peer.")
@click.option("--run-file", type=click.Path(dir_okay=False, exists=True), help=RUN_FILE_HELP)
@click.option("--open", "open_run", is_flag=True, help="A public run (no run file).")
@click.option("--run", "run_name", help="Run (swarm) name [default: the run file's, else diloco].")
@click.option("--json", "as_json", is_flag=True, help='Print {"peers": [...]} as JSON.')
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the DHT.")
def status(
    join: tuple[str, ...],
    run_file: str | None,
    open_run: bool,
    run_name: str | None,
    as_json: bool,
    timeout: float,
) -> None:
    """Show live peers of a run: step, arch epoch, θ_g hash, loss, speed, bytes.

    In an admitted run (--run-file) only peers the owner admitted are listed."""
    from peers.admission import Admission, RunFile
    from peers.observer import read_progress

    if run_file is None and not open_run:
        fail(
            "status needs the run's file: pass --run-file RUN.json (from the run's owner), "
            "or --open for a public run"
        )
    try:
        if run_file is not None:
            policy = RunFile.load(run_file).admission()
            if run_name not in (None, policy.run):
                raise ValueError(f"the run file {run_file} is for run {policy.run!r}")
        else:
            policy = Admission(run_name or "diloco")
    except ValueError as e:
        fail(str(e))
    run_name = policy.run
    try:
        peers = read_progress(run_name, list(join), timeout=timeout, admission=policy)
    except Exception as e:
        fail(f"could not read the swarm's DHT via {list(join)}: {e}")
    fields = [
        "peer_id",
        "step",
        "arch_epoch",
        "params_hash",
        "loss",
        "val_loss",
        "tokens_per_s",
        "bytes_sent",
    ]
    rows = [
        {k: p.get(k) for k in fields} for p in sorted(peers, key=lambda p: str(p.get("peer_id")))
    ]
    if as_json:
        click.echo(json.dumps({"peers": rows}, sort_keys=True))
        return
    click.echo(f"{len(rows)} live peer(s) in run {run_name!r}")
    click.echo(
        f"{'peer':<14}{'step':>6}{'epoch':>6}  {'params_hash':<18}{'loss':>8}"
        f"{'tok/s':>9}{'bytes sent':>13}"
    )
    for r in rows:
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        click.echo(
            f"{str(r['peer_id'])[-12:]:<14}{r['step']:>6}{r['arch_epoch']:>6}  "
            f"{str(r['params_hash']):<18}{loss:>8}{r['tokens_per_s'] or 0:>9.0f}"
            f"{r['bytes_sent'] or 0:>13}"
        )


@main.command()
@click.option("--peers", default=3, show_default=True, help="Peer processes (>= 2).")
@click.option("--minutes", default=3.0, show_default=True, help="How long the swarm trains.")
@click.option("--preset", default="tiny", type=click.Choice(["tiny", "small"]), show_default=True)
@click.option("--inner-steps", "-H", default=25, show_default=True, help="Inner steps per round.")
@click.option("--grow", default="", help='Growth votes every peer casts, e.g. "experts:2@6".')
@click.option("--out", default="runs/demo", show_default=True, help="Output folder.")
def demo(peers: int, minutes: float, preset: str, inner_steps: int, grow: str, out: str) -> None:
    """Start a real local swarm on 127.0.0.1 (one peer joins late), train, plot, stop."""
    from diloco_grow.demo import DemoSpec, run_demo

    if peers < 2:
        fail("--peers must be >= 2")
    summary = run_demo(
        DemoSpec(
            peers=peers,
            minutes=minutes,
            out_dir=out,
            preset=preset,
            inner_steps=inner_steps,
            grow=grow,
        )
    )
    click.echo(json.dumps(summary, sort_keys=True))
    if summary["steps_with_disagreeing_hashes"]:
        fail(f"peers disagreed on θ_g at steps {summary['steps_with_disagreeing_hashes']}")


@main.group("run")
def run_group() -> None:
    """Set up a run (owner side): `run init` writes the run file peers join with."""


@run_group.command("init")
@click.option("--run", "run_name", required=True, help="Run (swarm) name.")
@click.option(
    "--owner-key",
    required=True,
    type=click.Path(dir_okay=False),
    help="The owner's Ed25519 key file (created, mode 0600, if missing). Keep it private.",
)
@click.option("--out", default="run.json", show_default=True, help="Run file to write.")
@click.option("--open", "open_run", is_flag=True, help="A public run: every peer is admitted.")
def run_init(run_name: str, owner_key: str, out: str, open_run: bool) -> None:
    """Write the run file (run name, owner public key, mode) that every peer joins with."""
    from peers.admission import RunFile, load_or_create_owner_key, public_hex

    try:
        key, created = load_or_create_owner_key(owner_key)
        rf = RunFile(run_name, public_hex(key), "open" if open_run else "admitted")
        if Path(out).exists() and Path(out).read_text() != rf.to_json():
            raise ValueError(f"{out} exists and describes another run; remove it or pick --out")
        rf.save(out)
    except ValueError as e:
        fail(str(e))
    if created:
        click.echo(f"created owner key {owner_key} (keep it private: it admits peers)", err=True)
    click.echo(f"wrote {out}: run {run_name!r}, mode {rf.mode}, owner key {rf.owner_key}")
    if not open_run:
        click.echo(
            f"admit a peer: diloco-grow admit --owner-key {owner_key} --run-file {out} "
            "--peer-id ID --out ID.cert",
            err=True,
        )


@main.command()
@click.option(
    "--key",
    "key_file",
    default="peer.key",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Identity key file (created, mode 0600, if missing).",
)
def keygen(key_file: str) -> None:
    """Create (or read) this peer's identity key and print its peer id, which the run's
    owner admits with `diloco-grow admit --peer-id ID`."""
    from peers.identity import load_or_create, peer_id_of_key

    existed = Path(key_file).exists()
    try:
        peer_id = peer_id_of_key(load_or_create(key_file))
    except ValueError as e:
        fail(str(e))
    click.echo(f"{'read' if existed else 'created'} identity key {key_file}", err=True)
    click.echo(peer_id)


@main.command()
@click.option(
    "--owner-key",
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="The run owner's key file (from `run init`).",
)
@click.option(
    "--run-file", required=True, type=click.Path(dir_okay=False, exists=True), help="The run file."
)
@click.option("--peer-id", required=True, help="The id `diloco-grow keygen` printed for the peer.")
@click.option("--days", default=30.0, show_default=True, help="Days until the admission expires.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Certificate to write.")
def admit(owner_key: str, run_file: str, peer_id: str, days: float, out: str) -> None:
    """Admit a peer to the run: sign (run, peer id, expiry) with the owner's key. Send the
    certificate to the peer; it joins with `peer --run-file ... --key ... --cert ...`."""
    import time

    from peers.admission import RunFile, load_or_create_owner_key, public_hex, sign

    try:
        rf = RunFile.load(run_file)
        if not Path(owner_key).exists():
            raise ValueError(f"owner key {owner_key} does not exist")
        key, _ = load_or_create_owner_key(owner_key)
        if public_hex(key) != rf.owner_key:
            raise ValueError(f"{owner_key} is not the owner key of {run_file}")
        if rf.mode == "open":
            raise ValueError(f"{run_file} is an open run: every peer is admitted without a cert")
        if not 0 < days <= 3650:
            raise ValueError("--days must lie in (0, 3650]")
        cert = sign(key, rf.run, peer_id.strip().lower(), int(time.time() + days * 86400))
        cert.save(out)
    except ValueError as e:
        fail(str(e))
    click.echo(f"admitted {cert.peer_id} to run {rf.run!r} until {cert.expires_utc}: {out}")


if __name__ == "__main__":
    main()
