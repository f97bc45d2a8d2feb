"""The output head's cross-entropy without its logits (`model.chunked_head_loss`).

The LM and MTP heads' logits and log-probabilities are the largest activations of a step ([tokens, vocab] in
bf16 plus fp32: 256 KB per token at a 32K vocabulary, more than all decoder layers of the `small` preset).
Here the head's GEMM and the loss run over chunks of tokens: the forward keeps only each token's
log-sum-exp, and the backward recomputes a chunk's logits to form its gradient (softmax - one-hot), then
both GEMMs of that chunk. One more head GEMM (4 instead of 3), no [tokens, vocab] tensor kept. The per-token
losses are the unfused path's up to rounding (log-sum-exp minus the target's logit instead of log_softmax).
Targets must be valid token ids (masking goes through the loss mask, not an ignore index). The head's
weight-gradient comes out of this backward: under the zero-bubble split (model/gemm.py's deferred W) it runs
in B, not in the W pass. Plain GEMMs only: HeadPiece uses it where the head has plain numerics (it always
has: FP8 leaves the head in high precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk (64 MiB at 32K vocabulary): big GEMMs, bounded extra memory
MIN_CHUNK = 512  # tokens: every chunk reads the whole head weight, so fewer rows would make its GEMMs memory-bound


def chunk_tokens(vocab: int) -> int:
    return max(MIN_CHUNK, CHUNK_ELEMENTS // vocab)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """h [T, H], weight [V, H], targets [T] -> per-token losses [T] (fp32)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(losses)
        for s in range(0, h.shape[0], chunk):
            logits = F.linear(h[s:s + chunk], weight).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            losses[s:s + chunk] = lse[s:s + chunk] - target_logit
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # accumulated over chunks in fp32: a bf16 running sum would drop later chunks' contributions
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, h.shape[0], chunk):
            hc = h[s:s + chunk]
            d_logits = F.linear(hc, weight).float().sub_(lse[s:s + chunk, None]).exp_()  # softmax
            rows = torch.arange(d_logits.shape[0], device=d_logits.device)
            d_logits[rows, targets[s:s + chunk]] -= 1.0
            d_logits.mul_(grad[s:s + chunk, None])
            d_logits = d_logits.to(h.dtype)
            if grad_h is not None:
                torch.mm(d_logits, weight, out=grad_h[s:s + chunk])
            if grad_w is None:
                continue
            if hc.dtype == torch.float32:
                grad_w.addmm_(d_logits.t(), hc)
            else:  # the chunk's product in the GEMM's fast dtype (one rounding, as the unfused path's), summed in fp32
                grad_w.add_(torch.mm(d_logits.t(), hc))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def head_token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of `h @ weight^T` against `targets` (h [..., H], targets [...]) in fp32, shaped
    like `targets`, without keeping the logits."""
    flat = h.reshape(-1, h.shape[-1])
    losses = _ChunkedLinearCrossEntropy.apply(flat, weight, targets.reshape(-1), chunk_tokens(weight.shape[0]))
    return losses.view(targets.shape)
