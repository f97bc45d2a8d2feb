"""Peers that are not dependencies: torchtitan's DeepSeek-V3 (its MoE layer and its whole model), installed apart
for the benchmarks.

torchtitan 0.3.0 is pure Python, but its declared dependencies (torchdata, tensorboard, wandb, datasets, ...)
pull a CUDA torch. `torchtitan_moe_module()` installs the pinned wheels below without their dependencies into
`build/peers/` (ignored by git, never on the runtime path) on first use and imports from there; the models
package needs only these at import. Nothing else in the project imports torchtitan.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import warnings
from collections.abc import Iterator
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
    """(torchtitan.models.common.config_utils, version): torchtitan from the environment where it is installed
    there at the pinned version (a machine without network gets it from the GPU script's wheels), else from
    build/peers, installed there if needed. Raises RuntimeError (one line) where it cannot be installed or
    imported."""
    from importlib import metadata

    try:
        installed = metadata.version("torchtitan")
    except metadata.PackageNotFoundError:
        installed = None
    version = TORCHTITAN.split("==")[1]
    target = PEERS_DIR / "torchtitan"
    if installed != version:
        if not (target / "torchtitan").is_dir():
            target.mkdir(parents=True, exist_ok=True)
            _install(target)
        if str(target) not in sys.path:
            sys.path.insert(0, str(target))
    try:
        config_utils = importlib.import_module("torchtitan.models.common.config_utils")
    except Exception as e:  # noqa: BLE001 - any import failure makes the peer unavailable, said in one line
        raise RuntimeError(f"torchtitan does not import: {type(e).__name__}: {e}") from None
    return config_utils, version


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


def torchtitan_model(cfg: Any) -> nn.Module:
    """torchtitan's DeepSeek-V3 model (its own layer builder: MLA, dense then MoE layers, sigmoid group-limited
    routing, shared experts) for our ModelConfig without MTP, its inner attention swapped for its
    `ScaledDotProductAttention` (causal SDPA: the math of its default flex attention's block-causal mask on one
    unpacked document; flex attention has no CPU backward). RMSNorm eps and RoPE as in our config."""
    torchtitan_moe_module()
    attention = importlib.import_module("torchtitan.models.common.attention")
    common = importlib.import_module("torchtitan.models.common")
    dsv3 = importlib.import_module("torchtitan.models.deepseek_v3")
    rope = importlib.import_module("torchtitan.models.common.rope")
    if cfg.num_nextn_predict_layers or cfg.rope_scaling_type not in ("none", "yarn"):
        raise ValueError("torchtitan_model: MTP off and rope none|yarn only")
    layers = dsv3._build_dsv3_layers(
        n_layers=cfg.num_hidden_layers, n_dense_layers=cfg.first_k_dense_replace, dim=cfg.hidden_size,
        n_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        mscale=cfg.rope_mscale, dense_hidden_dim=cfg.intermediate_size, moe_hidden_dim=cfg.moe_intermediate_size,
        num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
        router_top_k=cfg.num_experts_per_tok, router_score_func="sigmoid", router_num_expert_groups=cfg.n_group,
        router_num_limited_groups=cfg.topk_group, router_route_scale=cfg.routed_scaling_factor,
        router_route_norm=cfg.norm_topk_prob, attn_backend="flex", moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=rope.ComplexRoPE.Config(
            dim=cfg.qk_rope_head_dim, max_seq_len=cfg.max_position_embeddings, theta=cfg.rope_theta,
            scaling=cfg.rope_scaling_type, rope_factor=cfg.rope_factor, beta_fast=cfg.rope_beta_fast,
            beta_slow=cfg.rope_beta_slow, original_seq_len=cfg.rope_original_max_position_embeddings),
    )
    for layer in layers:
        layer.attention.inner_attention = attention.ScaledDotProductAttention.Config()
    h, v = cfg.hidden_size, cfg.vocab_size
    model = dsv3.DeepSeekV3Model.Config(
        vocab_size=v, dim=h, tok_embeddings=common.Embedding.Config(num_embeddings=v, embedding_dim=h),
        norm=common.RMSNorm.Config(normalized_shape=h), lm_head=common.Linear.Config(in_features=h, out_features=v),
        layers=layers, mtp_layers=[],
    ).build()
    for module in model.modules():
        if isinstance(module, nn.RMSNorm):
            module.eps = cfg.rms_norm_eps
    return model


@contextlib.contextmanager
def torchtitan_warnings_quiet() -> Iterator[None]:
    """Hide the two warnings torchtitan's DeepSeek-V3 raises on every CPU run: its router asks for an fp32 autocast,
    which CPU autocast does not offer (it then runs as is), and inductor leaves its complex RoPE to eager kernels."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")
        warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
        yield


def compile_torchtitan(model: nn.Module) -> None:
    """torch.compile as torchtitan's trainer applies it (`compile.enable`, torchtitan/distributed/compile.py):
    each transformer block compiled whole (fullgraph), with Dynamo capturing the data-dependent sizes of its
    MoE dispatch. Its loss is compiled apart (`torchtitan_step(..., compile_loss=True)`)."""
    import torch._dynamo

    torch._dynamo.config.capture_scalar_outputs = True
    for block in model.layers.children():
        block.compile(fullgraph=True)


# our decoder-block parameter (after `layers.<i>.block.`) -> torchtitan's (after `layers.<i>.`)
TORCHTITAN_BLOCK_NAMES = {
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_a_proj.weight": "attention.wq_a.weight", "self_attn.q_a_layernorm.weight": "attention.q_norm.weight",
    "self_attn.q_b_proj.weight": "attention.wq_b.weight", "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attention.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attention.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attention.wkv_b.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight", "mlp.gate.weight": "moe.router.gate.weight",
    "mlp.gate.e_score_correction_bias": "moe.expert_bias_E",
    "mlp.experts.down_proj.weight": "moe.routed_experts.inner_experts.w2_EDF",
    "mlp.shared_experts.gate_proj.weight": "moe.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "moe.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "moe.shared_experts.w2.weight",
}
TORCHTITAN_TOP_NAMES = {"embed.embed_tokens.weight": "tok_embeddings.weight", "head.norm.weight": "norm.weight",
                        "head.lm_head.weight": "lm_head.weight"}
GATE_UP = "mlp.experts.gate_up_proj.weight"  # torchtitan's w1 (gate) and w3 (up) stacked along dim 1


def _their_paths(ours_name: str, layer: bool) -> list[str]:
    """torchtitan's path(s) of our parameter or router bias `ours_name` (two for the stacked gate_up): in its
    DeepSeekV3Model, or with `layer` in its MoE module for a name of our MoE module."""
    if layer:
        rest, prefix = f"mlp.{ours_name}", ""
    elif ours_name in TORCHTITAN_TOP_NAMES:
        return [TORCHTITAN_TOP_NAMES[ours_name]]
    else:
        parts = ours_name.split(".")  # layers.<i>.block.<rest>
        if parts[0] != "layers" or parts[2:3] != ["block"]:
            raise ValueError(f"torchtitan: no counterpart for our {ours_name}")
        rest, prefix = ".".join(parts[3:]), f"layers.{parts[1]}."
    if rest == GATE_UP:
        paths = ["moe.routed_experts.inner_experts.w1_EFD", "moe.routed_experts.inner_experts.w3_EFD"]
    elif rest in TORCHTITAN_BLOCK_NAMES:
        paths = [TORCHTITAN_BLOCK_NAMES[rest]]
    else:
        raise ValueError(f"torchtitan: no counterpart for our {ours_name}")
    return [prefix + (p.removeprefix("moe.") if layer else p) for p in paths]


def _their_tensors(theirs: nn.Module, ours_name: str, layer: bool) -> list[Any]:
    return [theirs.get_buffer(p) if p.endswith("expert_bias_E") else theirs.get_parameter(p)
            for p in _their_paths(ours_name, layer)]


def copy_weights_to_torchtitan(ours: nn.Module, theirs: nn.Module, layer: bool = False) -> None:
    """Ours -> torchtitan: every parameter and the routers' score-correction biases, our DeepseekV3 into its
    DeepSeekV3Model, or with `layer` our MoE into its MoE. Our [E, 2I, H] gate_up splits into its w1 and w3."""
    named = [*ours.named_parameters(), *((n, b) for n, b in ours.named_buffers() if n.endswith("correction_bias"))]
    for name, src in named:
        dst = _their_tensors(theirs, name, layer)
        pieces = src.split([t.shape[1] for t in dst], dim=1) if len(dst) > 1 else [src]
        for d, piece in zip(dst, pieces, strict=True):
            if d.shape != piece.shape:
                raise ValueError(f"torchtitan weight for {name}: {tuple(d.shape)} vs ours {tuple(piece.shape)}")
            d.detach().copy_(piece)


def torchtitan_grad(theirs: nn.Module, ours_name: str, layer: bool = False) -> Any:
    """torchtitan's gradient of our parameter `ours_name`, in our layout (`layer` as in copy_weights_...)."""
    import torch

    grads = [t.grad for t in _their_tensors(theirs, ours_name, layer)]
    return grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)


@contextlib.contextmanager
def torchtitan_experts_in_fp32(model: nn.Module) -> Iterator[None]:
    """Within: torchtitan's grouped experts compute in their parameters' dtype. Its forward casts operands to
    bf16 whatever that dtype is; for the fp32 check of the weight mapping only, never for timing."""
    import torch
    import torch.nn.functional as F

    def forward_of(experts: nn.Module) -> Any:
        def forward(x: Any, tokens_per_expert: Any) -> Any:
            offs = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
            gate = torch._grouped_mm(x, experts.w1_EFD.transpose(-2, -1), offs=offs)
            up = torch._grouped_mm(x, experts.w3_EFD.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(F.silu(gate) * up, experts.w2_EDF.transpose(-2, -1), offs=offs)
        return forward

    patched = [m for m in model.modules() if hasattr(m, "w1_EFD")]
    for experts in patched:
        experts.forward = forward_of(experts)
    try:
        yield
    finally:
        for experts in patched:
            del experts.forward
