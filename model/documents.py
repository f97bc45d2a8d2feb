"""Packed documents: which tokens of a sample belong together (data.document_mask, docs/long_context.md).

A packed sample concatenates documents. By default (DeepSeek-V3 pre-trains this way) attention runs across their
boundaries. With document masking the reader also gives each token its document's index inside the sample
(`segments`, [B, S + 1 + D] like the tokens) and, when RoPE positions restart per document, each token's position
inside its document (`positions`). Then:

- attention is causal *and* within one document: a block-diagonal boolean mask for SDPA;
- a target that lies in another document than its input is no target: the last token of a document (its EOS)
  does not predict the next document's first token, and MTP depth k at position t (target t + 1 + k) is dropped
  when t + 1 + k is in the next document. MTP's merged input at such a position does read the next document's
  token embedding; only positions without a target do, and causality keeps them from every position that has one;
- RoPE rotates by the in-document position when `positions` is given (mathematically the attention scores only see
  relative positions, so this changes rounding, not the function, unless YaRN's scaling depends on the length).

So the logits of a packed sample equal those of each of its documents run alone (tests/model/test_documents.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Documents:
    """The document structure of one microbatch, built once and shared by every block that reads it."""

    segments: torch.Tensor  # [B, S + 1 + D] document index of each sample token (any integers, equal = same doc)
    positions: torch.Tensor | None = None  # [B, S + 1 + D] position inside the document, or None: 0..L-1
    _masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def attention_mask(self, seq_len: int) -> torch.Tensor:
        """Bool [B, 1, S, S]: query t sees key u iff u <= t and both are in one document (cached per length)."""
        mask = self._masks.get(seq_len)
        if mask is None:
            seg = self.segments[:, :seq_len]
            same = seg[:, :, None] == seg[:, None, :]
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=seg.device).tril()
            mask = self._masks[seq_len] = (same & causal)[:, None]
        return mask

    def rope_positions(self, seq_len: int) -> torch.Tensor | None:
        """Long [B, S]: the RoPE position of each input, or None for 0..S-1."""
        return None if self.positions is None else self.positions[:, :seq_len].long()

    def target_mask(self, seq_len: int, offset: int) -> torch.Tensor:
        """Float [B, S]: 1 where input t and its target t + offset are in one document."""
        seg = self.segments
        return (seg[:, offset : seq_len + offset] == seg[:, :seq_len]).float()


def combine_masks(loss_mask: torch.Tensor | None, documents: Documents | None, seq_len: int,
                  offset: int) -> torch.Tensor | None:
    """The target mask of the tokens at `offset` (1: main head, k + 1: MTP depth k) given both masks."""
    mask = None if loss_mask is None else loss_mask[:, offset : seq_len + offset]
    if documents is None:
        return mask
    doc = documents.target_mask(seq_len, offset)
    return doc if mask is None else mask * doc.to(mask.dtype)
