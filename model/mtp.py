"""Multi-Token Prediction module k: predicts token t_{i+k+1} from h^{k-1}_i and the embedding of t_{i+k}.

input = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]) (embedding first, as HF and vLLM load it), one
decoder block, then shared_head.norm and the output head shared with the main model. The embedding and
head are passed in, not owned: they belong to the main model.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import LatentCache
from model.block import BlockAux, DecoderBlock
from model.config import ModelConfig
from model.documents import Documents
from model.gemm import Linear
from model.norm import RMSNorm
from model.rope import RotaryEmbedding


class SharedHeadNorm(nn.Module):
    """Holds `norm` so the HF name `shared_head.norm` maps one to one; the head itself is the main model's."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile_regions)


class MTPModule(nn.Module):
    """(h_prev [B, S, hidden], emb_next [B, S, hidden]) -> (h [B, S, hidden], BlockAux)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile_regions)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile_regions)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.block = DecoderBlock(cfg, layer_idx, rope)
        self.shared_head = SharedHeadNorm(cfg)

    def merge(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor,
                documents: Documents | None = None) -> tuple[torch.Tensor, BlockAux]:
        return self.block(self.merge(h_prev, emb_next), documents)

    def forward_cached(
        self, h_prev: torch.Tensor, emb_next: torch.Tensor, cache: LatentCache, start: int
    ) -> torch.Tensor:
        return self.block.forward_cached(self.merge(h_prev, emb_next), cache, start)
