"""DeepSeek-V3 router: sigmoid affinities, bias-adjusted group-limited top-k, auxiliary-loss-free balancing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.sequence_shard import SequenceShard


@dataclass
class Routing:
    """The routing decision for T tokens: experts [T, K] (long), gates [T, K] (fp32), counts [E] (long)."""

    experts: torch.Tensor
    gates: torch.Tensor
    counts: torch.Tensor
    balance_loss: torch.Tensor | None = None


class _Fp32Logits(torch.autograd.Function):
    """x W^T computed in fp32 for x, W of any dtype, keeping x and W for the backward as they are: autograd's
    `linear(x.float(), W.float())` would keep x's fp32 copy, twice a bf16 activation's bytes. The backward
    runs autograd's own products (so the gradients are the same bits)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return F.linear(x.float(), w.float())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_x = grad.mm(w.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = x.float().t().mm(grad).t().to(w.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


class Router(nn.Module):
    """x [B, S, hidden] -> Routing. HF names: `weight`, `e_score_correction_bias`.

    Selection ranks s + b (s = sigmoid affinity, b = per-expert bias, no gradient); groups are ranked by the
    sum of their two best s + b and all but `topk_group` groups masked to -inf. Gates are the *unbiased* s of
    the chosen experts, normalised to sum 1 and scaled by `routed_scaling_factor`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.initializer_range)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # tokens routed to each expert since the last bias update (all microbatches of the optimizer step)
        self.register_buffer("step_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.float64), persistent=False)
        self.sequence_shard: SequenceShard | None = None  # context parallelism: the balance loss's sequence

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid affinities in fp32, [T, E]."""
        return _Fp32Logits.apply(x, self.weight).sigmoid()

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K] chosen on scores + bias under the group limit."""
        cfg = self.cfg
        biased = scores + self.e_score_correction_bias
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            grouped = biased.view(biased.shape[0], cfg.n_group, cfg.experts_per_group)
            # sum of each group's two best as max + max-with-the-winner-masked: the same values as
            # topk(2).values.sum(-1) at a third of the cost (topk on rows of a few elements is slow on CPU)
            best, best_idx = grouped.max(-1)
            group_rank = best + grouped.scatter(-1, best_idx.unsqueeze(-1), float("-inf")).amax(-1)  # [T, G]
            keep = group_rank.topk(cfg.topk_group, dim=-1).indices
            group_mask = torch.ones_like(group_rank, dtype=torch.bool).scatter_(1, keep, False)
            biased = grouped.masked_fill(group_mask[..., None], float("-inf")).view(-1, self.n_experts)
        return biased.topk(self.top_k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> Routing:
        b, s, h = x.shape
        scores = self.scores(x.reshape(b * s, h))
        experts = self.select(scores.detach())
        gates = scores.gather(1, experts)
        if self.cfg.norm_topk_prob:
            gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
        gates = gates * self.cfg.routed_scaling_factor
        counts = torch.bincount(experts.flatten(), minlength=self.n_experts)
        balance = None
        if self.training:
            balance = self.sequence_balance_loss(scores.view(b, s, self.n_experts), experts.view(b, s, self.top_k))
        return Routing(experts=experts, gates=gates, counts=counts, balance_loss=balance)

    def sequence_balance_loss(self, scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor | None:
        """alpha * sum_i f_i P_i per sequence, averaged over sequences (the report's complementary loss).

        f_i = N_r / (K_r T) * (tokens of the sequence sent to i), no gradient;
        P_i = mean over the sequence of s_i / sum_j s_j.
        """
        alpha = self.cfg.seq_aux_alpha
        if alpha == 0:
            return None
        b, s, e = scores.shape
        one_hot_counts = torch.zeros(b, e, device=scores.device, dtype=scores.dtype)
        chosen = experts.reshape(b, -1)
        one_hot_counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=scores.dtype))
        shard, scale = self.sequence_shard, 1
        if shard is not None:  # the sequence is split over the CP group: its counts are the group's sum, and this
            # rank's P is its positions' part of the sequence mean, scaled so the group's mean is the whole loss
            one_hot_counts = shard.exchange.sum(one_hot_counts)
            s, scale = s * shard.size, shard.size
        f = one_hot_counts * (e / (self.top_k * s))
        normed = scores / scores.sum(-1, keepdim=True)
        p = normed.mean(1) if shard is None else normed.sum(1) / s  # a part of the sequence's mean under cp
        return alpha * scale * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor | None = None, gamma: float | None = None) -> None:
        """b += gamma * sign(mean load - load): underloaded experts gain, overloaded lose. Resets step_counts.

        Call once per optimizer step with the counts of the whole global batch (the trainer all-reduces
        `step_counts` over data/expert-parallel ranks first).
        """
        counts = self.step_counts if counts is None else counts
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        load = counts.to(torch.float64)
        delta = torch.sign(load.mean() - load).to(self.e_score_correction_bias.dtype)
        self.e_score_correction_bias.add_(gamma * delta)
        self.step_counts.zero_()


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = max load / mean load - 1 (0 is perfectly balanced)."""
    load = counts.to(torch.float64)
    mean = load.mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0
