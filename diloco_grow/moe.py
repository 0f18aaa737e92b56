"""Mixture-of-Experts feed-forward: softmax router -> top-k -> renormalised SwiGLU experts.

Expert weights are batched parameters named with torchtitan-style shape suffixes
(E experts, F expert hidden size, D model width) so growth can slice them by expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SharedExpert(nn.Module):
    """One always-on SwiGLU expert (DeepSeek-style) added to the routed output."""

    def __init__(self, d_model: int, d_expert: int) -> None:
        super().__init__()
        self.w_gate_FD = nn.Parameter(torch.empty(d_expert, d_model))
        self.w_up_FD = nn.Parameter(torch.empty(d_expert, d_model))
        self.w_down_DF = nn.Parameter(torch.empty(d_model, d_expert))

    def forward(self, x_TD: Tensor) -> Tensor:
        h_TF = F.silu(x_TD @ self.w_gate_FD.T) * (x_TD @ self.w_up_FD.T)
        return h_TF @ self.w_down_DF.T


class MoE(nn.Module):
    """Routed SwiGLU experts plus an optional shared expert.

    Returns (y_TD, lb_loss, z_loss). Both auxiliary losses are built so that duplicating
    every expert (E -> f*E, k -> f*k, router rows copied) leaves them unchanged:

    * load balance (Switch): lb = E * sum_e f_e * P_e, with f_e the fraction of the T*k
      routing *slots* sent to e (so uniform routing gives 1 for any k) and P_e the mean
      router probability. Duplication halves both f and P and doubles E: unchanged.
    * router z-loss (ST-MoE) centred at log E: z = mean_t (logsumexp(logits_t) - log E)^2.
      Duplicating rows adds log f to logsumexp; the centring removes it, so growth does
      not move the training loss. Its gradient still pulls logits toward small values.
    """

    def __init__(
        self, d_model: int, n_experts: int, top_k: int, d_expert: int, shared_expert: bool
    ) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.top_k = top_k
        self.w_router_ED = nn.Parameter(torch.empty(n_experts, d_model))
        self.w_gate_EFD = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_up_EFD = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.w_down_EDF = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.shared = SharedExpert(d_model, d_expert) if shared_expert else None

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (weights_TK, experts_TK, lb_loss, z_loss); routing runs in fp32."""
        E, K = self.n_experts, self.top_k
        T = x_TD.shape[0]
        # fp32 even under autocast: top-k ties and the softmax tail are precision-sensitive.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.w_router_ED.float().T
        probs_TE = logits_TE.softmax(dim=-1)
        w_TK, idx_TK = probs_TE.topk(K, dim=-1)
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)

        counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
        f_E = counts_E / (T * K)
        P_E = probs_TE.mean(dim=0)
        lb_loss = E * (f_E * P_E).sum()
        z_loss = (torch.logsumexp(logits_TE, dim=-1) - math.log(E)).square().mean()
        return w_TK, idx_TK, lb_loss, z_loss

    def experts(self, x_TD: Tensor, w_TK: Tensor, idx_TK: Tensor) -> Tensor:
        """Gather the tokens of each expert, run it once on them, scatter back.

        Costs only top_k experts per token (a dense einsum would cost all E). Slots are
        un-permuted with a gather and summed over k, never index_add: that is
        deterministic on every device, which the swarm's bit-identical state needs.
        """
        T, K = idx_TK.shape
        flat_S = idx_TK.reshape(-1)  # S = T*K routing slots, slot s belongs to token s // K
        order_S = torch.argsort(flat_S, stable=True)
        counts = torch.bincount(flat_S, minlength=self.n_experts).tolist()
        x_SD = x_TD.index_select(0, order_S // K)

        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe_ND = x_SD[start : start + n]
            h_NF = F.silu(xe_ND @ self.w_gate_EFD[e].T) * (xe_ND @ self.w_up_EFD[e].T)
            outs.append(h_NF @ self.w_down_EDF[e].T)
            start += n
        y_SD = torch.cat(outs, dim=0)

        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_TKD = y_SD.index_select(0, inverse_S).view(T, K, -1)
        y_TD = (y_TKD * w_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)
        return y_TD

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        w_TK, idx_TK, lb_loss, z_loss = self.route(x_TD)
        y_TD = self.experts(x_TD, w_TK, idx_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD, lb_loss, z_loss
