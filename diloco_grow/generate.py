"""Sampling text from a trained model, one byte (token) at a time.

Tokens are bytes, so a prompt is its UTF-8 encoding and the output is decoded
incrementally (a character may span several tokens). Temperature 0 is greedy argmax,
identical to `transformers`' greedy decoding of the exported model while prompt plus
output fit in the model's context (cfg.seq_len); past it the window slides, nanoGPT
style, keeping the last seq_len tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from diloco_grow.model import MoETransformer


def sample_next(
    logits_V: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator
) -> int:
    """One token from next-token logits: argmax at temperature 0, otherwise a draw from
    softmax(logits / T) restricted to the top_k most likely tokens (None or 0: all)."""
    if temperature == 0:
        return int(torch.argmax(logits_V))
    logits_V = logits_V.float() / temperature
    if top_k:
        kth = torch.topk(logits_V, min(top_k, logits_V.numel())).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=gen))


@torch.inference_mode()
def generate_tokens(
    model: MoETransformer,
    prompt: bytes,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> Iterator[int]:
    """Yield `max_new_tokens` token ids (bytes) continuing `prompt`. The same seed gives
    the same tokens: sampling draws from its own CPU generator, not torch's global RNG."""
    if not prompt:
        raise ValueError("the prompt must not be empty (the model needs a token to start)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    ids = list(prompt)
    T = model.cfg.seq_len
    for _ in range(max_new_tokens):
        ctx_1T = torch.tensor([ids[-T:]], dtype=torch.long, device=device)
        logits_V = model(ctx_1T).logits[0, -1].float().cpu()
        nxt = sample_next(logits_V, temperature, top_k, gen)
        ids.append(nxt)
        yield nxt
