"""Rotary position embedding with DeepSeek's interleaved pairs and YaRN context extension.

Pairs are (x0, x1), (x2, x3), ...; pair i turns by angle pos * inv_freq[i]. The rotated output is laid out
as [all first members ; all second members]: queries and keys get the same permutation, so q.k is unchanged
and the output equals the interleaved formulation's for attention (this is also how transformers does it).
"""

from __future__ import annotations

import math

import torch

from model.config import ModelConfig, yarn_mscale


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the cos/sin magnitude factor (YaRN's attention_factor)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # explicit CPU: the model may be built under a meta-device context (pipeline ranks)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    if cfg.rope_scaling_type != "yarn":
        return inv_freq, 1.0
    factor = cfg.rope_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attention_factor = yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        orig = cfg.rope_original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: high-frequency dims keep their frequency; 0: low-frequency dims are interpolated
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """Caches cos/sin tables [positions, rope_dim/2] per device; not a module, so it never enters state_dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.inv_freq, self.attention_factor = yarn_inv_freq(cfg)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            size = max(length, 2 * cached[0].shape[0] if cached is not None else length)
            pos = torch.arange(size, dtype=torch.float32, device="cpu")
            angles = pos[:, None] * self.inv_freq[None, :]
            cos = (angles.cos() * self.attention_factor).to(device)
            sin = (angles.sin() * self.attention_factor).to(device)
            cached = self._tables[device] = (cos, sin)
        return cached

    def cos_sin(self, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.tables(start + length, device)
        return cos[start : start + length], sin[start : start + length]


    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, S, rope_dim/2] of per-token positions [B, S] (documents whose positions restart): each
        position is below S (a document's position never exceeds the token's index), so no host sync is needed."""
        cos, sin = self.tables(positions.shape[-1], positions.device)
        return cos[positions], sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., seq, heads, rope_dim] (interleaved pairs); cos/sin [seq, rope_dim/2], or [B, seq, rope_dim/2]
    for per-sample positions."""
    cos = cos.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
