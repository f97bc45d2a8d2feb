"""Validation: LM loss and perplexity, MTP loss, and the MTP acceptance rate, summed over data-parallel ranks.

MTP acceptance (teacher-forced): at position i, MTP module 1 drafts token i+2 (argmax of its logits); the
draft is accepted when it equals the main model's own greedy choice at position i+1, the prediction the
speculative decoder verifies it against. The rate is accepted drafts over positions with a valid target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.documents import combine_masks
from model.transformer import MicroBatch
from parallel.step_schedule import StepSchedule


def microbatch_sums(mb: MicroBatch, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[lm loss sum, lm tokens, mtp loss sum, mtp tokens, accepted drafts, draft positions] of one scored
    microbatch (its logits kept in `mb`)."""
    sums = torch.zeros(6, dtype=torch.float64)
    seq = mb.seq_len
    a, b = mb.span if mb.span is not None else (0, seq)  # the positions this rank scored (context parallelism)
    lm_mask = combine_masks(mask, mb.documents, seq, 1)[:, a:b]  # padding, and targets in another document
    lm = F.cross_entropy(mb.logits.float().flatten(0, 1), tokens[:, a + 1 : b + 1].flatten(), reduction="none")
    sums[0] += float((lm * lm_mask.flatten()).sum())
    sums[1] += float(lm_mask.sum())
    if mb.mtp_logits:
        mtp_mask = combine_masks(mask, mb.documents, seq, 2)[:, a:b]
        mtp = F.cross_entropy(mb.mtp_logits[0].float().flatten(0, 1), tokens[:, a + 2 : b + 2].flatten(),
                              reduction="none")
        sums[2] += float((mtp * mtp_mask.flatten()).sum())
        sums[3] += float(mtp_mask.sum())
        draft = mb.mtp_logits[0][:, :-1].argmax(-1)  # drafts of tokens 2..seq
        greedy = mb.logits[:, 1:].argmax(-1)  # the main model's choices for the same tokens
        valid = mtp_mask[:, :-1] * lm_mask[:, 1:]
        sums[4] += float(((draft == greedy).double() * valid.double()).sum())
        sums[5] += float(valid.sum())
    return sums


@torch.no_grad()
def evaluate_schedule(schedule: StepSchedule, batches: Iterable[dict[str, torch.Tensor]],
                      group: Any = None) -> dict[str, float]:
    """Every schedule the same way: its forward-only pass scores each microbatch on the rank that computes its
    loss. The list is padded with fully masked copies up to a count the schedule accepts."""
    real = list(batches)
    sums = torch.zeros(6, dtype=torch.float64)
    if real:
        count = schedule.eval_microbatches(len(real))
        padded = real + [{**real[0], "loss_mask": torch.zeros_like(real[0]["loss_mask"])}
                         for _ in range(count - len(real))]

        def score(index: int, mb: MicroBatch) -> None:
            if index < len(real):
                sums.add_(microbatch_sums(mb, mb.tokens, mb.loss_mask.float()))

        schedule.forward_only(padded, on_last_stage=score)
    return summarize(sums, group)


def summarize(sums: torch.Tensor, group: Any = None) -> dict[str, float]:
    """Sum over ranks, then the loss, perplexity and acceptance rate."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    out: dict[str, float] = {}
    if sums[1] > 0:
        out["lm_loss"] = float(sums[0] / sums[1])
        out["ppl"] = math.exp(min(out["lm_loss"], 50.0))
        out["tokens"] = float(sums[1])
    if sums[3] > 0:
        out["mtp_loss"] = float(sums[2] / sums[3])
    if sums[5] > 0:
        out["mtp_acceptance"] = float(sums[4] / sums[5])
    return out
