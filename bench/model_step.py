"""model_step: forward+backward tokens/s of the `small` preset, ours vs transformers' DeepseekV3ForCausalLM.

Same config and weights (ours copied into theirs), CPU fp32, training mode, a batch of 4 x 256 tokens. The
comparison computes the same thing on both sides: MTP off and no sequence-wise balance loss (transformers has
neither), so both losses are the mean next-token cross-entropy over the same 1024 targets. Every transformers
expert implementation that runs on CPU is checked against ours and timed; the fastest is the peer. The FLOP/s
fraction is our model FLOP/s (6 x activated matmul parameters x tokens + causal attention, as in
trainer/report/metrics.py) over the FLOP/s of the model's GEMMs run as plain dense torch.mm in the same loop.
Threads: BENCH_THREADS, as in bench/moe_layer.py. See docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import result
from bench.moe_layer import (
    SLOW_FACTOR,
    bench_threads,
    compare,
    dense_reference,
    gemm_flops,
    hf_config,
    hf_experts_implementations,
    rel_norm_diff,
    time_peers,
    timed,
    torchtitan_ratios,
)
from bench.peers import torchtitan_warnings_quiet
from model.compiled import compile_problem
from model.config import ModelConfig
from model.transformer import DeepseekV3

PRESET = Path(__file__).resolve().parents[1] / "conf" / "model" / "small.yaml"
BATCH, SEQ = 4, 256
MIN_ROUNDS = 4  # interleaved rounds at least (one round: ours, the dense GEMMs and the fastest peer, ~10 s)
# batched_mm materialises one weight copy per (token, choice): ~42 MB per token for the 7 MoE layers of this
# preset with gradients, so it runs on one sequence of this length (its per-token cost is flat in the tokens)
BATCHED_MM_SEQ = 32
# ours vs torchtitan, both in bf16: the loss (measured ~5e-5 apart; bf16 moves it ~2e-4 from fp32)
BF16_LOSS_TOL = 2e-3
# ...and each gradient's distance from the fp32 reference: torchtitan's in bf16 at most this many times ours
# plus the slack (its router also scores in bf16, so more tokens change experts); a wrong cast or mapping
# gives uncorrelated gradients, ~1.4
BF16_DRIFT_FACTOR, BF16_DRIFT_SLACK = 2.0, 0.1
# gradients compared in the self-check: ours -> transformers names (a layer of every kind, both ends)
GRAD_PAIRS = {
    "embed.embed_tokens.weight": "model.embed_tokens.weight",
    "head.lm_head.weight": "lm_head.weight",
    "layers.0.block.mlp.gate_proj.weight": "model.layers.0.mlp.gate_proj.weight",
    "layers.1.block.self_attn.kv_b_proj.weight": "model.layers.1.self_attn.kv_b_proj.weight",
    "layers.1.block.mlp.gate.weight": "model.layers.1.mlp.gate.weight",
    "layers.1.block.mlp.experts.gate_up_proj.weight": "model.layers.1.mlp.experts.gate_up_proj",
    "layers.7.block.mlp.experts.down_proj.weight": "model.layers.7.mlp.experts.down_proj",
    "layers.7.block.mlp.shared_experts.up_proj.weight": "model.layers.7.mlp.shared_experts.up_proj.weight",
}


def small_config() -> ModelConfig:
    """The `small` preset without MTP and the balance loss (so both sides compute the same loss)."""
    if PRESET.is_file():
        cfg = ModelConfig.from_yaml(PRESET)
    else:  # the preset as specified, for checkouts that predate conf/model/small.yaml
        cfg = ModelConfig(
            vocab_size=32000, hidden_size=512, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=1408,
            num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
            v_head_dim=64, n_routed_experts=32, n_shared_experts=1, moe_intermediate_size=256,
            num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=2048, name="small",
        )
    return dataclasses.replace(cfg, num_nextn_predict_layers=0, seq_aux_alpha=0.0)


def hf_state_dict(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """Our state dict under transformers 5.x names (its experts keep our stacked [E, 2I, H] / [E, H, I] tensors)."""
    from model.hf import hf_name

    out = {}
    for key, t in model.state_dict().items():
        name = hf_name(key, model.cfg)
        if name.endswith(("mlp.experts.gate_up_proj.weight", "mlp.experts.down_proj.weight")):
            name = name.removesuffix(".weight")  # 5.x holds them as bare parameters of the experts module
        out[name] = t
    return out


def model_linear_shapes(cfg: ModelConfig, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(rows, in, out) of every GEMM of the model's forward (routed experts: tokens x top_k rows)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    shapes: dict[str, tuple[int, int, int]] = {"lm_head": (tokens, h, cfg.vocab_size)}
    for i in range(cfg.num_hidden_layers):
        p = f"layer{i}."
        if cfg.q_lora_rank is None:
            shapes[p + "q_proj"] = (tokens, h, heads * cfg.qk_head_dim)
        else:
            shapes[p + "q_a_proj"] = (tokens, h, cfg.q_lora_rank)
            shapes[p + "q_b_proj"] = (tokens, cfg.q_lora_rank, heads * cfg.qk_head_dim)
        shapes[p + "kv_a_proj"] = (tokens, h, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        shapes[p + "kv_b_proj"] = (tokens, cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        shapes[p + "o_proj"] = (tokens, heads * cfg.v_head_dim, h)
        if cfg.is_moe_layer(i):
            rows, width, shared = tokens * cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_shared_experts
            shapes[p + "router"] = (tokens, h, cfg.n_routed_experts)
            shapes[p + "routed_gate_up"] = (rows, h, 2 * width)
            shapes[p + "routed_down"] = (rows, width, h)
            if shared:
                shapes[p + "shared_gate_up"] = (tokens, h, 2 * width * shared)
                shapes[p + "shared_down"] = (tokens, width * shared, h)
        else:
            shapes[p + "mlp_gate_up"] = (tokens, h, 2 * cfg.intermediate_size)
            shapes[p + "mlp_down"] = (tokens, cfg.intermediate_size, h)
    return shapes


def build(seed: int = 0) -> tuple[ModelConfig, DeepseekV3, torch.Tensor]:
    cfg = small_config()
    torch.manual_seed(seed)
    ours = DeepseekV3(cfg).train()
    with torch.no_grad():
        # weights well above the 0.006 init, so routing is decided by clear margins (no near-ties that float
        # reassociation could flip between the two implementations)
        for p in ours.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
        for router in ours.routers():
            router.e_score_correction_bias.normal_(0.0, 0.02)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed + 1))
    return cfg, ours, tokens


def ours_step(model: DeepseekV3, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(tokens).loss
        loss.backward()
        return loss.detach()

    return step


def hf_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], torch.Tensor]:
    inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        # shift_labels: the targets are given already shifted, so all S positions count, as in ours
        loss = model(input_ids=inputs, labels=targets, shift_labels=targets).loss
        loss.backward()
        return loss.detach()

    return step


def snapshot(model: nn.Module, names: list[str], step: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    loss = step()
    params = dict(model.named_parameters())
    return {"loss": loss, **{f"grad:{n}": params[n].grad.clone() for n in names}}


def torchtitan_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """torchtitan's trainer loss: cross-entropy summed in fp32 over the targets, divided by their count (the mean,
    as ours)."""
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum") / targets.numel()


def torchtitan_step(model: nn.Module, tokens: torch.Tensor, compile_loss: bool = False) -> Callable[[], torch.Tensor]:
    """torchtitan's training step: logits, then its loss (through torch.compile with `compile_loss`, as its
    `compile.components=[model, loss]`)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    loss_fn = torch.compile(torchtitan_loss) if compile_loss else torchtitan_loss

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        return loss.detach()

    return step


def torchtitan_contestants(
    cfg: ModelConfig, ours: DeepseekV3, tokens: torch.Tensor, reference: dict[str, torch.Tensor]
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """torchtitan's whole DeepSeek-V3 (causal SDPA as its inner attention) with fp32 parameters and in bf16,
    and our model in bf16: their steps and what to report; none, with the reason, where torchtitan cannot be
    installed or imported. The weight mapping is checked in fp32 with its experts held in fp32 (they cast to
    bf16 otherwise); the bf16 models are casts of those two, checked by their loss."""
    from bench.peers import (
        compile_torchtitan,
        copy_weights_to_torchtitan,
        torchtitan_experts_in_fp32,
        torchtitan_grad,
        torchtitan_model,
        torchtitan_moe_module,
    )

    try:
        _, version = torchtitan_moe_module()
    except RuntimeError as e:
        return {}, {"available": False, "why": str(e)}

    def snap(m: nn.Module, step: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = step()
        return {"loss": loss, **{f"grad:{n}": torchtitan_grad(m, n).clone() for n in GRAD_PAIRS}}

    theirs = torchtitan_model(cfg).train()
    with torch.no_grad():
        copy_weights_to_torchtitan(ours, theirs)
    with torchtitan_experts_in_fp32(theirs):
        mapping = compare(reference, snap(theirs, torchtitan_step(theirs, tokens)), "model_step[torchtitan, fp32]")
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    ours_bf16.restore_router_precision()
    theirs_bf16 = copy.deepcopy(theirs)
    for p in theirs_bf16.parameters():  # as its mixed-precision training runs: the RoPE cache stays complex64
        p.data = p.data.to(torch.bfloat16)
    steps = {"torchtitan_fp32_params": torchtitan_step(theirs, tokens), "ours_bf16": ours_step(ours_bf16, tokens),
             "torchtitan_bf16": torchtitan_step(theirs_bf16, tokens)}
    models = {"ours_bf16": ours_bf16, "torchtitan_bf16": theirs_bf16}  # the bf16 sides the self-check runs
    # each side's best configuration: torch.compile, ours of the elementwise regions (model.compile_regions),
    # torchtitan's of its whole blocks and its loss, as its trainer's compile.enable does
    compile_problem_here = compile_problem("cpu")
    if compile_problem_here is None:
        ours_compiled = DeepseekV3(dataclasses.replace(cfg, compile_regions=True)).train().to(torch.bfloat16)
        ours_compiled.restore_router_precision()
        ours_compiled.load_state_dict(ours_bf16.state_dict())
        theirs_compiled = copy.deepcopy(theirs_bf16)
        compile_torchtitan(theirs_compiled)
        steps["ours_bf16_compiled"] = ours_step(ours_compiled, tokens)
        steps["torchtitan_bf16_compiled"] = torchtitan_step(theirs_compiled, tokens, compile_loss=True)
        models.update(ours_bf16_compiled=ours_compiled, torchtitan_bf16_compiled=theirs_compiled)
    # bf16 moves this model's gradients by 15-45% (norm) from fp32 on either side (small-signal gradients at
    # this init, routing flips), so bf16 grads are not compared with each other: each side's loss is compared with
    # ours in bf16, and each side's distance from the fp32 reference with ours. The mapping is pinned in fp32 above.
    bf16 = {side: (snapshot(m, list(GRAD_PAIRS), steps[side]) if side.startswith("ours") else snap(m, steps[side]))
            for side, m in models.items()}
    bf16_loss = {side: compare({"loss": bf16["ours_bf16"]["loss"]}, {"loss": got["loss"]},
                               f"model_step[{side}, bf16]", BF16_LOSS_TOL)
                 for side, got in bf16.items() if side != "ours_bf16"}
    drift = {side: {k: rel_norm_diff(got[k].float(), reference[k]) for k in reference if k != "loss"}
             for side, got in bf16.items()}
    for side in drift:
        for k, ours_drift in drift["ours_bf16"].items():
            if drift[side][k] > BF16_DRIFT_FACTOR * ours_drift + BF16_DRIFT_SLACK:
                raise AssertionError(f"model_step[{side}, bf16] self-check: {k} is {drift[side][k]:.3g} from fp32 "
                                     f"(ours in bf16: {ours_drift:.3g})")
    return steps, {
        "available": True, "version": version, "self_check_rel_diff": {"fp32_experts_in_fp32": mapping,
                                                                       "bf16_loss_vs_ours_bf16": bf16_loss},
        "compiled": compile_problem_here or "ours: model.compile_regions (RMSNorm, RoPE, cross-entropy); torchtitan: "
                                            "each block compiled whole (fullgraph) and its loss, as compile.enable",
        "bf16_grad_norm_diff_vs_ours_fp32": drift,
        "attention": "torchtitan's ScaledDotProductAttention (causal SDPA) in place of its default flex "
                     "attention, whose block-causal mask on these unpacked sequences is the same causal mask; "
                     "flex attention has no CPU backward",
        "loss": "F.cross_entropy(logits.float(), reduction='sum') / targets, as torchtitan's trainer",
        "install": "pip --no-deps into build/peers/torchtitan (bench/peers.py), not a dependency",
    }


def run(repeats: int) -> dict[str, Any]:
    with bench_threads() as threads:
        return _run(repeats, threads)


def _run(repeats: int, threads: int) -> dict[str, Any]:
    from transformers import DeepseekV3ForCausalLM

    cfg, ours, tokens = build()
    n_tokens = BATCH * SEQ
    impls = hf_experts_implementations()
    batch_of = {impl: tokens[:1, : BATCHED_MM_SEQ + 1] if impl == "batched_mm" else tokens for impl in impls}
    reference = {
        tuple(t.shape): snapshot(ours, list(GRAD_PAIRS), ours_step(ours, t))
        for t in {tuple(t.shape): t for t in batch_of.values()}.values()
    }
    weights = hf_state_dict(ours)
    theirs: dict[str, nn.Module] = {}
    checks: dict[str, dict[str, float]] = {}
    first_call: dict[str, float] = {}
    for impl in impls:
        theirs[impl] = m = DeepseekV3ForCausalLM(hf_config(cfg, impl)).train()
        m.load_state_dict(weights, strict=True)
        got, first_call[impl] = timed(
            lambda m=m, impl=impl: snapshot(m, list(GRAD_PAIRS.values()), hf_step(m, batch_of[impl]))
        )
        checks[impl] = compare(reference[tuple(batch_of[impl].shape)], got, f"model_step[{impl}]")
        del got
    del weights

    shapes = model_linear_shapes(cfg, n_tokens)
    per_token_first = {impl: first_call[impl] / batch_of[impl][:, 1:].numel() for impl in impls}
    best_first = min(per_token_first.values())
    interleaved = [i for i in impls if batch_of[i] is tokens and per_token_first[i] <= SLOW_FACTOR * best_first]
    fns: dict[str, Callable[[], Any]] = {"ours": ours_step(ours, tokens), "dense_mm": dense_reference(shapes)}
    fns.update({impl: hf_step(theirs[impl], tokens) for impl in interleaved})
    with torchtitan_warnings_quiet():
        titan_steps, titan = torchtitan_contestants(cfg, ours, tokens, reference[tuple(tokens.shape)])
        if titan_steps:
            fns.update(titan_steps)
            fns["dense_mm_bf16"] = dense_reference(shapes, torch.bfloat16)
            fns["dense_mm_bf16"]()
        fns["dense_mm"]()  # ours and the peers are warm from the self-check already
        slow = {i: hf_step(theirs[i], batch_of[i]) for i in impls if i not in interleaved}
        rounds = max(repeats, MIN_ROUNDS)
        med, cpu, timing = time_peers(fns, slow, first_call, rounds, warmup=0)
    if titan_steps:
        titan.update(
            **torchtitan_ratios(med, cpu, titan_steps, n_tokens),
            **compiled_ratios(med, cfg, shapes, n_tokens),
            ours_bf16_flops_fraction=(model_flops_of(cfg, n_tokens) / med["ours_bf16"])
            / (gemm_flops(shapes) / med["dense_mm_bf16"]),
            note="ratio_bf16: ours vs torchtitan, both whole models in bf16 (equal precision), eager; "
                 "ratio_bf16_compiled: both through torch.compile (see `compiled`); ratio_bf16_best: each side's "
                 "faster configuration; ratio_fp32_params: our fp32 model vs torchtitan with fp32 parameters, whose "
                 "routed experts compute in bf16 (less precise work than ours, not equal work)",
        )

    peer_tokens = {impl: batch_of[impl][:, 1:].numel() for impl in impls}
    ours_tps = n_tokens / med["ours"]
    peer_tps = {impl: peer_tokens[impl] / med[impl] for impl in impls}
    best = max(peer_tps, key=peer_tps.get)
    model_flops = model_flops_of(cfg, n_tokens)
    dense_gflops = gemm_flops(shapes) / med["dense_mm"] / 1e9
    ours_gflops = model_flops / med["ours"] / 1e9
    return result(
        "model_step",
        ours=ours_tps,
        peer=peer_tps[best],
        unit="tokens/s (fwd+bwd)",
        goal=">= 1.1x the fastest transformers DeepseekV3ForCausalLM (fp32) and torchtitan's DeepSeek-V3 (bf16, "
             "torchtitan.ratio_bf16_best); flops_fraction >= 0.85",
        repeats=rounds,
        peer_impl=best,
        peer_tokens_per_s=peer_tps,
        peer_tokens_measured=peer_tokens,
        peer_timing=timing,
        model_flops_per_step=model_flops,
        ours_gflops=ours_gflops,
        dense_mm_gflops=dense_gflops,
        flops_fraction=ours_gflops / dense_gflops,
        flops_formula="(6 x activated matmul params + causal attention) per token x tokens "
        "(model.info.training_flops_per_token); dense: the model's GEMMs as torch.mm, 3 x 2 x m x k x n each",
        seconds_median=med,
        cpu_seconds_median=cpu,
        cpu_ratio=min(cpu[i] / peer_tokens[i] for i in cpu if i in impls) / (cpu["ours"] / n_tokens),
        cpu_flops_fraction=(model_flops / cpu["ours"]) / (gemm_flops(shapes) / cpu["dense_mm"]),
        first_call_seconds=first_call,
        self_check_rel_diff=checks,
        shapes={
            "preset": cfg.name, "batch": BATCH, "seq": SEQ, "tokens": n_tokens, "dtype": "float32",
            "num_nextn_predict_layers": 0, "seq_aux_alpha": 0.0, "params": sum(p.numel() for p in ours.parameters()),
            "attention": "sdpa (both)",
        },
        threads=threads,
        torchtitan=titan,
    )


def compiled_ratios(med: dict[str, float], cfg: ModelConfig, shapes: dict, n_tokens: int) -> dict[str, float]:
    """Ours vs torchtitan in bf16 both compiled, and each side's faster configuration against the other's."""
    if "ours_bf16_compiled" not in med:
        return {}
    ours, theirs = med["ours_bf16_compiled"], med["torchtitan_bf16_compiled"]
    return {"ratio_bf16_compiled": theirs / ours,
            "ratio_bf16_best": min(theirs, med["torchtitan_bf16"]) / min(ours, med["ours_bf16"]),
            "ours_bf16_compiled_flops_fraction": (model_flops_of(cfg, n_tokens) / ours)
            / (gemm_flops(shapes) / med["dense_mm_bf16"])}


def model_flops_of(cfg: ModelConfig, n_tokens: int) -> float:
    from model.info import training_flops_per_token

    return training_flops_per_token(cfg, SEQ) * n_tokens


if __name__ == "__main__":
    import json

    print(json.dumps({k: v for k, v in run(3).items() if k != "machine"}, indent=2, default=float))
