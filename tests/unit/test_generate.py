"""`generate`: exactly the requested number of tokens, deterministic for a seed, greedy
at temperature 0, top-k honoured, and the CLI streams what the function yields."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from diloco_grow import checkpoint as ckpt
from diloco_grow import cli
from diloco_grow.config import config_from_dict
from diloco_grow.generate import generate_tokens, sample_next
from diloco_grow.worker import GlobalState


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint as simulate/peer write it (θ_g, momentum, arch, no workers)."""
    g = GlobalState.init(config_from_dict({"preset": "tiny", "seed": 5}))
    path = tmp_path_factory.mktemp("gen") / "peer.safetensors"
    ckpt.save_checkpoint(path, g, [], {})
    model, _ = ckpt.load_trained_model(path)
    return path, model


@pytest.mark.parametrize("n", [0, 1, 17, 100])  # 100 > seq_len 64: the window slides
def test_generates_exactly_n_tokens_deterministically(saved, n):
    _, model = saved
    run = lambda seed: list(  # noqa: E731
        generate_tokens(model, b"def ", n, temperature=1.0, top_k=50, seed=seed)
    )
    a = run(0)
    assert len(a) == n and all(0 <= t < 256 for t in a)
    assert run(0) == a  # same seed, same tokens
    torch.manual_seed(123)  # the global RNG plays no part
    assert run(0) == a
    if n >= 17:
        assert run(1) != a  # a different seed samples differently


def test_temperature_zero_is_greedy_and_ignores_the_seed(saved):
    _, model = saved
    greedy = list(generate_tokens(model, b"import ", 20, temperature=0, seed=0))
    assert list(generate_tokens(model, b"import ", 20, temperature=0, seed=9)) == greedy
    assert list(generate_tokens(model, b"import ", 20, temperature=1.0, top_k=1)) == greedy
    # Greedy by hand: argmax of the next-token logits, appended one at a time.
    ids = list(b"import ")
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ids[len(b"import ") :] == greedy


def test_top_k_never_samples_outside_the_k_likeliest():
    logits = torch.tensor([0.0, 5.0, 4.9, 4.8, -1.0])
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 2.0, 2, gen) for _ in range(300)}
    assert draws == {1, 2}
    assert sample_next(logits, 0, None, gen) == 1


def test_bad_arguments_fail_before_generating(saved):
    _, model = saved
    for kwargs, msg in [
        ({"prompt": b""}, "prompt must not be empty"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ]:
        args = {"prompt": b"x", "max_new_tokens": 3, "temperature": 1.0, "top_k": None, **kwargs}
        with pytest.raises(ValueError, match=msg):
            list(generate_tokens(model, **args))


def test_cli_streams_the_same_tokens(saved):
    path, model = saved
    n = 30
    res = CliRunner().invoke(
        cli.main,
        ["generate", str(path), "-p", "def ", "-n", str(n), "-t", "0.7", "--top-k", "20"],
    )
    assert res.exit_code == 0, res.output
    toks = list(generate_tokens(model, b"def ", n, temperature=0.7, top_k=20, seed=0))
    expected = "def " + bytes(toks).decode("utf-8", errors="replace") + "\n"
    assert res.stdout == expected
    assert f"{n} tokens in " in res.stderr and "tokens/s" in res.stderr
    # The folder holding the checkpoint works too; a bad temperature is a clean error.
    res = CliRunner().invoke(cli.main, ["generate", str(path.parent), "-n", "3", "-t", "-1"])
    assert res.exit_code == 2 and "error: temperature must be >= 0" in res.stderr


def test_grown_checkpoint_generates(tmp_path):
    from diloco_grow.growth import GrowthEvent

    cfg = config_from_dict({"preset": "tiny"})
    g = GlobalState.init(cfg)
    g.grow(GrowthEvent("experts", 2))
    g.grow(GrowthEvent("depth", 2))
    ckpt.save_checkpoint(tmp_path / "checkpoint.safetensors", g, [], {})
    model, g2 = ckpt.load_trained_model(tmp_path)
    assert model.cfg == dataclasses.replace(cfg.model, n_experts=8, top_k=4, n_layers=4)
    assert g2.hash() == g.hash()
    assert len(list(generate_tokens(model, b"a", 10, temperature=0))) == 10
