"""Context parallelism as the model sees it: this rank holds one contiguous part of every sequence.

With `parallel.cp = N` each sequence of S positions is split into N parts of S / N; rank r of the CP group holds
positions [r S / N, (r + 1) S / N) of every sample (its inputs, and the targets of those inputs). Everything but
attention is token-local. Attention is Ulysses-style: an all-to-all turns [B, S/N, H, d] (all heads, part of
the sequence) into [B, S, H/N, d] (part of the heads, the whole sequence), attention runs as on one rank, and
the inverse all-to-all brings the output back. MLA fits it: queries, keys and values are per-token projections
of the local tokens (the shared rope key is expanded to every head first), and its 128 heads divide by any
practical N. Losses stay exact: each rank's loss is its part of the global token mean (sum over its targets /
the count over the whole group), so the mean over the group, which the data-parallel gradient average takes,
is the single-process loss; the sequence-wise balance loss uses the whole sequence's expert counts.

The model only holds the interface: the collectives live in parallel/context_parallel.py (model/ stays free of
torch.distributed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class HeadExchange(Protocol):
    """The collectives of a CP group (parallel/context_parallel.py implements them)."""

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S/N, H, d] (this rank's positions, all heads) -> [B, S, H/N, d] (all positions, its heads)."""

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: [B, S, H/N, d] -> [B, S/N, H, d]."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group of a tensor that carries no gradient (counts)."""


@dataclass
class SequenceShard:
    """Rank `rank` of `size` holds the `rank`-th of `size` equal parts of every sequence."""

    rank: int
    size: int
    exchange: HeadExchange

    def span(self, seq_len: int) -> tuple[int, int]:
        """[start, end) of this rank's positions in a sequence of seq_len."""
        if seq_len % self.size:
            raise ValueError(f"seq_len={seq_len} does not split into cp={self.size} equal parts")
        part = seq_len // self.size
        return self.rank * part, (self.rank + 1) * part


def span(shard: SequenceShard | None, seq_len: int) -> tuple[int, int]:
    """This rank's positions [start, end) of a sequence (the whole sequence without context parallelism)."""
    return (0, seq_len) if shard is None else shard.span(seq_len)


def shard_sequences(module: torch.nn.Module, shard: SequenceShard | None) -> None:
    """Make every piece of `module` that reads positions (embedding, attention, router, head) work on `shard`."""
    for m in module.modules():
        if hasattr(m, "sequence_shard"):
            m.sequence_shard = shard
