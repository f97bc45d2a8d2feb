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


if __name__ == "__main__":
    sys.exit(main())
