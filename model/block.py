"""The decoder block: h + MLA(norm(h)), then + FFN(norm(.)) where FFN is a dense SwiGLU or DeepSeekMoE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import MLA, LatentCache
from model.config import ModelConfig
from model.documents import Documents
from model.mlp import SwiGLU
from model.moe import MoE
from model.norm import RMSNorm
from model.rope import RotaryEmbedding


@dataclass
class BlockAux:
    """Side outputs of a block for one microbatch: routed-token counts [E] and the balance loss (MoE only)."""

    counts: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class DecoderBlock(nn.Module):
    """h [B, S, hidden] -> (h [B, S, hidden], BlockAux). HF names: input_layernorm, self_attn,
    post_attention_layernorm, mlp.

    With activation checkpointing the block's inside is recomputed in backward; the router counts are taken
    from the first (recorded) forward only, because they leave the checkpointed function as outputs and are
    accumulated here, outside it.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile_regions)
        self.self_attn = MLA(cfg, rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.compile_regions)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp: nn.Module = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    # ---- sub-steps ---------------------------------------------------------------------------------
    def attention(self, h: torch.Tensor, documents: Documents | None = None) -> torch.Tensor:
        """Residual stream after attention: h + MLA(norm(h))."""
        return h + self.self_attn(h, documents, norm=self.input_layernorm)

    def ffn_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The FFN's input norm. Under selective recompute it reruns in backward (the report recomputes every
        RMSNorm): only h is kept, not its fp32 copy and the normed result (3x h's bytes in bf16)."""
        if self.cfg.selective_recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self.post_attention_layernorm, h, use_reentrant=False, preserve_rng_state=False)
        return self.post_attention_layernorm(h)

    def ffn(self, h: torch.Tensor) -> tuple[torch.Tensor, BlockAux]:
        x = self.ffn_norm(h)
        if not self.is_moe:
            return h + self.mlp(x), BlockAux()
        y, routing = self.mlp(x)
        return h + y, BlockAux(counts=routing.counts, balance_loss=routing.balance_loss)

    def _inner(self, h: torch.Tensor, documents: Documents | None) -> tuple[torch.Tensor, BlockAux]:
        return self.ffn(self.attention(h, documents))

    def forward(self, h: torch.Tensor, documents: Documents | None = None) -> tuple[torch.Tensor, BlockAux]:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            h, aux = checkpoint(self._inner, h, documents, use_reentrant=False)
        else:
            h, aux = self._inner(h, documents)
        if self.is_moe and self.training and aux.counts is not None:
            self.mlp.gate.step_counts += aux.counts
        return h, aux

    def forward_cached(self, h: torch.Tensor, cache: LatentCache, start: int) -> torch.Tensor:
        """Inference with the compressed KV cache (absorbed MLA); no counts, no balance loss."""
        h = h + self.self_attn.forward_cached(self.input_layernorm(h), cache, start)
        return self.ffn(h)[0]
