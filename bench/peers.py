"""Peers that are not dependencies: torchtitan's DeepSeek-V3 MoE, installed apart for the benchmarks.

torchtitan 0.3.0 is pure Python, but its declared dependencies (torchdata, tensorboard, wandb, datasets, ...)
pull a CUDA torch. `torchtitan_moe_module()` installs the pinned wheels below without their dependencies into
`build/peers/` (ignored by git, never on the runtime path) on first use and imports from there; the models
package needs only these at import. Nothing else in the project imports torchtitan.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from torch import nn

PEERS_DIR = Path(__file__).resolve().parent.parent / "build" / "peers"
TORCHTITAN = "torchtitan==0.3.0"
# what `torchtitan.models` imports, pinned to the versions this was checked with
TORCHTITAN_IMPORTS = ["tyro==1.0.17", "docstring-parser==0.18.0", "einops==0.8.2", "spmd_types==0.2.3",
                      "torch_checkpointing==0.1.1", "torchdata==0.11.0"]


def _install(target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), TORCHTITAN,
           *TORCHTITAN_IMPORTS]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install {TORCHTITAN}: {done.stderr.strip().splitlines()[-1:]}")


def torchtitan_moe_module() -> tuple[Any, str]:
    """(torchtitan.models.common.config_utils, version), installing torchtitan into build/peers if needed.
    Raises RuntimeError (one line) where it cannot be installed or imported."""
    target = PEERS_DIR / "torchtitan"
    if not (target / "torchtitan").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        _install(target)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    try:
        config_utils = importlib.import_module("torchtitan.models.common.config_utils")
    except Exception as e:  # noqa: BLE001 - any import failure makes the peer unavailable, said in one line
        raise RuntimeError(f"torchtitan does not import: {type(e).__name__}: {e}") from None
    return config_utils, TORCHTITAN.split("==")[1]


def torchtitan_moe(cfg: Any) -> nn.Module:
    """torchtitan's MoE layer (the one its DeepSeek-V3 model builds) for our ModelConfig: sigmoid scores,
    group-limited top-k, normalized and scaled gates, the bias-adjusted selection, shared experts; the token
    dispatcher of its `standard` backend (local dispatch at EP 1)."""
    cu, _ = torchtitan_moe_module()
    h, e, i, k = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    config = cu.make_moe_config(
        num_experts=e,
        router=cu.make_router_config(dim=h, num_experts=e, gate_param_init=None, top_k=k, score_func="sigmoid",
                                     num_expert_groups=cfg.n_group, num_limited_groups=cfg.topk_group,
                                     route_scale=cfg.routed_scaling_factor, route_norm=cfg.norm_topk_prob),
        routed_experts=cu.make_routed_experts_config(dim=h, hidden_dim=i, num_experts=e, top_k=k, param_init=None,
                                                     comm_backend="standard"),
        shared_experts=cu.make_ffn_config(dim=h, hidden_dim=i * cfg.n_shared_experts, w1_param_init=None,
                                          w2w3_param_init=None),
        load_balance_coeff=1e-3,
    )
    return config.build()


def copy_moe_weights_to_torchtitan(ours: nn.Module, theirs: nn.Module) -> None:
    """Ours -> torchtitan: our [E, 2I, H] gate_up splits into its w1 (gate) and w3 (up); down is its w2."""
    i = ours.experts.intermediate
    experts = theirs.routed_experts.inner_experts
    theirs.router.gate.weight.copy_(ours.gate.weight)
    theirs.expert_bias_E.copy_(ours.gate.e_score_correction_bias)
    experts.w1_EFD.copy_(ours.experts.gate_up_proj.weight[:, :i])
    experts.w3_EFD.copy_(ours.experts.gate_up_proj.weight[:, i:])
    experts.w2_EDF.copy_(ours.experts.down_proj.weight)
    theirs.shared_experts.w1.weight.copy_(ours.shared_experts.gate_proj.weight)
    theirs.shared_experts.w3.weight.copy_(ours.shared_experts.up_proj.weight)
    theirs.shared_experts.w2.weight.copy_(ours.shared_experts.down_proj.weight)


# our gradient -> torchtitan's, each a function of its module (gate_up is their w1 and w3 stacked)
TORCHTITAN_GRADS = {
    "gate.weight": lambda m: m.router.gate.weight.grad,
    "experts.gate_up_proj.weight": lambda m: _cat_experts(m),
    "experts.down_proj.weight": lambda m: m.routed_experts.inner_experts.w2_EDF.grad,
    "shared_experts.gate_proj.weight": lambda m: m.shared_experts.w1.weight.grad,
    "shared_experts.up_proj.weight": lambda m: m.shared_experts.w3.weight.grad,
    "shared_experts.down_proj.weight": lambda m: m.shared_experts.w2.weight.grad,
}


def _cat_experts(m: nn.Module) -> Any:
    import torch

    experts = m.routed_experts.inner_experts
    return torch.cat([experts.w1_EFD.grad, experts.w3_EFD.grad], dim=1)
