"""Ulysses context parallelism: the all-to-alls that move attention between sequence and head sharding.

model/sequence_shard.py says what the model does with them. Why Ulysses and not ring attention: MLA's queries,
keys and values are per-token projections, so after one all-to-all each rank holds whole sequences for H/N of
the heads and runs ordinary attention (causal, or the packed-document mask, which needs the whole sequence's
boundaries: every rank has them, the reader gives each CP rank the whole sample). Its cost per layer is two
all-to-alls in which a rank sends (N - 1) / N of its B x S/N x H x (2 d_qk + d_v) query/key/value values and of
its output, so its traffic falls as 1/N; the 128 heads of DeepSeek-V3 divide by any practical N. Ring attention
would pass K/V blocks around N - 1 times and needs its own causal load balancing. The MTP modules' shifted
tokens are token-local inputs (each rank reads the whole sample), so nothing crosses ranks but attention.

Layout of one all-to-all (even splits over the group's N ranks):
    to_heads:    [B, S/N, H, d] -> chunks by head group j -> rank j; received chunks stack by source rank,
                 which is the sequence order: [B, S, H/N, d]
    to_sequence: the inverse; each one's backward is the other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _exchange(x: torch.Tensor, group: Any, n: int) -> torch.Tensor:
    """all_to_all_single of x split evenly along dim 0 into n chunks (chunk j to rank j)."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _to_heads(x: torch.Tensor, group: Any, n: int) -> torch.Tensor:
    b, s, h, d = x.shape
    chunks = x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4)  # [n (head group), B, s, H/n, d]
    got = _exchange(chunks, group, n)  # [n (source rank = sequence part), B, s, H/n, d]
    return got.permute(1, 0, 2, 3, 4).reshape(b, n * s, h // n, d)


def _to_sequence(x: torch.Tensor, group: Any, n: int) -> torch.Tensor:
    b, full, hn, d = x.shape
    s = full // n
    chunks = x.reshape(b, n, s, hn, d).permute(1, 0, 2, 3, 4)  # [n (sequence part), B, s, H/n, d]
    got = _exchange(chunks, group, n)  # [n (source rank = head group), B, s, H/n, d]
    return got.permute(1, 2, 0, 3, 4).reshape(b, s, n * hn, d)


class _Exchange(torch.autograd.Function):
    """One of the two all-to-alls; its backward is the other (they are inverse permutations)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any, n: int, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.n, ctx.to_heads = group, n, to_heads
        return (_to_heads if to_heads else _to_sequence)(x, group, n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (_to_sequence if ctx.to_heads else _to_heads)(grad, ctx.group, ctx.n), None, None, None


class UlyssesExchange:
    """model/sequence_shard.HeadExchange over a CP process group of `size` ranks."""

    def __init__(self, group: Any, size: int) -> None:
        self.group, self.size = group, size

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] % self.size:
            raise ValueError(f"{x.shape[2]} heads do not split over cp={self.size} ranks")
        return _Exchange.apply(x, self.group, self.size, True)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return _Exchange.apply(x, self.group, self.size, False)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out
