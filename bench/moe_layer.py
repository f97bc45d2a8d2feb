"""moe_layer: forward+backward tokens/s of one DeepSeekMoE layer, ours vs transformers and torchtitan.

Same config and same weights on both sides (ours copied into theirs), CPU fp32, training mode, 4096 tokens.
transformers 5.x runs its experts through one of several implementations (`eager`, `grouped_mm`,
`batched_mm`; the CUDA-only ones are skipped); each is checked against ours and timed, and the fastest is the
peer. The achieved FLOP/s of our layer is also reported as a fraction of plain dense `torch.mm` GEMMs of the
same shapes (every routed-expert, shared-expert and router GEMM of forward and backward, run as if all rows
went to one expert), measured in the same interleaved loop. See docs/benchmarks.md.

torchtitan's MoE (the layer its DeepSeek-V3 model builds; installed apart by bench/peers.py) runs its routed
experts in bf16 whatever the parameters' dtype (its GroupedExperts casts both operands), so it is measured
twice in the same loop: with fp32 parameters beside our fp32 layer (less precise work than ours: reported,
not the headline), and with everything in bf16 beside our layer in bf16 (equal precision:
`torchtitan.ratio_bf16`). Its self-checks use a bf16 tolerance.

Threads: BENCH_THREADS (default 1; 0 keeps torch's default), the same for every contestant. This machine has
2 cores shared with other jobs; with 2 OpenMP threads a descheduled worker stalls each parallel region and a
step's time swings 5-10x between runs, so the default measures one thread, where medians are stable.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from bench.common import interleaved_medians, result
from model.config import ModelConfig
from model.moe import MoE

HIDDEN, EXPERTS, WIDTH, TOP_K, SHARED, GROUPS, TOPK_GROUPS = 256, 64, 128, 6, 1, 8, 4
BATCH, SEQ = 4, 1024  # 4096 tokens
# batched_mm copies a [2I, H] and an [H, I] weight for every (token, choice) pair: ~1.2 MB per pair here, about
# 30 GB with its gradients at 4096 tokens, so it is measured on this many tokens (its cost per token is flat)
BATCHED_MM_TOKENS = 256
# implementations that need CUDA kernels or extra packages; everything else registered is tried
CUDA_ONLY = {"deepgemm", "sonicmoe"}
REL_TOL = 1e-4  # self-check: max |ours - theirs| / max |theirs|, per tensor
BF16_TOL = 5e-2  # the same where one side's GEMMs round to bf16 (8 mantissa bits, sums of hundreds of terms)
# both layers in bf16: ||ours - theirs|| / ||theirs|| per tensor. Their router then scores in bf16 (its fp32
# autocast does not exist on CPU), ours in fp32, so ~9% of tokens pick another expert set and single tokens
# differ wholly; the norm bounds the share, and the fp32-parameter check above pins the function itself
BF16_ROUTING_TOL = 0.3
# a peer whose first call takes more than this many times the fastest peer's is timed once, not `repeats`
# times: it keeps the run inside its time budget and cannot change which implementation is fastest
SLOW_FACTOR = 2.0
SLOW_SECONDS = 5.0
# one interleaved round takes about a second here, so it runs at least this many (the machine is shared)
MIN_ROUNDS = 15


@contextmanager
def bench_threads() -> Iterator[int]:
    """Set torch's intra-op threads from BENCH_THREADS (default 1, 0 = leave as is); restored on exit."""
    before = torch.get_num_threads()
    wanted = int(os.environ.get("BENCH_THREADS", "1"))
    if wanted > 0:
        torch.set_num_threads(wanted)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def layer_config() -> ModelConfig:
    # seq_aux_alpha=0: transformers has no sequence-wise balance loss, so both sides compute the same function
    return ModelConfig(
        hidden_size=HIDDEN, n_routed_experts=EXPERTS, moe_intermediate_size=WIDTH, num_experts_per_tok=TOP_K,
        n_shared_experts=SHARED, n_group=GROUPS, topk_group=TOPK_GROUPS, seq_aux_alpha=0.0,
        num_nextn_predict_layers=0, name="bench-moe-layer",
    )


def hf_experts_implementations() -> list[str]:
    """The expert implementations this transformers registers that can run on CPU, `eager` first."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *sorted(k for k in ALL_EXPERTS_FUNCTIONS if k not in CUDA_ONLY and k != "eager")]


def hf_config(cfg: ModelConfig, impl: str) -> Any:
    from transformers import DeepseekV3Config

    from model.hf import hf_config_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DeepseekV3Config(**hf_config_dict(cfg), experts_implementation=impl)


@torch.no_grad()
def copy_moe_weights(ours: MoE, theirs: nn.Module) -> None:
    """Ours -> transformers 5.x DeepseekV3MoE: the fused expert tensors have the same [E, 2I, H] / [E, H, I] layout."""
    theirs.gate.weight.copy_(ours.gate.weight)
    theirs.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
    theirs.experts.gate_up_proj.copy_(ours.experts.gate_up_proj.weight)
    theirs.experts.down_proj.copy_(ours.experts.down_proj.weight)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(theirs.shared_experts, name).weight.copy_(getattr(ours.shared_experts, name).weight)


# matching parameters, ours -> theirs, for the gradient check
GRAD_PAIRS = {
    "gate.weight": "gate.weight",
    "experts.gate_up_proj.weight": "experts.gate_up_proj",
    "experts.down_proj.weight": "experts.down_proj",
    "shared_experts.gate_proj.weight": "shared_experts.gate_proj.weight",
    "shared_experts.up_proj.weight": "shared_experts.up_proj.weight",
    "shared_experts.down_proj.weight": "shared_experts.down_proj.weight",
}

Step = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def make_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """One training step of the layer: forward, backward of <y, grad>, input gradient included; grads reset."""

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        out = module(xi)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(grad)
        return y.detach(), xi.grad

    return step


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over the elements (shapes may differ by how tokens are batched)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def snapshot(module: nn.Module, names: list[str], step: Step) -> dict[str, torch.Tensor]:
    """Run one step; return its output, input gradient and the named parameters' gradients (cloned)."""
    y, gx = step()
    params = dict(module.named_parameters())
    return {"output": y, "input_grad": gx, **{f"grad:{n}": params[n].grad.clone() for n in names}}


def rel_norm_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1), b.reshape(-1)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str,
            tol: float = REL_TOL, metric: Callable[[torch.Tensor, torch.Tensor], float] = rel_diff) -> dict[str, float]:
    """Relative differences per tensor (max by default; keys of `ours`, matched in order); raises past `tol`."""
    diffs = {k: metric(a.float(), b.float()) for (k, a), b in zip(ours.items(), theirs.values(), strict=True)}
    worst = max(diffs, key=lambda k: diffs[k] if math.isfinite(diffs[k]) else math.inf)  # a NaN fails too
    if not diffs[worst] <= tol:
        raise AssertionError(f"{what} self-check: {worst} differs by {diffs[worst]:.3g} (relative) > {tol}")
    return diffs


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Wall-clock medians from `interleaved_medians`, and the process CPU-time medians of the same calls.

    With one thread, CPU time leaves out the time this process waits for a core that another job holds, so
    on a shared machine it is the steadier of the two; both are reported.
    """
    cpu: dict[str, list[float]] = {k: [] for k in fns}

    def with_cpu(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)

        return call

    wall = interleaved_medians({k: with_cpu(k, f) for k, f in fns.items()}, repeats=rounds, warmup=warmup)
    return wall, {k: statistics.median(v[warmup:]) for k, v in cpu.items()}


def time_peers(
    interleaved: dict[str, Callable[[], Any]],
    slow: dict[str, Callable[[], Any]],
    first_call: dict[str, float],
    rounds: int,
    warmup: int,
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Time `interleaved` together for `rounds`; each `slow` peer once more, or not at all past SLOW_SECONDS.

    A slow peer (more than SLOW_FACTOR x the fastest per token on its first call) cannot become the fastest;
    timing it once (or quoting its first call, which is a full training step too) keeps the budget.
    """
    wall, cpu = measure(interleaved, rounds, warmup)
    how = dict.fromkeys(interleaved, f"median of {rounds} interleaved rounds")
    for name, fn in slow.items():
        if first_call[name] > SLOW_SECONDS:
            wall[name], how[name] = first_call[name], "first call (the self-check step), not repeated"
        else:
            w, c = measure({name: fn}, 1, 0)
            wall[name], cpu[name], how[name] = w[name], c[name], "one call"
    return wall, cpu, how


def linear_shapes(cfg: ModelConfig, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(rows, in, out) of every GEMM of the layer's forward; backward runs two more of the same size each."""
    rows = tokens * cfg.num_experts_per_tok
    h, i, shared = cfg.hidden_size, cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
    return {
        "router": (tokens, h, cfg.n_routed_experts),
        "routed_gate_up": (rows, h, 2 * i),
        "routed_down": (rows, i, h),
        "shared_gate_up": (tokens, h, 2 * shared),
        "shared_down": (tokens, shared, h),
    }


def gemm_flops(shapes: dict[str, tuple[int, int, int]]) -> float:
    """Forward + backward GEMM FLOPs: 3 GEMMs (y = xW^T, dx = dy W, dW = dy^T x) of 2*m*k*n each."""
    return float(sum(3 * 2 * m * k * n for m, k, n in shapes.values()))


def dense_reference(shapes: dict[str, tuple[int, int, int]], dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """The same GEMMs as plain dense torch.mm (one weight per GEMM): what the FLOPs cost with no routing at all."""
    g = torch.Generator().manual_seed(1)
    operands = [
        tuple(t.to(dtype) for t in (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g),
                                    torch.randn(m, n, generator=g)))
        for m, k, n in shapes.values()
    ]

    def run() -> None:
        for x, w, dy in operands:
            torch.mm(x, w.t())
            torch.mm(dy, w)
            torch.mm(dy.t(), x)

    return run


def in_bf16(moe: MoE) -> MoE:
    """A bf16 copy of our layer as the trainer runs it in bf16: the router's bias stays fp32, its counts fp64."""
    out = copy.deepcopy(moe).to(torch.bfloat16)
    out.gate.e_score_correction_bias.data = out.gate.e_score_correction_bias.data.float()
    out.gate.step_counts.data = out.gate.step_counts.data.double()
    return out


def torchtitan_contestants(
    cfg: ModelConfig, ours: MoE, x: torch.Tensor, grad: torch.Tensor, reference: dict[str, torch.Tensor]
) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """torchtitan's MoE with fp32 parameters and in bf16, and our layer in bf16: their steps (self-checked) and
    what to report. No steps, and the reason, where torchtitan cannot be installed or imported."""
    from bench.peers import copy_weights_to_torchtitan, torchtitan_grad, torchtitan_moe, torchtitan_moe_module

    try:
        _, version = torchtitan_moe_module()
    except RuntimeError as e:
        return {}, {"available": False, "why": str(e)}

    def snap(m: nn.Module, step: Step) -> dict[str, torch.Tensor]:
        y, gx = step()
        return {"output": y, "input_grad": gx, **{n: torchtitan_grad(m, n, layer=True).clone() for n in GRAD_PAIRS}}

    theirs = torchtitan_moe(cfg).train()
    with torch.no_grad():
        copy_weights_to_torchtitan(ours, theirs, layer=True)
    theirs_bf16 = copy.deepcopy(theirs).to(torch.bfloat16)
    theirs_bf16.expert_bias_E.data = theirs_bf16.expert_bias_E.data.float()
    ours_bf16 = in_bf16(ours)
    xb, gb = x.to(torch.bfloat16), grad.to(torch.bfloat16)
    steps = {"torchtitan_fp32_params": make_step(theirs, x, grad), "ours_bf16": make_step(ours_bf16, xb, gb),
             "torchtitan_bf16": make_step(theirs_bf16, xb, gb)}
    checks = {
        "fp32_params_vs_ours_fp32": compare(reference, snap(theirs, steps["torchtitan_fp32_params"]),
                                            "moe_layer[torchtitan, fp32 parameters]", BF16_TOL),
        "bf16_vs_ours_bf16_norm": compare(snapshot(ours_bf16, list(GRAD_PAIRS), steps["ours_bf16"]),
                                          snap(theirs_bf16, steps["torchtitan_bf16"]), "moe_layer[torchtitan, bf16]",
                                          BF16_ROUTING_TOL, rel_norm_diff),
    }
    with torch.no_grad():
        mine = ours_bf16.gate(xb).experts.sort(-1).values
        their_ids = theirs_bf16.router(xb, theirs_bf16.expert_bias_E)[1]
        agree = float((mine == their_ids.reshape(mine.shape).sort(-1).values).all(-1).float().mean())
    return steps, {"available": True, "version": version, "self_check_rel_diff": checks,
                   "bf16_same_expert_sets": agree,
                   "install": "pip --no-deps into build/peers/torchtitan (bench/peers.py), not a dependency"}


def torchtitan_ratios(med: dict[str, float], cpu: dict[str, float], steps: dict[str, Any], tokens: int) -> dict:
    """What every torchtitan race reports from its medians: tokens/s of its contestants, and ours vs torchtitan
    in bf16 (wall and CPU) and against torchtitan with fp32 parameters."""
    return {"tokens_per_s": {k: tokens / med[k] for k in steps},
            "ratio_bf16": med["torchtitan_bf16"] / med["ours_bf16"],
            "ratio_bf16_cpu": cpu["torchtitan_bf16"] / cpu["ours_bf16"],
            "ratio_fp32_params": med["torchtitan_fp32_params"] / med["ours"]}


def build(seed: int = 0) -> tuple[ModelConfig, MoE, torch.Tensor, torch.Tensor]:
    cfg = layer_config()
    torch.manual_seed(seed)
    ours = MoE(cfg).train()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02)
        ours.gate.e_score_correction_bias.normal_(0.0, 0.02)  # uneven biases, so selection != gate ranking
    x = torch.randn(BATCH, SEQ, cfg.hidden_size)
    grad = torch.randn(BATCH, SEQ, cfg.hidden_size)
    return cfg, ours, x, grad


def run(repeats: int) -> dict[str, Any]:
    with bench_threads() as threads:
        return _run(repeats, threads)


def _run(repeats: int, threads: int) -> dict[str, Any]:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg, ours, x, grad = build()
    tokens = BATCH * SEQ
    impls = hf_experts_implementations()

    def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return x.reshape(1, -1, cfg.hidden_size)[:, :n], grad.reshape(1, -1, cfg.hidden_size)[:, :n]

    # self-check: ours once per token count, then each implementation; the first calls double as warm-up
    peer_tokens = {impl: BATCHED_MM_TOKENS if impl == "batched_mm" else tokens for impl in impls}
    reference = {n: snapshot(ours, list(GRAD_PAIRS), make_step(ours, *inputs(n))) for n in set(peer_tokens.values())}
    theirs: dict[str, nn.Module] = {}
    checks: dict[str, dict[str, float]] = {}
    first_call: dict[str, float] = {}
    for impl in impls:
        torch.manual_seed(0)
        theirs[impl] = m = DeepseekV3MoE(hf_config(cfg, impl)).train()
        copy_moe_weights(ours, m)
        got, first_call[impl] = timed(
            lambda m=m, impl=impl: snapshot(m, list(GRAD_PAIRS.values()), make_step(m, *inputs(peer_tokens[impl])))
        )
        checks[impl] = compare(reference[peer_tokens[impl]], got, f"moe_layer[{impl}]")
        del got

    shapes = linear_shapes(cfg, tokens)
    flops = gemm_flops(shapes)
    per_token_first = {impl: first_call[impl] / peer_tokens[impl] for impl in impls}
    best_first = min(per_token_first.values())
    interleaved = [i for i in impls if peer_tokens[i] == tokens and per_token_first[i] <= SLOW_FACTOR * best_first]
    fns: dict[str, Callable[[], Any]] = {"ours": make_step(ours, x, grad), "dense_mm": dense_reference(shapes)}
    fns.update({impl: make_step(theirs[impl], x, grad) for impl in interleaved})
    with warnings.catch_warnings():
        # torchtitan's router asks for an fp32 autocast, which CPU autocast does not offer (it then runs as is)
        warnings.filterwarnings("ignore", message="In CPU autocast")
        titan_steps, titan = torchtitan_contestants(cfg, ours, x, grad, reference[tokens])
        if titan_steps:
            fns.update(titan_steps)
            fns["dense_mm_bf16"] = dense_reference(shapes, torch.bfloat16)
    slow = {i: make_step(theirs[i], *inputs(peer_tokens[i])) for i in impls if i not in interleaved}
    rounds = max(repeats, MIN_ROUNDS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast")
        med, cpu, timing = time_peers(fns, slow, first_call, rounds, warmup=1)
    if titan_steps:
        titan.update(
            **torchtitan_ratios(med, cpu, titan_steps, tokens),
            ours_bf16_flops_fraction=med["dense_mm_bf16"] / med["ours_bf16"],
            note="ratio_bf16: ours vs torchtitan, both in bf16 (equal precision); ratio_fp32_params: our fp32 "
                 "layer vs torchtitan with fp32 parameters, whose routed experts still compute in bf16 (less "
                 "precise work than ours, not comparable as equal work)",
        )

    with torch.no_grad():
        counts = ours.gate(x).counts.float()
    ours_tps = tokens / med["ours"]
    peer_tps = {impl: peer_tokens[impl] / med[impl] for impl in impls}
    best = max(peer_tps, key=peer_tps.get)
    return result(
        "moe_layer",
        ours=ours_tps,
        peer=peer_tps[best],
        unit="tokens/s (fwd+bwd)",
        goal=">= 1.3x the fastest transformers experts implementation (fp32) and torchtitan (bf16, "
             "torchtitan.ratio_bf16); flops_fraction >= 0.9",
        repeats=rounds,
        peer_impl=best,
        peer_tokens_per_s=peer_tps,
        peer_tokens_measured=peer_tokens,
        peer_timing=timing,
        flops_per_step=flops,
        ours_gflops=flops / med["ours"] / 1e9,
        dense_mm_gflops=flops / med["dense_mm"] / 1e9,
        flops_fraction=med["dense_mm"] / med["ours"],
        seconds_median=med,
        cpu_seconds_median=cpu,
        cpu_ratio=min(cpu[i] / peer_tokens[i] for i in cpu if i in impls) / (cpu["ours"] / tokens),
        cpu_flops_fraction=cpu["dense_mm"] / cpu["ours"],
        first_call_seconds=first_call,
        self_check_rel_diff=checks,
        shapes={
            "tokens": tokens, "batch": BATCH, "seq": SEQ, "hidden": cfg.hidden_size,
            "routed_experts": cfg.n_routed_experts, "expert_width": cfg.moe_intermediate_size,
            "top_k": cfg.num_experts_per_tok, "shared_experts": cfg.n_shared_experts, "n_group": cfg.n_group,
            "topk_group": cfg.topk_group, "dtype": "float32", "gemms": shapes,
            "expert_load_max_over_mean": float(counts.max() / counts.mean()),
        },
        flops_formula="sum over the GEMMs in `shapes.gemms` of 3 x 2 x rows x in x out (forward + two backward)",
        threads=threads,
        torchtitan=titan,
    )


if __name__ == "__main__":
    import json

    print(json.dumps({k: v for k, v in run(3).items() if k != "machine"}, indent=2, default=float))
