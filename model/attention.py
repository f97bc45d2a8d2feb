"""Multi-head Latent Attention (MLA).

Training uses the expanded form: the compressed kv latent c_kv [B, S, kv_lora] is expanded per head by
kv_b_proj into k_nope and v, the rope key k_pe [B, S, rope] is shared by all heads, and causal attention runs
through scaled_dot_product_attention. Generation uses the absorbed form: kv_b_proj is folded into the query
and the output, so the cache holds only c_kv and k_pe per token (kv_lora + rope values instead of
heads x (nope + rope + v)). Both forms compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.activation_memory import note_kept_outside_autograd
from model.compiled import regional
from model.config import ModelConfig
from model.documents import Documents
from model.gemm import Linear
from model.norm import RMSNorm
from model.rope import RotaryEmbedding, apply_rope
from model.sequence_shard import SequenceShard

# SDPA's fused kernels: selective recompute keeps their results (output, softmax statistics) and reruns the rest
_ATTENTION_CORE_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable")
    if hasattr(torch.ops.aten, name)
)


def keep_attention_core(ctx: Any, op: object, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpoint policy: save the attention core's results, recompute everything else. What it keeps
    (the output [B, H, S, v] and the fp32 softmax statistics [B, H, S]) is reported to the activation counter,
    whose saved-tensor hooks do not see the policy's cache."""
    if op not in _ATTENTION_CORE_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if not ctx.is_recompute:
        q, v = args[0], args[2]
        rows = q.numel() // q.shape[-1]
        note_kept_outside_autograd(rows * (v.shape[-1] * q.element_size() + 4))
    return CheckpointPolicy.MUST_SAVE


def _keep_attention_core_contexts() -> tuple[object, object]:
    return create_selective_checkpoint_contexts(keep_attention_core)


@dataclass
class LatentCache:
    """Compressed KV cache of one layer: kv [B, max_len, kv_lora] (normed latent), pe [B, max_len, rope] (roped)."""

    kv: torch.Tensor
    pe: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> LatentCache:
        return cls(
            kv=torch.zeros(batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype),
            pe=torch.zeros(batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype),
        )


class MLA(nn.Module):
    """x [B, S, hidden] -> [B, S, hidden]. HF parameter names (q_a_proj, kv_a_proj_with_mqa, ...)."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.cfg = cfg
        self.rope = rope
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora = cfg.kv_lora_rank
        q_out = self.n_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, q_out)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, cfg.compile_regions)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, cfg.compile_regions)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size)
        self.softmax_scale = cfg.softmax_scale
        self.sequence_shard: SequenceShard | None = None  # context parallelism (model/sequence_shard.py)

    def _rope(self, start: int, s: int, device: torch.device,
              positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions [start, start + s) ([s, rope/2]), or of the given positions of the whole sequence
        [B, S] at those indices ([B, s, rope/2])."""
        if positions is None:
            return self.rope.cos_sin(start, s, device)
        cos, sin = self.rope.at(positions)
        return cos[:, start : start + s], sin[:, start : start + s]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on x [B, S, heads, rope], through torch.compile under `model.compile_regions`."""
        return regional(apply_rope, self.cfg.compile_regions, x.device)(x, cos, sin)

    def _query(self, x: torch.Tensor, start: int,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q_nope [B, S, H, nope], q_pe [B, S, H, rope] (rotated)."""
        b, s, _ = x.shape
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        cos, sin = self._rope(start, s, x.device, positions)
        return q_nope, self._rotate(q_pe, cos, sin)

    def _latent(self, x: torch.Tensor, start: int,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> c_kv [B, S, kv_lora] (normed), k_pe [B, S, rope] (rotated, shared by all heads)."""
        b, s, _ = x.shape
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope_dim], dim=-1)
        cos, sin = self._rope(start, s, x.device, positions)
        k_pe = self._rotate(k_pe.view(b, s, 1, self.rope_dim), cos, sin).view(b, s, self.rope_dim)
        return self.kv_a_layernorm(c_kv), k_pe

    def _qkv(self, x: torch.Tensor, norm: nn.Module | None, start: int,
             positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's norm (if given), the down- and up-projections, the latent norms and RoPE: x -> q, k, v
        [B, S, H, .] (v a view into the up-projection's output)."""
        if norm is not None:
            x = norm(x)
        b, s, _ = x.shape
        q_nope, q_pe = self._query(x, start, positions)
        c_kv, k_pe = self._latent(x, start, positions)
        kv = self.kv_b_proj(c_kv).view(b, s, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, s, self.n_heads, self.rope_dim)], dim=-1)
        return q, k, v

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None,
              total: int) -> torch.Tensor:
        """Attention over the whole sequence: q, k, v [B, S, H, .] of this rank's positions -> [B, S, H x v]."""
        b, s = q.shape[:2]
        shard = self.sequence_shard
        if shard is not None:  # one all-to-all for q, k and v: [B, S/N, H, .] -> [B, S, H/N, .]
            dq = q.shape[-1]
            q, k, v = shard.exchange.to_heads(torch.cat([q, k, v], dim=-1)).split([dq, dq, self.v_dim], dim=-1)
        # SDPA's flash kernel needs one head size for q, k and v; MLA's v is narrower (128 of 192 in DeepSeek-V3).
        # On CPU SDPA then falls back to its math kernel, which keeps every head's [S, S] probabilities for the
        # backward, so v gets zero columns (v and the output are kept H x 64 values wider per token instead; the
        # output's first v_dim columns are unchanged). On CUDA the memory-efficient kernel takes the narrow v, and
        # flash runs only in half precision without a mask: padding there buys flash's speed, and nothing else.
        half = q.dtype in (torch.float16, torch.bfloat16)
        pad = self.v_dim < q.shape[-1] and (q.device.type == "cpu" or (half and documents is None))
        v = F.pad(v, (0, q.shape[-1] - self.v_dim)) if pad else v.contiguous()  # fresh: the up-projection's
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # output is not kept through v
        if documents is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.attention_mask(total),
                                                 scale=self.softmax_scale)
        out = out[..., : self.v_dim].transpose(1, 2)
        if shard is not None:
            out = shard.exchange.to_sequence(out.contiguous())
        return out.reshape(b, s, self.n_heads * self.v_dim)

    def _attend(self, x: torch.Tensor, norm: nn.Module | None, start: int, positions: torch.Tensor | None,
                documents: Documents | None, total: int) -> torch.Tensor:
        return self._core(*self._qkv(x, norm, start, positions), documents, total)

    def forward(self, x: torch.Tensor, documents: Documents | None = None,
                norm: nn.Module | None = None) -> torch.Tensor:
        """Expanded form, causal over the whole sequence (training and scoring); with `documents`, causal inside
        each packed document (a boolean mask, which SDPA's CPU flash kernel and CUDA memory-efficient kernel
        take). Under context parallelism x holds this rank's positions; attention runs on its share of the
        heads over the whole sequence (model/sequence_shard.py). `norm`: the block's input RMSNorm, applied here
        so that selective recompute covers it.

        Selective recompute (`model.selective_recompute`, the DeepSeek-V3 report's): the norm, the projections,
        the latent norms, RoPE and the attention core form one checkpointed region whose only kept results are
        the attention core's (its output and softmax statistics, `keep_attention_core`). Its backward reruns the
        projections to rebuild q, k and v, so neither they nor the normed input, the latents and their norms are
        kept: only x, the core's output and the output projection's input are. Under context parallelism the
        region stops before the all-to-all (rebuilding q, k, v there would repeat it), so q, k, v are kept."""
        b, s, _ = x.shape
        shard = self.sequence_shard
        start, total = (0, s) if shard is None else (shard.rank * s, shard.size * s)
        positions = None if documents is None else documents.rope_positions(total)
        if not (self.cfg.selective_recompute and self.training and torch.is_grad_enabled()):
            out = self._attend(x, norm, start, positions, documents, total)
        elif shard is None:
            out = checkpoint(self._attend, x, norm, start, positions, documents, total, use_reentrant=False,
                             preserve_rng_state=False, context_fn=_keep_attention_core_contexts)
        else:
            q, k, v = checkpoint(self._qkv, x, norm, start, positions, use_reentrant=False, preserve_rng_state=False)
            out = self._core(q, k, v, documents, total)
        return self.o_proj(out)

    def forward_cached(self, x: torch.Tensor, cache: LatentCache, start: int) -> torch.Tensor:
        """Absorbed form: x holds positions [start, start + S); writes them into the cache and attends to
        positions [0, start + S)."""
        b, s, _ = x.shape
        end = start + s
        q_nope, q_pe = self._query(x, start)
        c_kv, k_pe = self._latent(x, start)
        cache.kv[:b, start:end] = c_kv
        cache.pe[:b, start:end] = k_pe
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_lora)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # fold the key up-projection into the query
        kv, pe = cache.kv[:b, :end], cache.pe[:b, :end]
        scores = torch.einsum("bshc,btc->bsht", q_lat, kv) + torch.einsum("bshr,btr->bsht", q_pe, pe)
        scores = scores.float() * self.softmax_scale
        query_pos = torch.arange(start, end, device=x.device)[:, None]
        key_pos = torch.arange(end, device=x.device)[None, :]
        scores = scores.masked_fill((key_pos > query_pos)[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(x.dtype)
        out_lat = torch.einsum("bsht,btc->bshc", probs, kv)
        out = torch.einsum("bshc,hdc->bshd", out_lat, w_uv)  # fold the value up-projection into the output
        return self.o_proj(out.reshape(b, s, self.n_heads * self.v_dim))
