"""The byte-level tokenizer as Hugging Face files: token id b is the byte b (0-255).

Our model reads raw bytes, so the exported folder needs no learned vocabulary: a
`tokenizers` BPE model with the 256 byte symbols and no merges, behind the ByteLevel
pre-tokenizer and decoder (GPT-2's byte-to-unicode mapping), turns text into its UTF-8
bytes and back. Written as plain JSON, so exporting needs no tokenizer library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character (the
    symbols the ByteLevel pre-tokenizer produces)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:  # control bytes and space get the next unused code points from 256 on
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_json() -> dict[str, Any]:
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,  # no BOS/EOS: the model was trained on bare byte streams
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {ch: b for b, ch in bytes_to_unicode().items()},
            "merges": [],
        },
    }


def write_tokenizer(out: str | Path, model_max_length: int) -> list[Path]:
    """tokenizer.json + tokenizer_config.json, loadable by AutoTokenizer."""
    out = Path(out)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    files = {"tokenizer.json": tokenizer_json(), "tokenizer_config.json": config}
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return [out / name for name in files]
