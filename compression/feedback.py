"""Error feedback: carry what quantisation lost in one round into the next.

Each round sends Q(x + e) and keeps e <- (x + e) - Q^-1(Q(x + e)). The sum of everything
sent then equals the sum of all inputs minus the current residual, which is at most one
quantisation step per element, so nothing is lost over time (Seide et al. 2014; Karimireddy
et al. 2019). The residual is local state: it goes into checkpoints (state_dict) and must
follow the parameters through model growth (remap with the growth index map).

With `decay` β < 1 the residual is a leaky accumulator, e <- β·e + x before encoding
(SparseLoCo, Sarfi et al. 2025): with a sparse codec most of e stays local for several
rounds, and the decay makes it act as each worker's own momentum, so the outer step can
be plain averaging (momentum 0). β = 1 is classic error feedback.
"""

from __future__ import annotations

import torch

from compression.codec import Codec, Encoded


class ErrorFeedback:
    """A residual for one flat (or fixed-shape) tensor, updated by every `compress` call."""

    def __init__(self, codec: Codec, decay: float = 1.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"error-feedback decay must lie in (0, 1], got {decay!r}")
        self.codec, self.decay = codec, decay
        self.residual: torch.Tensor | None = None  # fp32, shape of the inputs, inputs' device

    def compress(self, x: torch.Tensor) -> Encoded:
        """Encode x + β·e and keep the new quantisation error as e."""
        xf = x.detach().to(torch.float32)
        if self.residual is None:
            target = xf.clone()
        else:
            if self.residual.shape != xf.shape:
                raise ValueError(f"input shape {tuple(xf.shape)} does not match the residual "
                                 f"shape {tuple(self.residual.shape)}; remap after growth")
            # alpha = 1 multiplies exactly, so β = 1 is classic error feedback bit for bit.
            target = xf.add(self.residual.to(xf.device), alpha=self.decay)
        enc = self.codec.encode(target)
        # In place: target becomes the new residual without another full-size allocation.
        target.sub_(self.codec.decode(enc, device=target.device))
        self.residual = target
        return enc

    def reset(self) -> None:
        self.residual = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copy of the residual (empty dict before the first round)."""
        if self.residual is None:
            return {}
        return {"residual": self.residual.detach().cpu().clone()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        if not d:
            self.residual = None
            return
        unknown = set(d) - {"residual"}
        if unknown:
            raise ValueError(f"unexpected ErrorFeedback state keys: {sorted(unknown)}")
        r = d["residual"]
        if not isinstance(r, torch.Tensor) or not r.is_floating_point():
            raise ValueError("ErrorFeedback residual must be a floating-point tensor")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("ErrorFeedback residual contains NaN or Inf")
        self.residual = r.detach().to(torch.float32).clone()

    def remap(self, index_map: torch.Tensor) -> None:
        """Follow a growth event: new[i] = old[index_map[i]] if index_map[i] >= 0 else 0.

        The residual becomes flat with len(index_map) elements (the canonical flat order of
        the grown model). Copies start from the carried error of their source element.
        """
        if self.residual is None:
            return
        if index_map.dim() != 1 or index_map.dtype not in (torch.int32, torch.int64):
            raise ValueError("index_map must be a 1-D int32/int64 tensor")
        old = self.residual.reshape(-1)
        idx = index_map.to(device=old.device, dtype=torch.int64)
        if idx.numel() and (int(idx.max()) >= old.numel() or int(idx.min()) < -1):
            raise ValueError(f"index_map values must lie in [-1, {old.numel() - 1}]")
        keep = idx >= 0
        new = torch.zeros(idx.numel(), dtype=torch.float32, device=old.device)
        new[keep] = old[idx[keep]]
        self.residual = new
