"""`export --format hf`: the folder loads in `transformers` and computes what we compute.

Checkpoints come from real `simulate` runs (trained, and grown by experts x2 then depth
x2); logits are compared on the same bytes, greedy decoding on the same prompt.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from diloco_grow import cli
from diloco_grow.checkpoint import CheckpointError, load_trained_model
from diloco_grow.config import config_from_dict
from diloco_grow.data import load_corpus
from diloco_grow.export import export_hf
from diloco_grow.generate import generate_tokens
from diloco_grow.growth import parse_schedule
from diloco_grow.simulate import SimSpec, simulate

transformers = pytest.importorskip("transformers", reason="the `hf` extra (make test installs it)")

CASES = {
    # name: (model overrides, growth schedule, architecture transformers must build)
    "original": ({}, "", "MixtralForCausalLM"),
    "grown": ({}, "experts:2@1,depth:2@2", "MixtralForCausalLM"),
    "shared_grown": (
        {"shared_expert": True},
        "experts:2@1,depth:2@2:stack",
        "Qwen2MoeForCausalLM",
    ),
}


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def make_case(corpus, tmp_path_factory):
    """name -> (name, checkpoint path, HF folder, expected architecture), each trained
    once per module by a real simulate run, then exported."""
    made: dict[str, tuple] = {}

    def make(name: str) -> tuple:
        if name not in made:
            model, grow, arch = CASES[name]
            cfg = config_from_dict(
                {"preset": "tiny", "model": model, "inner": {"steps": 2, "batch_size": 4}}
            )
            out = tmp_path_factory.mktemp(name)
            spec = SimSpec(
                workers=2,
                outer_steps=3,
                out_dir=str(out / "run"),
                grow=tuple(parse_schedule(grow)),
                progress=False,
            )
            simulate(cfg, spec, corpus)
            ckpt = out / "run" / "checkpoint.safetensors"
            assert export_hf(ckpt, out / "hf")["architecture"] == arch
            made[name] = (name, ckpt, out / "hf", arch)
        return made[name]

    return make


@pytest.fixture(params=list(CASES))
def case(request, make_case):
    return make_case(request.param)


def _bytes_batch(corpus, seq_len: int) -> torch.Tensor:
    """Real text and random bytes, a full context each."""
    g = torch.Generator().manual_seed(0)
    text = torch.from_numpy(corpus.val[:seq_len].astype("int64"))
    noise = torch.randint(0, 256, (seq_len,), generator=g)
    return torch.stack([text, noise])


def test_logits_match_transformers(case, corpus):
    name, ckpt, hf_dir, arch = case
    ours, g = load_trained_model(ckpt)
    if name != "original":
        assert g.arch_epoch == 2 and ours.cfg.n_layers == 4 and ours.cfg.n_experts == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(hf).__name__ == arch
    assert next(hf.parameters()).dtype == torch.float32  # config.json says so
    x = _bytes_batch(corpus, ours.cfg.seq_len)
    with torch.no_grad():
        a, b = ours(x).logits, hf(x).logits
    assert a.shape == b.shape == (2, ours.cfg.seq_len, 256)
    assert (a - b).abs().max().item() <= 1e-4
    n_hf = sum(p.numel() for p in hf.parameters())
    # Qwen2-MoE adds zero q/k/v biases and a (zero) shared-expert gate, nothing else.
    extra = 3 * ours.cfg.d_model + ours.cfg.d_model if ours.cfg.shared_expert else 0
    assert n_hf == ours.n_params() + ours.cfg.n_layers * extra


def test_tokenizer_is_bytes_and_greedy_text_matches_ours(case):
    _, ckpt, hf_dir, _ = case
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "def f(x):\n\treturn x ✓ é\x00"
    assert tok(text)["input_ids"] == list(text.encode())
    assert tok.decode(list(text.encode())) == text

    ours, _ = load_trained_model(ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt, n = b"def ", 48  # prompt + output within the context (seq_len 64)
    ids = tok("def ", return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, do_sample=False)[0, len(prompt) :].tolist()
    assert out == list(generate_tokens(ours, prompt, n, temperature=0))
    # The same text from our CLI, greedy.
    res = CliRunner().invoke(
        cli.main, ["generate", str(ckpt), "--prompt", "def ", "-n", str(n), "-t", "0"]
    )
    assert res.exit_code == 0, res.output
    assert res.stdout == "def " + tok.decode(out) + "\n"


def test_export_cli_writes_a_loadable_folder_with_provenance(make_case, tmp_path):
    _, ckpt, _, arch = make_case("grown")
    res = CliRunner().invoke(cli.main, ["export", str(ckpt.parent), str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["architecture"] == arch and summary["arch_epoch"] == 2
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
    prov = json.loads((tmp_path / "hf" / "diloco_grow.json").read_text())
    assert [e["kind"] for e in prov["growth_history"]] == ["experts", "depth"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 4)
    assert config["num_hidden_layers"] == 4


def test_export_of_a_missing_checkpoint_is_a_clean_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint.safetensors or peer.safetensors"):
        export_hf(tmp_path, tmp_path / "hf")
    res = CliRunner().invoke(cli.main, ["export", str(tmp_path), str(tmp_path / "hf")])
    assert res.exit_code == 2 and "error: no checkpoint.safetensors" in res.output
