"""`diloco-grow export --format hf`: a checkpoint as a Hugging Face model folder.

Our block is a Mixtral block: pre-RMSNorm, rotate-half RoPE, causal multi-head
attention without biases, a softmax router whose top-k weights are renormalised, and
SwiGLU experts. So a model without a shared expert becomes `MixtralForCausalLM`; with
one it becomes `Qwen2MoeForCausalLM`, whose shared expert is gated by
sigmoid(w·x): we write w = 0 (gate 1/2) and double the shared down-projection, which is
exact in floating point (both are powers of two). Qwen2-MoE's q/k/v biases are written
as zeros. Weights use the per-expert key layout both transformers 4.x and 5.x read.

Growth changes only counts (experts, top-k, layers), never the block, so every grown
architecture exports the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diloco_grow.byte_tokenizer import write_tokenizer
from diloco_grow.checkpoint import load_trained_model
from diloco_grow.model import ModelConfig, MoETransformer

RMS_EPS = 1e-6  # diloco_grow.model.RMSNorm's eps


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for the architecture `cfg` maps to (see the module docstring)."""
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_expert,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": RMS_EPS,
        "rope_theta": cfg.rope_theta,
        "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "output_router_logits": False,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        # Tokens are raw bytes: there is no BOS/EOS/PAD symbol to put in front or stop on.
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }
    if not cfg.shared_expert:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            **common,
            "num_local_experts": cfg.n_experts,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **common,
        "num_experts": cfg.n_experts,
        "moe_intermediate_size": cfg.d_expert,
        "shared_expert_intermediate_size": cfg.d_expert,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.n_layers,
    }


def hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names (legacy per-expert layout)."""
    cfg, sd = model.cfg, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    qwen = cfg.shared_expert
    moe = "mlp" if qwen else "block_sparse_moe"
    gate_k, up_k, down_k = ("gate_proj", "up_proj", "down_proj") if qwen else ("w1", "w3", "w2")
    out = {
        "model.embed_tokens.weight": sd["tok_emb.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        # wqkv rows are [q; k; v], each head-major: the order q_proj/k_proj/v_proj use.
        q, k, v = sd[ours + "attn.wqkv.weight"].chunk(3, dim=0)
        for name, w in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            out[f"{hf}self_attn.{name}.weight"] = w
            if qwen:
                out[f"{hf}self_attn.{name}.bias"] = torch.zeros(w.shape[0])
        out[hf + "self_attn.o_proj.weight"] = sd[ours + "attn.wo.weight"]
        out[hf + "input_layernorm.weight"] = sd[ours + "attn_norm.weight"]
        out[hf + "post_attention_layernorm.weight"] = sd[ours + "moe_norm.weight"]
        out[f"{hf}{moe}.gate.weight"] = sd[ours + "moe.w_router_ED"]
        for e in range(cfg.n_experts):
            ex = f"{hf}{moe}.experts.{e}."
            out[f"{ex}{gate_k}.weight"] = sd[ours + "moe.w_gate_EFD"][e]
            out[f"{ex}{up_k}.weight"] = sd[ours + "moe.w_up_EFD"][e]
            out[f"{ex}{down_k}.weight"] = sd[ours + "moe.w_down_EDF"][e]
        if qwen:
            sh = f"{hf}mlp.shared_expert."
            out[sh + "gate_proj.weight"] = sd[ours + "moe.shared.w_gate_FD"]
            out[sh + "up_proj.weight"] = sd[ours + "moe.shared.w_up_FD"]
            out[sh + "down_proj.weight"] = 2.0 * sd[ours + "moe.shared.w_down_DF"]
            out[f"{hf}mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.d_model)
    # safetensors refuses tensors that share memory (the q/k/v chunks, expert slices).
    return {k: v.contiguous().clone() for k, v in out.items()}


def _model_card(cfg: ModelConfig, arch: str, provenance: dict[str, Any]) -> str:
    return f"""# diloco-grow export

A byte-level Mixture-of-Experts language model trained with diloco-grow
(decentralized DiLoCo over a DHT, a Mixture-of-Experts that grows), exported as
`{arch}` ({cfg.n_layers} layers, {cfg.n_experts} experts, top-{cfg.top_k},
d_model {cfg.d_model}, context {cfg.seq_len} bytes). Outer step {provenance["step"]},
architecture epoch {provenance["arch_epoch"]}.

Token ids are the bytes 0-255 of UTF-8 text; there is no BOS/EOS token.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")
tok = AutoTokenizer.from_pretrained("THIS_FOLDER")  # or: ids = list("def ".encode())
ids = tok("def ", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0]))
```
"""


def export_hf(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the HF folder for checkpoint `ckpt` into `out`; returns a summary."""
    t0 = time.perf_counter()
    model, g = load_trained_model(ckpt)
    cfg = model.cfg
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(cfg)
    tensors = hf_state_dict(model)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    # safetensors writes through a private temp file (mode 0600); the folder is meant to
    # be shared and uploaded like the JSON files beside it.
    (out / "model.safetensors").chmod(0o644)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(out, model_max_length=cfg.seq_len)
    provenance = {
        "source": str(ckpt),
        "step": g.step,
        "arch_epoch": g.arch_epoch,
        "params_hash": g.hash(),
        "growth_history": g.history,
        "model_cfg": cfg.to_dict(),
    }
    (out / "diloco_grow.json").write_text(json.dumps(provenance, indent=2) + "\n")
    arch = config["architectures"][0]
    (out / "README.md").write_text(_model_card(cfg, arch, provenance))
    return {
        "out": str(out),
        "architecture": arch,
        "n_params": model.n_params(),
        "step": g.step,
        "arch_epoch": g.arch_epoch,
        "seconds": round(time.perf_counter() - t0, 3),
    }
