"""Parameter report: `python -m model.info conf/model/NAME.yaml` prints JSON.

Counts come from the real modules, built on the meta device (no memory), grouped by component.
Conventions (those of the DeepSeek-V3 report, which quotes 671B total / 37B activated):
- `total` is the main model: embedding + decoder layers + final norm + output head. MTP modules are
  reported separately (`mtp`, their own parameters only: the embedding and head are shared), and
  `total_with_mtp` adds them (V3's released checkpoint: 671B + 14B).
- `activated_per_token` is what one token's matmuls use in the main model: every parameter except the
  routed experts, plus top_k / n_routed of them. The embedding table is left out (a token reads one row;
  a lookup is not a matmul); the output head is in. For dsv3_671b this is 36.63B (the report: "37B").
- `activated_per_token_training` adds the MTP modules' activated parameters (a training token also runs
  them): 37.31B for dsv3_671b. `activated_with_embedding_table` counts the whole table: 37.55B.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch

from model.config import ConfigError, ModelConfig


def component_of(name: str) -> str:
    if name.startswith("head.mtp."):
        return "mtp"
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head.lm_head"):
        return "head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


def parameter_report(cfg: ModelConfig) -> dict:
    from model.transformer import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg)
    by_component: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        by_component[component_of(name)] += p.numel()
    mtp_routed = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("head.mtp.") and ".mlp.experts." in n
    )
    total = sum(v for k, v in by_component.items() if k != "mtp")
    routed = by_component.get("routed_experts", 0)
    frac = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
    embedding = by_component["embedding"]
    activated = total - embedding - routed * (1 - frac)
    mtp = by_component.get("mtp", 0)
    mtp_activated = mtp - mtp_routed * (1 - frac)
    return {
        "name": cfg.name,
        "total": total,
        "activated_per_token": int(activated),
        "activated_per_token_training": int(activated + mtp_activated),
        "activated_with_embedding_table": int(activated + embedding),
        "mtp": mtp,
        "total_with_mtp": total + mtp,
        "total_billions": round(total / 1e9, 3),
        "activated_billions": round(activated / 1e9, 3),
        "components": dict(sorted(by_component.items())),
        "counting": (
            "total: main model incl. embedding and head, MTP excluded (reported as mtp, its own parameters; "
            "embedding and head are shared); activated: matmul parameters one token uses in the main model "
            "(embedding table excluded, head included)"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m model.info conf/model/NAME.yaml", file=sys.stderr)
        return 2
    try:
        cfg = ModelConfig.from_yaml(argv[0])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(parameter_report(cfg), indent=2))
    return 0

# ---- model FLOPs ---------------------------------------------------------------------------------------


def attention_params(cfg: ModelConfig) -> int:
    """MLA projection weights of one layer (all used by every token in the expanded training form)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    q_out = heads * cfg.qk_head_dim
    q = h * q_out if cfg.q_lora_rank is None else h * cfg.q_lora_rank + cfg.q_lora_rank * q_out
    kv_a = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = heads * cfg.v_head_dim * h
    return q + kv_a + kv_b + o


def ffn_params(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
    """Matmul weights one token passes through in the FFN of layer `layer_idx` (SwiGLU: 3 matrices)."""
    h = cfg.hidden_size
    if not cfg.is_moe_layer(layer_idx):
        return {"dense_mlp": 3 * h * cfg.intermediate_size}
    expert = 3 * h * cfg.moe_intermediate_size
    return {
        "router": h * cfg.n_routed_experts,  # scores for every expert, before top-k
        "shared_experts": cfg.n_shared_experts * expert,
        "routed_experts": cfg.num_experts_per_tok * expert,  # only the top-k are computed
    }


def activated_params_breakdown(cfg: ModelConfig, include_mtp: bool = True) -> dict[str, int]:
    """Matmul parameters touched per token, by part. The embedding lookup is excluded (a gather, no FLOPs).

    The output head is counted once per use: the main head plus once per MTP module, which reuses it.
    """
    parts = {"attention": 0, "dense_mlp": 0, "router": 0, "shared_experts": 0, "routed_experts": 0,
             "head": cfg.hidden_size * cfg.vocab_size, "mtp": 0}
    for i in range(cfg.num_hidden_layers):
        parts["attention"] += attention_params(cfg)
        for k, v in ffn_params(cfg, i).items():
            parts[k] += v
    if include_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            layer = cfg.num_hidden_layers + k  # MTP blocks continue the layer numbering (so they are MoE)
            parts["mtp"] += (
                2 * cfg.hidden_size * cfg.hidden_size  # eh_proj
                + attention_params(cfg)
                + sum(ffn_params(cfg, layer).values())
                + cfg.hidden_size * cfg.vocab_size  # the shared head, applied again
            )
    return parts


def activated_params_per_token(cfg: ModelConfig, include_mtp: bool = True) -> int:
    """Sum of `activated_params_breakdown`: the N in "6 N FLOPs per token"."""
    return sum(activated_params_breakdown(cfg, include_mtp).values())


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Score (QK^T) and value (PV) FLOPs per token, forward + backward, causal, all layers incl. MTP blocks.

    Forward per token and layer: 2 * heads * (qk_head_dim + v_head_dim) * seq_len / 2 (a query sees on average
    half the sequence); backward is twice the forward, so x3.
    """
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    per_layer_fwd = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 3.0 * layers * per_layer_fwd


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token: 6 x activated matmul params + causal attention (docs/metrics.md).

    Model FLOPs, not hardware FLOPs: activation recompute is not counted, so MFU stays comparable across runs.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return 6.0 * activated_params_per_token(cfg) + attention_flops_per_token(cfg, seq_len)


if __name__ == "__main__":
    sys.exit(main())
