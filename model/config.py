"""ModelConfig: every hyper-parameter of a DeepSeek-V3-style network, validated.

Field names follow the Hugging Face `deepseek_v3` config where one exists, so export and import are a
rename-free copy. The rope scaling block is kept flat (``rope_*`` fields) so Hydra can override each key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key and the fix."""


@dataclass
class ModelConfig:
    # sizes
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    intermediate_size: int = 256  # dense FFN width (first_k_dense_replace layers)
    # MLA
    num_attention_heads: int = 4
    q_lora_rank: int | None = 64  # None: plain q projection
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 64
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # load balancing
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free bias update
    seq_aux_alpha: float = 1e-4  # weight of the complementary sequence-wise balance loss (0 disables)
    # multi-token prediction
    num_nextn_predict_layers: int = 1  # MTP depth D (0 disables)
    mtp_loss_weight: float = 0.3  # lambda; each of the D losses is weighted lambda / D
    # positions
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling_type: str = "none"  # "none" | "yarn"
    rope_factor: float = 1.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    # misc
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    activation_checkpointing: bool = False  # recompute each whole block in backward (keeps only its input)
    # the report's selective recompute: the attention core's results are kept, the RMSNorms, MLA projections and
    # RoPE run again in backward (model/attention.py, model/block.py); the rest of the block keeps its activations
    selective_recompute: bool = False
    # the output heads' cross-entropy over chunks of tokens without keeping their logits (model/head_loss.py):
    # no [tokens, vocab] activations, one more head GEMM in backward
    chunked_head_loss: bool = False
    # regional torch.compile of the elementwise chains (RMSNorm, RoPE, the heads' cross-entropy; model/compiled.py):
    # needs a C++ compiler on CPU, Triton on CUDA; the first step pays the compilation
    compile_regions: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    # free-form name of the preset, carried into reports
    name: str = field(default="custom")

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace if self.n_routed_experts > 0 else 0

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling_type == "yarn" and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale = scale * m * m
        return scale

    # ---- validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{key}: {msg}")

        for key in (
            "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        ):
            need(getattr(self, key) > 0, key, f"must be a positive integer, got {getattr(self, key)}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             f"must be positive or null (plain q projection), got {self.q_lora_rank}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"RoPE rotates pairs, so it must be even, got {self.qk_rope_head_dim}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be within [0, num_hidden_layers={self.num_hidden_layers}], got {self.first_k_dense_replace}")
        need(self.n_routed_experts >= 0, "n_routed_experts", "must be >= 0 (0 makes every layer dense)")
        if self.n_routed_experts > 0:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.n_group >= 1, "n_group", f"must be >= 1, got {self.n_group}")
            need(self.n_routed_experts % self.n_group == 0, "n_routed_experts",
                 f"{self.n_routed_experts} experts do not split into n_group={self.n_group} equal groups; "
                 "make n_routed_experts a multiple of n_group")
            need(self.n_group == 1 or self.experts_per_group >= 2, "n_group",
                 f"group ranking sums each group's top-2 scores, so every group needs >= 2 experts "
                 f"(n_routed_experts/n_group = {self.experts_per_group}); lower n_group")
            need(1 <= self.topk_group <= self.n_group, "topk_group",
                 f"must be within [1, n_group={self.n_group}], got {self.topk_group}")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must be within [1, n_routed_experts={self.n_routed_experts}], got {self.num_experts_per_tok}")
            need(self.topk_group * self.experts_per_group >= self.num_experts_per_tok, "topk_group",
                 f"topk_group x experts_per_group = {self.topk_group * self.experts_per_group} is fewer than "
                 f"num_experts_per_tok={self.num_experts_per_tok}; raise topk_group")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        need(not (self.selective_recompute and self.activation_checkpointing), "selective_recompute",
             "activation_checkpointing already recomputes the whole block; set only one of the two (presets such as "
             "dsv3_671b turn checkpointing on: add model.activation_checkpointing=false)")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0 (0 disables MTP)")
        need(self.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")
        need(self.seq_aux_alpha >= 0, "seq_aux_alpha", "must be >= 0")
        need(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
        need(self.rope_scaling_type in ("none", "yarn"), "rope_scaling_type",
             f"must be 'none' or 'yarn', got {self.rope_scaling_type!r}")
        if self.rope_scaling_type == "yarn":
            need(self.rope_factor >= 1.0, "rope_factor", f"YaRN factor must be >= 1, got {self.rope_factor}")
            need(self.rope_original_max_position_embeddings > 0, "rope_original_max_position_embeddings",
                 "must be positive")
            need(self.rope_beta_fast > self.rope_beta_slow, "rope_beta_fast", "must exceed rope_beta_slow")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.initializer_range > 0, "initializer_range", "must be positive")
        need(0 <= self.bos_token_id < self.vocab_size and 0 <= self.eos_token_id < self.vocab_size,
             "eos_token_id", f"bos/eos ids must lie inside the vocabulary of {self.vocab_size}")

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: unknown model key; known keys are listed in model/config.py")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: model config file not found; pass a file such as conf/model/tiny.yaml")
        data = yaml.safe_load(path.read_text()) or {}
        data.pop("_target_", None)
        return cls.from_dict(data)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
