"""Capacity planner: per-GPU memory, step time, tokens per day and GPU-hours per trillion tokens of a setup.

    python -m trainer.plan model=dsv3_671b gpus=2048 gpu=h800 parallel.pp=16 parallel.ep=64 \\
        train.global_batch_size=15360 train.seq_len=4096

Every number comes from a formula over the model's real parameter inventory (built on the meta device) and
the assumptions in `PlanConfig` (each commented where it is declared; docs/cluster.md explains them and puts
the result for the DeepSeek-V3 setup beside the report's). How the step is timed:

1. Parameters are grouped by what holds them: the embedding (stage 0), each decoder layer, the head and the
   MTP modules (last stage). Layers are split over the stages as evenly as possible, the stages with fewer
   layers at the ends (they also hold embedding / head / MTP). Routed-expert weights are divided by `ep`.
2. FLOPs per token of each stage: 6 x matmul parameters a token uses (routed experts: top-k of them), plus
   causal attention (trainer/report/metrics.py), plus the recomputed MLA up-projections (a second forward in the
   backward). Forward F = 2P + attention, weight-gradient W = 2P, input-gradient = 2P + 2 x attention.
3. Times: FLOPs / (dense peak x achieved kernel efficiency x the SMs left to compute when `comm_sms` serve
   the all-to-all); FP8 GEMMs against the FP8 peak, the output head and router in BF16, attention against the
   BF16 peak; memory-bound kernels (norms, RoPE, SwiGLU, residual adds, quantisation) as bytes / HBM bandwidth.
   Routed-expert work and all-to-all are stretched by `expert_imbalance` (the busiest expert-parallel rank).
4. All-to-all of a MoE layer per token and direction: over InfiniBand one copy per remote node the token is
   routed to (node-limited routing: at most `nodes_per_token` nodes, the token's own node included with
   probability nodes_per_token/nodes), over NVLink one copy per routed expert on another GPU of the node;
   dispatch in FP8 (+ a fp32 scale per 128 values), combine in BF16. IB and NVLink run concurrently
   (DeepSeek's two-hop dispatch), so a layer's communication takes the longer of the two.
5. Pipeline: the schedule simulator (parallel/simulate.py) times the real instruction lists with
   F = compute + exposed all-to-all (a lone forward has nothing to hide it behind), B likewise, W = compute,
   and an overlapped F&B pair = max(compute of both, all-to-all of both) (DualPipe's overlap).
6. Step = pipeline makespan + ZeRO-1 gradient reduce-scatter and parameter all-gather (not overlapped) + the
   optimizer's memory-bound update. Tokens/s x `goodput` (failures, restarts, checkpoints, evaluation) gives
   what a long run achieves; GPU-hours per trillion tokens = gpus x 10^12 / that rate / 3600.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30

# DeepSeek-V3 technical report (arXiv 2412.19437), for the comparison the planner prints.
REPORT = {
    "gpu_hours_per_trillion": 180_000, "pretrain_gpu_hours": 2_664_000, "total_gpu_hours": 2_788_000,
    "tokens": 14.8e12, "gpus": 2048, "gpu": "h800", "pp": 16, "ep": 64, "global_batch_size": 15360,
    "seq_len": 4096,
}


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers of one GPU (dense: without 2:4 sparsity)."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    hbm_gib: float
    hbm_tbps: float  # HBM bandwidth, TB/s
    nvlink_gbps: float  # NVLink, GB/s both directions together (the datasheet figure)
    ib_gbps: float  # scale-out network per GPU and direction, GB/s (one 400 Gb/s NIC per GPU = 50)
    sms: int


GPUS = {
    # H800: H100 SXM compute and HBM; NVLink cut from 900 to 400 GB/s for export
    "h800": GpuSpec("H800 SXM5", 989.5, 1979.0, 80, 3.35, 400, 50, 132),
    "h100": GpuSpec("H100 SXM5", 989.5, 1979.0, 80, 3.35, 900, 50, 132),
    "h200": GpuSpec("H200 SXM", 989.5, 1979.0, 141, 4.8, 900, 50, 132),
    "b200": GpuSpec("B200", 2250.0, 4500.0, 180, 8.0, 1800, 50, 148),
}


@dataclass
class PlanParallel:
    pp: int = 16  # pipeline ranks
    ep: int = 64  # expert-parallel size (inside data parallel)
    schedule: str = "dualpipe"  # 1f1b | zb1p | dualpipe | dualpipev
    zero_stage: int = 1  # 1: optimizer states sharded over the data-parallel group; 0: replicated
    # context parallelism: each sequence split over cp GPUs (Ulysses attention: two all-to-alls per attention
    # layer and pass, on NVLink when cp <= gpus_per_node); ZeRO-1 and the experts' groups span dp x cp
    cp: int = 1
    balance_layers: bool = True  # split layers so ranks carry equal compute (head + MTP weigh ~4 layers)


@dataclass
class PlanTrain:
    seq_len: int = 4096
    global_batch_size: int = 15360  # sequences per optimizer step
    micro_batch_size: int = 1  # sequences per microbatch
    # what a block keeps for its backward: selective (the report's: RMSNorm and the MLA up-projections are
    # recomputed, the rest kept) | full (only the block's input; the backward runs the block's forward again)
    recompute: str = "selective"
    tokens: float = 14.8e12  # the run's length, for the total GPU-hours line


@dataclass
class PlanPrecision:
    gemm: str = "fp8"  # fp8 | bf16: the precision of the linear layers (head and router stay BF16)
    weight_bytes: float = 2.0  # BF16 working weights
    grad_bytes: float = 4.0  # FP32 gradient accumulation (the report: "gradients ... retained in FP32")
    master_bytes: float = 4.0  # FP32 master weights (in the ZeRO-1 optimizer state)
    moment_bytes: float = 2.0  # each AdamW moment: BF16 in the report; DeepSpeed's default is 4
    fp8_weight_cache_bytes: float = 0.0  # cached FP8 weight copies per FP8 parameter (TE keeps 2: W and W^T)


@dataclass
class PlanEfficiency:
    gemm: float = 0.5  # achieved / dense peak of the FP8 (or BF16) GEMMs: DeepGEMM (2025) reaches up to 0.78 on
    #                    V3's shapes and beats the CUTLASS-based kernels the 2024 run used
    bf16_gemm: float = 0.6  # the output head and router GEMMs (BF16, cuBLAS)
    attention: float = 0.45  # causal attention core vs the BF16 peak (FlashAttention-3 class kernels, forward and
    #                          the slower backward together, MLA's 192/128 head dims)
    hbm: float = 0.8  # achieved / peak HBM bandwidth of the memory-bound kernels
    elementwise_bytes: float = 64.0  # forward bytes moved per token and layer by memory-bound kernels, in units of
    #                                  hidden_size (norms, RoPE, SwiGLU, residuals, FP8 casts); the backward: twice
    link: float = 0.8  # achieved / line rate of NVLink and InfiniBand (DeepEP: 153-158 of 200 GB/s, 43-46 of 50)
    comm_sms: int = 20  # SMs given to the all-to-all kernels (the report: 20 of 132); compute runs on the rest
    expert_imbalance: float = 1.1  # the busiest expert-parallel rank's load / the mean (MaxVio 0.1)
    goodput: float = 0.9  # share of wall time that trains: restarts, checkpoints, evaluation, stragglers
    reserve_gib: float = 5.0  # CUDA context, NCCL / all-to-all buffers, allocator fragmentation


@dataclass
class PlanComm:
    dispatch_bytes: float = 1.0 + 4.0 / 128  # FP8 value + an fp32 scale per 128 values
    combine_bytes: float = 2.0  # BF16
    nodes_per_token: int | None = None  # node-limited routing: null = model.topk_group (4 for V3)
    grad_sync_bytes: float = 4.0  # ZeRO-1 gradient reduce-scatter element size (fp32)


@dataclass
class PlanConfig:
    model: str = "dsv3_671b"  # a preset name of conf/model/ or a YAML path
    gpus: int = 2048
    gpu: str = "h800"  # a key of trainer.cluster.plan.GPUS
    gpus_per_node: int = 8
    nvlink_gbps: float | None = None  # override the GPU's NVLink figure (GB/s, both directions)
    ib_gbps: float | None = None  # override the network per GPU (GB/s per direction)
    parallel: PlanParallel = field(default_factory=PlanParallel)
    train: PlanTrain = field(default_factory=PlanTrain)
    precision: PlanPrecision = field(default_factory=PlanPrecision)
    efficiency: PlanEfficiency = field(default_factory=PlanEfficiency)
    comm: PlanComm = field(default_factory=PlanComm)


# ---- the model's inventory ------------------------------------------------------------------------------------


@dataclass
class Unit:
    """A piece that lives on one stage: a decoder layer, the embedding, the head, an MTP module."""

    name: str
    dense: int = 0  # parameters every rank holding the unit keeps
    experts: int = 0  # routed-expert parameters (divided by ep)
    fp8_params: int = 0  # parameters of FP8 GEMMs (linear layers of attention / MLPs / experts)
    moe: bool = False
    flops: dict[str, float] = field(default_factory=dict)  # per token: gemm, gemm_expert, bf16, attn, recompute
    act_bytes: float = 0.0  # activation bytes kept per token for the backward


def _unit_of(name: str) -> str:
    if name.startswith("embed."):
        return "embed"
    if name.startswith("layers."):
        return "layer" + name.split(".")[1]
    if name.startswith("head.mtp."):
        return "mtp" + name.split(".")[2]
    return "head"


def inventory(cfg: Any) -> dict[str, Unit]:
    """Parameters of every unit, from the real modules on the meta device (no memory)."""
    import torch

    from model.transformer import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg)
    units: dict[str, Unit] = {}
    for name, p in model.named_parameters():
        u = units.setdefault(_unit_of(name), Unit(_unit_of(name)))
        n = p.numel()
        if ".mlp.experts." in name:
            u.experts += n
            u.moe = True
        else:
            u.dense += n
        linear = p.dim() >= 2 and not name.startswith(("embed.", "head.lm_head")) and ".mlp.gate." not in name
        if linear:
            u.fp8_params += n
    for key, u in units.items():
        _fill_costs(cfg, key, u)
    return units


def _attn_params(cfg: Any) -> tuple[int, int]:
    """(all MLA projection weights, the up-projections the report recomputes in the backward)."""
    from model.info import attention_params

    heads = cfg.num_attention_heads
    up = (cfg.q_lora_rank * heads * cfg.qk_head_dim if cfg.q_lora_rank else 0) + \
        cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return attention_params(cfg), up


def _block_costs(cfg: Any, moe: bool) -> tuple[dict[str, float], float]:
    """Per-token FLOPs by kind and activation bytes kept, for one decoder block (main or MTP)."""
    h, heads, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts_per_tok
    attn, up = _attn_params(cfg)
    core = 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim) / 2  # x seq_len: causal attention, forward, per token
    flops = {"gemm": 6.0 * attn, "recompute": 2.0 * up, "attn_per_seq": 3.0 * core, "bf16": 0.0, "gemm_expert": 0.0}
    # kept for the backward (bytes per token): layer input (RMSNorm and MLA up-projections are recomputed from
    # it and the latents), the q/kv latents, the attention output and its softmax statistics
    kv = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    act = 2 * h + 2 * (cfg.q_lora_rank or 0) + 2 * kv + 2 * heads * cfg.v_head_dim + 4 * heads
    if moe:
        expert = 3 * h * cfg.moe_intermediate_size
        flops["gemm"] += 6.0 * cfg.n_shared_experts * expert
        flops["gemm_expert"] = 6.0 * k * expert
        flops["bf16"] = 6.0 * h * cfg.n_routed_experts  # the router
        # MoE input, router scores (fp32), dispatched tokens (FP8) and the SwiGLU inputs of routed and shared
        # experts (FP8, the report caches them and recomputes SwiGLU); no expert outputs: the gate-weight
        # gradient <dL/dy, e_i> equals <dL/ds_i, s_i> / g_i from the down-projection's own input and gradient
        act += 2 * h + 4 * cfg.n_routed_experts + k * h + 2 * (k + cfg.n_shared_experts) * cfg.moe_intermediate_size
    else:
        flops["gemm"] += 6.0 * 3 * h * cfg.intermediate_size
        act += 2 * h + 2 * cfg.intermediate_size  # FFN input, SwiGLU inputs (FP8)
    return flops, act


def _fill_costs(cfg: Any, key: str, u: Unit) -> None:
    h = cfg.hidden_size
    if key.startswith("layer"):
        u.flops, u.act_bytes = _block_costs(cfg, cfg.is_moe_layer(int(key[5:])))
    elif key.startswith("mtp"):
        u.flops, u.act_bytes = _block_costs(cfg, True)
        u.flops["gemm"] += 6.0 * 2 * h * h  # eh_proj
        u.flops["bf16"] += 6.0 * h * cfg.vocab_size  # the shared head, applied again
        u.act_bytes += 2 * 2 * h + 4  # the two normed inputs, the loss statistics (fused cross-entropy)
    elif key == "head":
        u.flops = {"bf16": 6.0 * h * cfg.vocab_size}
        u.act_bytes = 2 * h + 4  # head input; fused cross-entropy keeps no logits
    else:
        u.flops = {}  # an embedding lookup moves bytes, no FLOPs


# ---- placement --------------------------------------------------------------------------------------------------


def stage_layers(num_layers: int, stages: int) -> list[list[int]]:
    """Layers per stage, as even as possible; the stages with one layer fewer are the outermost ones."""
    base, extra = divmod(num_layers, stages)
    order = sorted(range(stages), key=lambda s: min(s, stages - 1 - s), reverse=True)  # innermost first
    sizes = [base] * stages
    for s in order[:extra]:
        sizes[s] += 1
    return _contiguous(sizes)


def _contiguous(sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


def rank_stages(schedule: str, pp: int) -> list[list[int]]:
    if schedule == "dualpipe":
        return [[r, pp - 1 - r] for r in range(pp)]
    if schedule == "dualpipev":
        return [[r, 2 * pp - 1 - r] for r in range(pp)]
    return [[r] for r in range(pp)]


def balanced_stage_layers(layer_cost: list[float], stage_extra: list[float], holds: list[list[int]]
                          ) -> list[list[int]]:
    """Contiguous layers per stage so that the busiest pipeline rank carries as little compute as possible.

    `layer_cost[i]`: layer i's cost; `stage_extra[s]`: work a stage has besides layers (the head and MTP on the
    last stage); `holds[r]`: the stages of rank r. Greedy: each next layer goes to the least loaded rank's
    smaller stage (every stage keeps at least one layer); then layers are laid out in order.
    """
    stages = len(stage_extra)
    mean = sum(layer_cost) / len(layer_cost)
    rank_of = {s: r for r, held in enumerate(holds) for s in held}
    sizes = [1] * stages
    load = [sum(stage_extra[s] + mean for s in held) for held in holds]
    for _ in range(len(layer_cost) - stages):
        s = min(range(stages), key=lambda s: (load[rank_of[s]], sizes[s], -min(s, stages - 1 - s)))
        sizes[s] += 1
        load[rank_of[s]] += mean
    return _contiguous(sizes)


def stage_units(cfg: Any, units: dict[str, Unit], layers: list[list[int]]) -> list[list[Unit]]:
    out = [[units[f"layer{i}"] for i in ls] for ls in layers]
    out[0].insert(0, units["embed"])
    out[-1] += [units["head"], *[units[k] for k in sorted(units) if k.startswith("mtp")]]
    return out


# ---- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything the planner computed (seconds, bytes, FLOPs); `render` prints it."""

    cfg: PlanConfig
    gpu: GpuSpec
    dp: int
    microbatches: int
    params: dict[str, float]  # total, activated, per heaviest rank (dense, experts)
    memory: dict[str, float]  # bytes per GPU of the heaviest rank, by kind
    memory_rank: int
    costs: dict[str, float]  # seconds per microbatch-chunk: f, b, w, fb, comm_f, comm_b, compute parts
    pipeline: dict[str, float]  # makespan, bubble, formula bubble, busy
    layers: list[int]  # decoder layers per stage
    step: dict[str, float]  # seconds: pipeline, grad_sync, optimizer, total
    a2a: dict[str, float]  # bytes per token per MoE layer, per GPU per step
    flops_per_token: float
    tokens_per_step: int
    tokens_per_s: float  # while training (before goodput)
    notes: list[str]

    @property
    def effective_tokens_per_s(self) -> float:
        return self.tokens_per_s * self.cfg.efficiency.goodput

    @property
    def gpu_hours_per_trillion(self) -> float:
        return self.cfg.gpus * 1e12 / self.effective_tokens_per_s / 3600

    @property
    def tokens_per_day(self) -> float:
        return self.effective_tokens_per_s * 86400

    def mfu(self, dtype: str) -> float:
        peak = self.gpu.fp8_tflops if dtype == "fp8" else self.gpu.bf16_tflops
        return self.tokens_per_s * self.flops_per_token / (self.cfg.gpus * peak * 1e12)


def load_model_config(name: str) -> Any:
    from model.config import ModelConfig

    path = Path(name)
    if not path.suffix:
        path = ROOT / "conf" / "model" / f"{name}.yaml"
    if not path.is_file():
        from trainer.errors import UserError

        presets = ", ".join(sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
        raise UserError("model", f"{name!r} is neither a preset nor a YAML file", f"use one of {presets}")
    return ModelConfig.from_yaml(path)


def _check(cfg: PlanConfig) -> tuple[int, int]:
    from parallel.schedules import ScheduleError, check_args
    from trainer.errors import UserError

    p, t = cfg.parallel, cfg.train
    if cfg.gpu not in GPUS:
        raise UserError("gpu", f"unknown GPU {cfg.gpu!r}", f"choose one of {', '.join(GPUS)}")
    if cfg.gpus % (p.pp * p.cp) or cfg.gpus % cfg.gpus_per_node:
        raise UserError("gpus", f"{cfg.gpus} GPUs are not a multiple of pp x cp = {p.pp} x {p.cp} and of "
                        f"gpus_per_node={cfg.gpus_per_node}", "use a multiple of both")
    dp = cfg.gpus // (p.pp * p.cp)  # data replicas; the data group of a stage has dp x cp GPUs
    if (dp * p.cp) % p.ep:
        raise UserError("parallel.ep", f"ep={p.ep} does not divide dp x cp = {dp * p.cp}",
                        "choose ep dividing gpus / pp")
    if t.seq_len % p.cp:
        raise UserError("parallel.cp", f"train.seq_len={t.seq_len} does not split into cp={p.cp} parts",
                        "choose cp dividing the sequence length")
    if t.recompute not in ("selective", "full"):
        raise UserError("train.recompute", f"unknown mode {t.recompute!r}", "use selective or full")
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise UserError("train.global_batch_size", f"{t.global_batch_size} is not a multiple of micro_batch_size x "
                        f"dp = {per_step}", f"use a multiple of {per_step}")
    m = t.global_batch_size // per_step
    try:
        check_args(p.schedule, p.pp, m)
    except ScheduleError as e:
        raise UserError("parallel.schedule", str(e), "change the batch or the pipeline size") from None
    if p.zero_stage not in (0, 1):
        raise UserError("parallel.zero_stage", f"{p.zero_stage} is not modelled", "use 0 or 1")
    return dp, m


def plan(cfg: PlanConfig, model_cfg: Any = None) -> Plan:
    from model.info import activated_params_per_token, training_flops_per_token
    from parallel.instructions import Placement
    from parallel.schedules import build_instructions
    from parallel.simulate import Costs, formula_bubble, simulate

    mc = model_cfg if model_cfg is not None else load_model_config(cfg.model)
    dp, m = _check(cfg)
    gpu = GPUS[cfg.gpu]
    p, t, e, prec, comm = cfg.parallel, cfg.train, cfg.efficiency, cfg.precision, cfg.comm
    if mc.n_routed_experts % p.ep:
        from trainer.errors import UserError

        raise UserError("parallel.ep", f"{mc.n_routed_experts} routed experts do not split over ep={p.ep}",
                        "choose ep dividing the expert count")
    if mc.num_attention_heads % p.cp:
        from trainer.errors import UserError

        raise UserError("parallel.cp", f"{mc.num_attention_heads} heads do not split over cp={p.cp}",
                        "choose cp dividing the number of heads")
    units = inventory(mc)
    recompute_peak = 0.0  # full recompute: one block's activations exist again while its backward runs
    if t.recompute == "full":  # a block keeps its input only (an MTP module also its normed inputs and loss stats)
        for key, u in units.items():
            if key.startswith(("layer", "mtp")):
                recompute_peak = max(recompute_peak, u.act_bytes)
                u.act_bytes = 2 * mc.hidden_size + (2 * 2 * mc.hidden_size + 4 if key.startswith("mtp") else 0)
    stages = 2 * p.pp if p.schedule == "dualpipev" else p.pp
    holds = rank_stages(p.schedule, p.pp)
    tokens_mb = t.micro_batch_size * t.seq_len // p.cp  # the positions a GPU holds of each microbatch

    # ---- compute time per microbatch-chunk -----------------------------------------------------------------
    sm = (gpu.sms - e.comm_sms) / gpu.sms
    gemm_peak = (gpu.fp8_tflops if prec.gemm == "fp8" else gpu.bf16_tflops) * 1e12 * e.gemm * sm
    bf16_peak = gpu.bf16_tflops * 1e12 * e.bf16_gemm * sm
    attn_peak = gpu.bf16_tflops * 1e12 * e.attention * sm
    hbm = gpu.hbm_tbps * 1e12 * e.hbm * sm
    nvlink = gpu.nvlink_gbps if cfg.nvlink_gbps is None else cfg.nvlink_gbps
    ib = gpu.ib_gbps if cfg.ib_gbps is None else cfg.ib_gbps
    nvlink_bw, ib_bw = nvlink / 2 * 1e9 * e.link, ib * 1e9 * e.link  # per direction

    nodes_per_ep = max(1, p.ep // cfg.gpus_per_node)
    npt = min(comm.nodes_per_token or mc.topk_group or nodes_per_ep, nodes_per_ep)
    remote_nodes = npt * (1 - 1 / nodes_per_ep) if nodes_per_ep > 1 else 0.0
    remote_gpus = mc.num_experts_per_tok * (1 - 1 / min(cfg.gpus_per_node, p.ep))
    per_copy = mc.hidden_size * (comm.dispatch_bytes + comm.combine_bytes)  # one pass (dispatch + combine)
    a2a_ib, a2a_nvlink = remote_nodes * per_copy, remote_gpus * per_copy  # bytes per token per MoE layer and pass
    comm_token = max(a2a_ib / ib_bw if ib_bw else 0.0, a2a_nvlink / nvlink_bw) * e.expert_imbalance
    # Ulysses: q, k, v out and the attention output back (BF16), (cp - 1) / cp of them leave the GPU; on the
    # attention's own critical path, so counted as compute time (nothing in the chunk hides them)
    cp_bytes = 2 * mc.num_attention_heads * (2 * mc.qk_head_dim + 2 * mc.v_head_dim) * (p.cp - 1) / p.cp
    cp_bw = nvlink_bw if p.cp <= cfg.gpus_per_node else ib_bw
    cp_token = cp_bytes / cp_bw if p.cp > 1 and cp_bw else 0.0

    def chunk(stage: list[Unit]) -> dict[str, float]:
        fl: dict[str, float] = {}
        for u in stage:
            for kind, v in u.flops.items():
                fl[kind] = fl.get(kind, 0.0) + v
        attn = fl.get("attn_per_seq", 0.0) * t.seq_len
        gemm = fl.get("gemm", 0.0) + fl.get("gemm_expert", 0.0) * e.expert_imbalance
        moe_layers = sum(1 for u in stage if u.moe)
        dense_layers = sum(1 for u in stage if u.name.startswith(("layer", "mtp")))
        elem = e.elementwise_bytes * mc.hidden_size * dense_layers / hbm  # forward, per token
        forward = gemm / 3 / gemm_peak + fl.get("bf16", 0.0) / 3 / bf16_peak + attn / 3 / attn_peak + elem
        forward += dense_layers * cp_token
        recompute = forward if t.recompute == "full" else fl.get("recompute", 0.0) / gemm_peak
        per_token = {
            "f": forward,
            "b_in": gemm / 3 / gemm_peak + fl.get("bf16", 0.0) / 3 / bf16_peak + 2 * attn / 3 / attn_peak
            + recompute + 2 * elem + dense_layers * cp_token,
            "w": gemm / 3 / gemm_peak + fl.get("bf16", 0.0) / 3 / bf16_peak,
            "comm": moe_layers * comm_token,
        }
        return {k: v * tokens_mb for k, v in per_token.items()}

    def work(us: list[Unit]) -> float:
        return sum(chunk([u])["f"] + chunk([u])["b_in"] + chunk([u])["w"] for u in us)

    if p.balance_layers:
        extra = [0.0] * stages
        extra[-1] = work([units["head"], *[u for k, u in units.items() if k.startswith("mtp")]])
        layers = balanced_stage_layers([work([units[f"layer{i}"]]) for i in range(mc.num_hidden_layers)], extra,
                                       holds)
    else:
        layers = stage_layers(mc.num_hidden_layers, stages)
    per_stage = stage_units(mc, units, layers)
    chunks = [chunk(s) for s in per_stage]
    # The simulator takes one cost set: the rank whose chunks cost most sets the pace.
    per_rank = [{k: sum(chunks[s][k] for s in held) / len(held) for k in chunks[0]} for held in holds]
    c = max(per_rank, key=lambda d: d["f"] + d["b_in"] + d["w"] + d["comm"])
    f_comp, b_comp, w_comp, comm_pass = c["f"], c["b_in"] + c["w"], c["w"], c["comm"]
    # full recompute runs each block's forward again in its backward: its dispatch and combine too
    comm_b = 2 * comm_pass if t.recompute == "full" else comm_pass
    costs = Costs(f=f_comp + comm_pass, b=b_comp + comm_b, w=w_comp,
                  fb=max(f_comp + b_comp, comm_pass + comm_b))
    tl = simulate(build_instructions(p.schedule, p.pp, m), Placement(p.schedule, p.pp), costs)
    formula = formula_bubble("zb1p" if p.schedule == "zb1p" else p.schedule, p.pp, costs.f, costs.b, costs.w,
                             costs.pair)

    # ---- memory per rank ------------------------------------------------------------------------------------
    zero = dp * p.cp  # ZeRO-1's group: the data replicas and their cp ranks
    exp_dp = zero // p.ep  # data-parallel replicas of one expert
    state_bytes = prec.master_bytes + 2 * prec.moment_bytes
    memory_by_rank = []
    for r, held in enumerate(holds):
        us = [u for s in held for u in per_stage[s]]
        dense = sum(u.dense for u in us)
        experts = sum(u.experts for u in us) / p.ep
        fp8 = sum(u.fp8_params - u.experts + u.experts / p.ep for u in us) if prec.gemm == "fp8" else 0
        act_chunk = sum(sum(u.act_bytes for u in per_stage[s]) for s in held) / len(held) * tokens_mb
        mem = {
            "weights": (dense + experts) * prec.weight_bytes + fp8 * prec.fp8_weight_cache_bytes,
            "gradients": (dense + experts) * prec.grad_bytes,
            "optimizer": (dense / (zero if p.zero_stage else 1) + experts / (exp_dp if p.zero_stage else 1))
            * state_bytes,
            "activations": tl.peak_activations[r] * act_chunk + recompute_peak * tokens_mb,
            "reserve": e.reserve_gib * GIB,
        }
        memory_by_rank.append((sum(mem.values()), r, mem, dense, experts))
    _, heavy, memory, heavy_dense, heavy_experts = max(memory_by_rank, key=lambda x: x[0])

    # ---- the rest of the step -------------------------------------------------------------------------------
    # ZeRO-1: reduce-scatter the gradients, all-gather the updated BF16 weights, over the data-parallel group
    # (dense) and the expert-data-parallel group (experts); both cross nodes, so InfiniBand sets the pace.
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731
    sync_bytes = (heavy_dense * ring(zero) + heavy_experts * ring(exp_dp)) * (comm.grad_sync_bytes + prec.weight_bytes)
    grad_sync = sync_bytes / ib_bw if ib_bw else 0.0
    shard = heavy_dense / (zero if p.zero_stage else 1) + heavy_experts / (exp_dp if p.zero_stage else 1)
    optimizer = shard * 2 * (state_bytes + prec.grad_bytes + prec.weight_bytes) / (gpu.hbm_tbps * 1e12 * e.hbm)
    step = tl.makespan + grad_sync + optimizer
    tokens_per_step = t.global_batch_size * t.seq_len

    notes = []
    if sum(memory.values()) > gpu.hbm_gib * GIB:
        notes.append(f"does not fit: rank {heavy} needs {sum(memory.values()) / GIB:.1f} GiB of {gpu.hbm_gib} GiB")
    if p.schedule == "dualpipe" and comm_pass + comm_b > f_comp + b_comp:
        notes.append("communication-bound: an F&B pair's all-to-all outlasts its compute")
    total = sum(u.dense + u.experts for k, u in units.items() if not k.startswith("mtp"))
    return Plan(
        cfg=cfg, gpu=gpu, dp=dp, microbatches=m,
        params={"total": total, "mtp": sum(u.dense + u.experts for k, u in units.items() if k.startswith("mtp")),
                "activated": activated_params_per_token(mc), "rank_dense": heavy_dense,
                "rank_experts": heavy_experts},
        memory=memory, memory_rank=heavy,
        costs={"f": costs.f, "b": costs.b, "w": costs.w, "fb": costs.pair, "f_compute": f_comp,
               "b_compute": b_comp, "comm_pass": comm_pass},
        layers=[len(ls) for ls in layers],
        pipeline={"makespan": tl.makespan, "bubble": tl.bubble, "formula_bubble": formula, "busy": min(tl.busy),
                  "peak_activations": max(tl.peak_activations)},
        step={"pipeline": tl.makespan, "grad_sync": grad_sync, "optimizer": optimizer, "total": step},
        a2a={"ib_per_token_layer": 2 * a2a_ib, "nvlink_per_token_layer": 2 * a2a_nvlink,
             "remote_nodes": remote_nodes, "moe_layers": mc.num_moe_layers + mc.num_nextn_predict_layers,
             "ib_per_gpu_step": 2 * a2a_ib * (mc.num_moe_layers + mc.num_nextn_predict_layers)
             * tokens_per_step / cfg.gpus},
        flops_per_token=training_flops_per_token(mc, t.seq_len), tokens_per_step=tokens_per_step,
        tokens_per_s=tokens_per_step / step, notes=notes,
    )


# ---- output -----------------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GIB:.1f} GiB"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


def render(pl: Plan) -> str:
    c, p, t, e = pl.cfg, pl.cfg.parallel, pl.cfg.train, pl.cfg.efficiency
    lines = [
        f"plan: {c.model} on {c.gpus} x {pl.gpu.name} ({c.gpus // c.gpus_per_node} nodes of {c.gpus_per_node}); "
        f"{p.schedule} pp={p.pp} x dp={pl.dp}" + (f" x cp={p.cp}" if p.cp > 1 else "")
        + f" (ep={p.ep} inside dp, {max(1, p.ep // c.gpus_per_node)} nodes per "
        f"expert group), ZeRO-{p.zero_stage}, {c.precision.gemm.upper()} GEMMs, {t.recompute} recompute",
        f"model: {pl.params['total'] / 1e9:.1f}B parameters (+{pl.params['mtp'] / 1e9:.1f}B MTP), "
        f"{pl.params['activated'] / 1e9:.1f}B matmul parameters per training token (MTP's reuse of the head "
        f"counted), "
        f"{pl.flops_per_token / 1e9:.0f} GFLOP per token (6N + attention at seq {t.seq_len})",
        f"batch: {t.global_batch_size} x {t.seq_len} = {pl.tokens_per_step / 1e6:.1f}M tokens per step, "
        f"{pl.microbatches} microbatches of {t.micro_batch_size} per pipeline; layers per stage "
        f"{' '.join(map(str, pl.layers))} (+ embedding on the first, head and MTP on the last)",
        "",
        f"per-GPU memory (heaviest: pipeline rank {pl.memory_rank}, {pl.params['rank_dense'] / 1e9:.2f}B dense + "
        f"{pl.params['rank_experts'] / 1e9:.2f}B expert parameters):",
    ]
    for key, what in (("weights", f"{c.precision.weight_bytes:g} B/param"),
                      ("gradients", f"{c.precision.grad_bytes:g} B/param accumulation"),
                      ("optimizer", f"ZeRO-{p.zero_stage}: master {c.precision.master_bytes:g} + moments "
                                    f"2x{c.precision.moment_bytes:g} B over dp / expert-dp"),
                      ("activations", f"{pl.pipeline['peak_activations']:.0f} microbatch-chunks in flight "
                                      f"({p.schedule})"),
                      ("reserve", "context, comm buffers, fragmentation")):
        lines.append(f"  {key:<12} {_gib(pl.memory[key]):>10}   {what}")
    lines.append(f"  {'total':<12} {_gib(sum(pl.memory.values())):>10}   of {pl.gpu.hbm_gib} GiB")
    lines += [
        "",
        f"all-to-all per token and MoE layer (forward + backward): InfiniBand {pl.a2a['ib_per_token_layer'] / 1e3:.0f}"
        f" KB ({pl.a2a['remote_nodes']:.2f} remote nodes), NVLink {pl.a2a['nvlink_per_token_layer'] / 1e3:.0f} KB; "
        f"{pl.a2a['ib_per_gpu_step'] / 1e9:.1f} GB per GPU per step over IB",
        f"per microbatch-chunk: F {_ms(pl.costs['f_compute'])} compute + {_ms(pl.costs['comm_pass'])} all-to-all, "
        f"B {_ms(pl.costs['b_compute'])} + {_ms(pl.costs['comm_pass'])} (W {_ms(pl.costs['w'])})"
        + (f", overlapped F&B pair {_ms(pl.costs['fb'])}" if p.schedule.startswith("dualpipe") else ""),
        f"pipeline: makespan {pl.pipeline['makespan']:.2f} s, bubble {pl.pipeline['bubble']:.2f} s "
        f"(Table 2 formula {pl.pipeline['formula_bubble']:.2f} s)",
        f"step: {pl.step['total']:.2f} s = pipeline {pl.step['pipeline']:.2f} + ZeRO-1 gradient sync "
        f"{pl.step['grad_sync']:.2f} + optimizer {pl.step['optimizer']:.3f}",
        f"throughput: {pl.tokens_per_s / 1e6:.2f}M tokens/s while training ({pl.tokens_per_s / c.gpus:.0f} per GPU),"
        f" MFU {pl.mfu('bf16') * 100:.1f}% of BF16 / {pl.mfu('fp8') * 100:.1f}% of FP8 peak; "
        f"x goodput {e.goodput:g}: {pl.tokens_per_day / 1e9:.1f}B tokens/day",
        f"{t.tokens / 1e12:g}T tokens: {pl.gpu_hours_per_trillion * t.tokens / 1e12 / 1e6:.2f}M GPU-hours, "
        f"{t.tokens / pl.tokens_per_day:.0f} days ({1e12 / pl.tokens_per_day:.2f} days per trillion tokens)",
        f"GPU-hours per trillion tokens: {pl.gpu_hours_per_trillion:,.0f}",
    ]
    if _is_report_setup(pl):
        ratio = pl.gpu_hours_per_trillion / REPORT["gpu_hours_per_trillion"]
        lines += ["", "DeepSeek-V3 report: 180,000 H800 GPU-hours per trillion tokens (2.664M for 14.8T pre-training); "
                  f"planner / report = {ratio:.2f} ({(ratio - 1) * 100:+.0f}%)"]
    lines += [f"note: {n}" for n in pl.notes]
    return "\n".join(lines) + "\n"


def _is_report_setup(pl: Plan) -> bool:
    c = pl.cfg
    return (c.model == "dsv3_671b" and c.gpus == REPORT["gpus"] and c.gpu == "h800" and c.parallel.pp == REPORT["pp"]
            and c.parallel.ep == REPORT["ep"] and c.train.global_batch_size == REPORT["global_batch_size"]
            and c.train.seq_len == REPORT["seq_len"])


def parse_args(argv: list[str]) -> PlanConfig:
    """key=value overrides (Hydra syntax, checked against PlanConfig's types)."""
    from omegaconf import OmegaConf

    for a in argv:
        if "=" not in a:
            from trainer.errors import UserError

            raise UserError(a, "not a key=value override", "e.g. python -m trainer.plan model=dsv3_671b parallel.pp=16")
    base = OmegaConf.structured(PlanConfig)
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    from trainer.errors import run_reporting_user_errors

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0

    def go() -> None:
        pl = plan(parse_args(args))
        print(render(pl), end="")

    run_reporting_user_errors(go)
    return 0


if __name__ == "__main__":
    sys.exit(main())
