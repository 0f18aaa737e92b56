"""One configuration story for `peer`: the [swarm] section of the run TOML, CLI flags
over it, one default per setting (the network layer's), validation naming the field."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from diloco_grow import cli
from diloco_grow.config import ConfigError, SwarmSection, build_config, load_config
from diloco_grow.growth import GrowthEvent
from diloco_grow.peer import PeerOptions
from diloco_grow.threads import default_threads, set_threads
from peers.config import SwarmConfig

RUN_TOML = """
preset = "tiny"
[inner]
steps = 7
[swarm]
run = "lab-run"
join = ["/ip4/10.0.0.2/tcp/4000/p2p/12D3KooWabc"]
host = "0.0.0.0"
port = 4000
announce_host = "203.0.113.7"
data_port = 4001
matchmaking_s = 5.0
round_timeout_s = 90
min_peers = 2
quorum = 0.75
grow = "experts:2@20,depth:2@40:zero_output"
max_rounds = 12
eval_every = 3
out_dir = "runs/lab"
checkpoint_dir = "ckpt/lab"
threads = 3
"""


def test_defaults_are_the_network_layers() -> None:
    s, net = SwarmSection(), SwarmConfig(run="x")
    names = (
        "host",
        "port",
        "announce_host",
        "data_port",
        "heartbeat_s",
        "matchmaking_s",
        "max_wait_s",
        "phase_timeout_s",
        "round_timeout_s",
        "min_peers",
        "quorum",
    )
    for name in names:
        assert getattr(s, name) == getattr(net, name), name
    assert s.round_timeout_s == net.round_timeout_s == 60.0
    # The options a default section gives the peer carry those same values, and so do
    # PeerOptions' own defaults (one default per setting).
    opts = s.peer_options()
    for name in names:
        if name != "data_port":
            assert getattr(opts, name) == getattr(net, name) == getattr(PeerOptions(), name)
    assert opts.extra_swarm == {"data_port": 0}


def test_swarm_section_from_toml_reaches_peer_options(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(RUN_TOML)
    cfg = load_config(path)
    assert cfg.inner.steps == 7
    s = cfg.swarm
    assert s.join == ("/ip4/10.0.0.2/tcp/4000/p2p/12D3KooWabc",)
    opts = s.peer_options()
    assert isinstance(opts, PeerOptions)
    assert (opts.run, opts.host, opts.port, opts.announce_host) == (
        "lab-run",
        "0.0.0.0",
        4000,
        "203.0.113.7",
    )
    assert (opts.matchmaking_s, opts.round_timeout_s, opts.min_peers, opts.quorum) == (
        5.0,
        90,
        2,
        0.75,
    )
    assert (opts.max_rounds, opts.eval_every) == (12, 3)
    assert (opts.out_dir, opts.checkpoint_dir) == ("runs/lab", "ckpt/lab")
    assert opts.grow == (
        (20, GrowthEvent("experts", 2)),
        (40, GrowthEvent("depth", 2, zero_output=True)),
    )
    # A network setting PeerOptions has no field for rides along to SwarmConfig.
    assert opts.extra_swarm == {"data_port": 4001}
    # build_config overrides ("section.field") win over the file, as CLI flags do.
    cfg2 = build_config(path, None, {"swarm.round_timeout_s": 15.0, "swarm.run": None})
    assert cfg2.swarm.round_timeout_s == 15.0 and cfg2.swarm.run == "lab-run"


def test_a_single_join_address_may_be_a_string() -> None:
    s = SwarmSection(join="/ip4/1.2.3.4/tcp/1/p2p/12D3KooWx")
    assert s.join == ("/ip4/1.2.3.4/tcp/1/p2p/12D3KooWx",)


@pytest.mark.parametrize(
    "swarm, msg",
    [
        ({"port": 70000}, r"swarm\.port must be in \[0, 65535\], got 70000"),
        ({"port": "4000"}, r"swarm\.port must be in \[0, 65535\], got '4000'"),
        ({"round_timeout_s": 0}, r"swarm\.round_timeout_s must be > 0 seconds"),
        ({"matchmaking_s": -1.0}, r"swarm\.matchmaking_s must be > 0 seconds"),
        ({"quorum": 1.5}, r"swarm\.quorum must lie in \(0, 1\]"),
        ({"min_peers": 0}, r"swarm\.min_peers must be an integer >= 1"),
        ({"run": "has space"}, r"swarm\.run must match"),
        ({"join": ["1.2.3.4:4000"]}, r"swarm\.join must be multiaddrs"),
        ({"grow": "experts:1@4"}, r"swarm\.grow: bad growth schedule item"),
        ({"device": "gpu"}, r"swarm\.device must be cpu, cuda"),
        ({"threads": -1}, r"swarm\.threads must be an integer >= 0"),
        ({"max_rounds": 0}, r"swarm\.max_rounds must be an integer >= 1"),
        ({"heartbeat": 1}, r"unknown key\(s\) \['heartbeat'\] in \[swarm\]"),
    ],
)
def test_bad_swarm_values_fail_naming_the_field(swarm: dict, msg: str) -> None:
    from diloco_grow.config import config_from_dict

    with pytest.raises(ConfigError, match=msg):
        config_from_dict({"swarm": swarm})


@pytest.fixture
def captured(monkeypatch):
    """Stop `peer` where it would open sockets; keep what the CLI built."""
    seen: dict = {}

    def fake_run_peer(cfg, opts, threads=0):
        seen.update(cfg=cfg, opts=opts, threads=threads)

    monkeypatch.setattr("diloco_grow.peer.run_peer", fake_run_peer)
    return seen


def test_cli_flags_override_the_run_file(tmp_path, captured) -> None:
    path = tmp_path / "run.toml"
    path.write_text(RUN_TOML)
    res = CliRunner().invoke(
        cli.main,
        [
            "peer",
            "--config",
            str(path),
            "--round-timeout-s",
            "45",
            "--port",
            "0",
            "--threads",
            "1",
            "--open",
        ],
    )
    assert res.exit_code == 0, res.output
    opts = captured["opts"]
    assert opts.round_timeout_s == 45.0 and opts.port == 0  # flags win
    assert opts.min_peers == 2 and opts.run == "lab-run"  # the file fills the rest
    assert opts.join == ("/ip4/10.0.0.2/tcp/4000/p2p/12D3KooWabc",)
    assert captured["threads"] == 1
    # Without a file: SwarmSection's defaults, not a second set in the CLI.
    res = CliRunner().invoke(cli.main, ["peer", "--open"])
    assert res.exit_code == 0, res.output
    default = SwarmSection(open=True).peer_options()
    assert captured["opts"] == default


def test_cli_bad_swarm_value_is_a_clean_error(tmp_path, captured) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[swarm]\nquorum = 2\n")
    res = CliRunner().invoke(cli.main, ["peer", "--config", str(path)])
    assert res.exit_code == 2
    assert "error: swarm.quorum must lie in (0, 1], got 2" in res.output
    assert captured == {}
    res = CliRunner().invoke(cli.main, ["peer", "--min-peers", "0"])
    assert res.exit_code == 2 and "swarm.min_peers must be an integer >= 1" in res.output


def test_peer_help_shows_the_single_default() -> None:
    res = CliRunner().invoke(cli.main, ["peer", "--help"])
    assert "after (s). [default: 60]" in " ".join(res.output.split())  # round_timeout_s


def test_default_threads_divide_the_cores_among_workers(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads(workers=1, cores=8) == 8
    assert default_threads(workers=4, cores=8) == 2
    assert default_threads(workers=4, cores=2) == 1  # never 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a launcher's explicit choice wins
    assert default_threads(workers=4, cores=8) == 3
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads(2) == 2 and torch.get_num_threads() == 2
        assert set_threads(0, workers=1) == 3  # 0: automatic
        with pytest.raises(ValueError, match="threads must be >= 0"):
            set_threads(-1)
    finally:
        torch.set_num_threads(before)


def test_peer_and_status_refuse_without_a_run_file_or_open(captured) -> None:
    for argv in (["peer"], ["status", "--join", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWx"]):
        res = CliRunner().invoke(cli.main, argv)
        assert res.exit_code == 2 and captured == {}
        assert "--run-file RUN.json" in res.output and "--open" in res.output


def test_admission_settings_from_the_swarm_section(tmp_path, captured) -> None:
    """run init, keygen and admit as the README shows them; then `peer` with the files,
    given as flags or in [swarm], reaches SwarmConfig with the owner key and certificate."""
    run, owner, key, cert = (str(tmp_path / n) for n in ("run.json", "o.key", "p.key", "p.cert"))
    invoke = CliRunner().invoke
    res = invoke(cli.main, ["run", "init", "--run", "lab", "--owner-key", owner, "--out", run])
    assert res.exit_code == 0, res.output
    res = invoke(cli.main, ["keygen", "--key", key])
    peer_id = res.stdout.strip().splitlines()[-1]
    assert res.exit_code == 0 and len(peer_id) == 20
    argv = ["admit", "--owner-key", owner, "--run-file", run, "--peer-id", peer_id]
    res = invoke(cli.main, [*argv, "--days", "2", "--out", cert])
    assert res.exit_code == 0 and "admitted" in res.output, res.output
    res = invoke(cli.main, ["peer", "--run-file", run, "--key", key, "--cert", cert])
    assert res.exit_code == 0, res.output
    net = captured["opts"].swarm_config()
    assert net.run == "lab" and net.cert.peer_id == peer_id and net.owner_key
    toml = tmp_path / "run.toml"
    toml.write_text(f'[swarm]\nrun_file = "{run}"\nkey_file = "{key}"\ncert_file = "{cert}"\n')
    res = invoke(cli.main, ["peer", "--config", str(toml)])
    assert res.exit_code == 0, res.output
    assert captured["opts"].swarm_config() == net
    # Another owner key cannot admit peers to this run.
    other = str(tmp_path / "other.key")
    invoke(cli.main, ["run", "init", "--run", "x", "--owner-key", other, "--out", f"{run}.x"])
    argv = ["admit", "--owner-key", other, "--run-file", run, "--peer-id", peer_id]
    res = invoke(cli.main, [*argv, "--out", str(tmp_path / "forged.cert")])
    assert res.exit_code == 2 and "is not the owner key of" in res.output


def test_every_command_has_help() -> None:
    for argv in (
        [], ["run"], ["run", "init"], ["keygen"], ["admit"], ["peer"], ["status"], ["demo"],
        ["simulate"], ["export"], ["generate"], ["plot"],
    ):  # fmt: skip
        res = CliRunner().invoke(cli.main, [*argv, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output, argv
