"""Byte-level token streams: the embedded corpus (Python's standard library) or user text.

Tokens are raw bytes (vocab 256), so there is no tokenizer to download or agree on.
The train/validation split is by file, decided by a hash of the relative path, so it is
the same on every machine. Each worker draws its own batches from (seed, worker id,
batch index): the stream position is one integer, which makes checkpoints trivial and
resumes bit-exact.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from diloco_grow.config import RunConfig

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".toml", ".json", ".c", ".h", ".cfg")
# The embedded corpus is ~30 MB; cap what a user folder can pull into memory.
MAX_CORPUS_BYTES = 512 * 1024 * 1024


def stdlib_files() -> list[Path]:
    """Source files of the running Python's standard library, without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def user_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"--data {str(p)!r}: no such file or folder")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--data {str(p)!r}: no text files ({', '.join(TEXT_SUFFIXES)})")
    return files


def _is_val(name: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return (h % 10_000) < val_fraction * 10_000


@dataclass(frozen=True)
class Corpus:
    """Concatenated bytes of the train and validation files, plus file boundaries."""

    train: np.ndarray  # uint8
    val: np.ndarray  # uint8
    train_file_starts: np.ndarray  # offset of each train file in `train` (for non-IID)

    @property
    def n_train_tokens(self) -> int:
        return int(self.train.size)


def load_corpus(path: str | Path | None = None, val_fraction: float = 0.05) -> Corpus:
    files = stdlib_files() if path is None else user_files(path)
    train, val, starts, total = [], [], [], 0
    n_train = 0
    for f in files:
        data = f.read_bytes()
        total += len(data)
        if total > MAX_CORPUS_BYTES:
            raise ValueError(
                f"corpus larger than {MAX_CORPUS_BYTES >> 20} MiB; pass a smaller --data"
            )
        # Validation by hash of the file name; a single-file corpus splits by position instead.
        if len(files) > 1 and _is_val(f.name + str(len(data)), val_fraction):
            val.append(data)
        else:
            starts.append(n_train)
            train.append(data)
            n_train += len(data)
    if len(files) == 1:
        data = train.pop()
        cut = int(len(data) * (1 - val_fraction))
        train, val = [data[:cut]], [data[cut:]]
    to_np = lambda parts: np.frombuffer(b"".join(parts), dtype=np.uint8)  # noqa: E731
    corpus = Corpus(to_np(train), to_np(val), np.asarray(starts, dtype=np.int64))
    if corpus.train.size < 4096 or corpus.val.size < 1024:
        raise ValueError(
            "corpus too small: need at least 4 KiB of training and 1 KiB of validation text"
        )
    return corpus


class BatchStream:
    """Deterministic batches for one worker: batch i depends only on (seed, worker, i)."""

    def __init__(
        self,
        corpus: Corpus,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        worker: int = 0,
        n_workers: int = 1,
        mode: str = "iid",
    ) -> None:
        self.tokens = corpus.train
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.worker = seed, worker
        self.position = 0  # batches drawn so far; the whole checkpointable state
        lo, hi = 0, self.tokens.size
        if mode == "non-iid" and n_workers > 1:
            # Contiguous file ranges: worker w sees files [w/M, (w+1)/M) of the corpus.
            starts = corpus.train_file_starts
            bounds = [starts[len(starts) * k // n_workers] for k in range(n_workers)]
            bounds.append(self.tokens.size)
            lo, hi = int(bounds[worker]), int(bounds[worker + 1])
        if hi - lo < seq_len + 2:
            raise ValueError(f"worker {worker}'s shard has {hi - lo} tokens; need > seq_len")
        self.lo, self.hi = lo, hi

    @classmethod
    def for_worker(
        cls, corpus: Corpus, cfg: RunConfig, worker: int = 0, n_workers: int = 1
    ) -> BatchStream:
        """The stream of worker `worker` of `n_workers` under a run configuration."""
        return cls(
            corpus,
            seq_len=cfg.model.seq_len,
            batch_size=cfg.inner.batch_size,
            seed=cfg.seed,
            worker=worker,
            n_workers=n_workers,
            mode=cfg.data.mode,
        )

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.worker, self.position])
        self.position += 1
        starts = rng.integers(self.lo, self.hi - self.seq_len - 1, size=self.batch_size)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def val_set(corpus: Corpus, cfg: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's validation set: `data.val_batches` batches of the run's shape."""
    return val_batches(
        corpus,
        seq_len=cfg.model.seq_len,
        batch_size=cfg.inner.batch_size,
        n_batches=cfg.data.val_batches,
    )


def val_batches(
    corpus: Corpus, *, seq_len: int, batch_size: int, n_batches: int, seed: int = 1234
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set (same windows every evaluation and on every machine)."""
    rng = np.random.default_rng(seed)
    n = corpus.val.size - seq_len - 1
    out = []
    for _ in range(n_batches):
        starts = rng.integers(0, n, size=batch_size)
        idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
        chunk = torch.from_numpy(corpus.val[idx].astype(np.int64))
        out.append((chunk[:, :-1], chunk[:, 1:]))
    return out
