"""The training job's config schema: one dataclass per Hydra group, registered in Hydra's ConfigStore.

conf/config.yaml composes the groups (model/, parallel/, precision/, data/, optim/, train/, logging/,
checkpoint/) on top of `JobConfig`, so an unknown key or a value of the wrong type fails while Hydra composes
the config, before anything runs. Cross-field rules (world size, batch arithmetic, data) live in
trainer/validate.py. Every key is documented in docs/trainer.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from model.config import ModelConfig

SCHEMA_NAME = "trainer_schema"
DTYPES = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("constant", "cosine", "wsd")
RESUME_MODES = ("auto", "never")  # or a checkpoint path
WANDB_MODES = ("offline", "online", "disabled")


EP_DISPATCHES = ("one_hop", "two_hop")
NETWORK_MODELS = ("none", "ib_nvlink")
NETWORK_CLOCKS = ("wall", "virtual")


@dataclass
class NetworkConfig:
    """A modelled interconnect under torch.distributed (parallel/modelled_comm.py; docs/expert_parallel.md): every
    transfer, ours and DeepSpeed's, completes no earlier than latency + bytes / bandwidth of the link it crosses.
    Defaults: the DeepSeek-V3 report's H800 cluster."""

    model: str = "none"  # none (off) | ib_nvlink (InfiniBand between nodes, NVLink inside one)
    latency_us: float = 5.0  # per message, microseconds
    intra_node_gbs: float = 160.0  # NVLink, GB/s per GPU
    inter_node_gbs: float = 50.0  # InfiniBand, GB/s per GPU (400 Gb/s)
    ranks_per_node: int = 8  # consecutive global ranks share a node
    # a rank's transfers in flight on one link type share its bandwidth, those of one process group one at a time
    # in post order (false: each gets the whole link, as if alone)
    shared_links: bool = True
    # wall: real time (valid while every rank has a core of its own) | virtual: each rank's thread CPU time plus
    # its modelled waits, for more processes than cores (torch then runs one thread per rank); the step's time
    # on it is logged as train/net_step_time_s
    clock: str = "wall"


@dataclass
class ParallelConfig:
    schedule: str = "none"  # none (plain DeepSpeedEngine: data parallel) | 1f1b | dualpipe | dualpipev
    pp: int = 1  # pipeline-parallel size
    dp: int | None = None  # data-parallel size (replicas reading different samples); null: world_size / (pp x cp)
    # context parallelism: each sequence split over cp ranks (Ulysses attention, docs/long_context.md); its ranks
    # read the same samples and reduce gradients with the data-parallel ones (ZeRO-1 over dp x cp)
    cp: int = 1
    ep: int = 1  # expert-parallel size, inside the dp x cp ranks of a stage (must divide dp x cp)
    # EP ranks per node when the EP group spans nodes (null: one node). Node-limited routing: the router's
    # groups must map onto nodes (n_group a multiple of ep / ep_ranks_per_node), so each token reaches at most
    # min(topk_group, nodes) nodes
    ep_ranks_per_node: int | None = None
    # one_hop: each of a token's K choices travels to its expert's rank | two_hop (needs ep_ranks_per_node):
    # once per destination node over the inter-node link, then to the node's expert ranks (parallel/two_hop.py)
    ep_dispatch: str = "one_hop"
    zero_stage: int = 1  # ZeRO stage of the optimizer states (0 or 1; pipelines need <= 1)
    defer_w: bool = True  # dualpipe/dualpipev: split backward, weight-gradients deferred to fill bubbles
    timeline_step: int = 0  # record this step's per-rank timeline (Chrome trace + PNG); 0: off
    network: NetworkConfig = field(default_factory=NetworkConfig)


MOMENT_DTYPES = ("fp32", "bf16")


@dataclass
class FP8Config:
    enabled: bool = False  # precision=fp8 turns it on: the GEMMs of attention, dense MLPs and experts in FP8
    # te (Transformer Engine, Hopper+) | emulated (quantize-dequantize in fp32, any device) | torch (real FP8 GEMMs
    # through torch._scaled_mm, no TE: SM89+; recipes blockwise and current; model/fp8/scaled_mm.py)
    backend: str = "te"
    recipe: str = "blockwise"  # blockwise (DeepSeek: 1x128 activations, 128x128 weights) | current | delayed | mxfp8
    amax_history: int = 16  # delayed: amaxes kept per operand
    dispatch: bool = False  # expert-parallel dispatch in FP8 (1x128 tiles); needs parallel.ep > 1
    # SwiGLU inputs kept for the backward in E4M3 1x128 tiles (the report's; the backward reads the rounded
    # values). The linear layers always keep their weight-gradient GEMM's own E4M3 operand (exact).
    swiglu_inputs_fp8: bool = True
    # backend torch: how operands are quantized: eager (torch ops) | compile (torch.compile) | triton (fused
    # kernels, blockwise only: one pass per activation writes both its GEMM operands; weights once per step)
    quantizer: str = "eager"


@dataclass
class PrecisionConfig:
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | bf16 | fp32
    grad_accum_dtype: str = "fp32"  # gradient accumulation / reduction dtype under bf16
    adam_moments_dtype: str = "fp32"  # fp32 | bf16 (AdamW moments in BF16, as the DeepSeek-V3 report)
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class DataConfig:
    dirs: list[str] = field(default_factory=lambda: ["data/python_stdlib"])  # prepared data_prep directories
    weights: list[float] | None = None  # blend weights, one per directory (null: equal)
    mode: str = "pack"  # pack (documents concatenated) | pad (one document per sample)
    # pack: attention and targets stay inside each document (false: across them, as DeepSeek-V3 pre-trains)
    document_mask: bool = False
    restart_positions: bool = False  # with document_mask: RoPE positions restart at each document
    # shard checks: size (file sizes, token ids) | full (also sha256; every shard hashed and scanned at start)
    verify: str = "size"
    seed: int = 1234  # sample order seed


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # end of the cosine / decay phase
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms, biases (and the router bias, a buffer)
    grad_clip: float = 1.0  # global grad-norm clipping; 0 disables
    schedule: str = "cosine"  # constant | cosine | wsd (warmup-stable-decay)
    warmup_steps: int = 20  # linear warmup from 0
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying (cosine to min_lr) at the end
    torch_adam: bool | None = None  # null: torch.optim.AdamW on CPU, DeepSpeed FusedAdam on GPU


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps (global batches) of the whole run
    seq_len: int = 128
    micro_batch_size: int = 4  # samples per microbatch per data-parallel rank
    global_batch_size: int = 16  # samples per optimizer step over all data-parallel ranks
    grad_accum: int | None = None  # null: global / (micro x dp); if set, must agree
    seed: int = 42  # model init and RNG seed
    eval_interval: int = 50  # evaluate every N steps (0: only at the end)
    eval_batches: int = 16  # validation microbatches per evaluation, over all data-parallel ranks (0: none)
    resume: str = "auto"  # auto: newest complete checkpoint in the run dir | never | a checkpoint path
    # a new run from another run's checkpoint (e.g. the long-context phases after pre-training): its weights and
    # router biases, fresh step count, data position and LR schedule; a checkpoint of this run resumes first
    init_from: str | None = None
    init_optimizer: bool = False  # with init_from: carry the fp32 master weights and Adam moments too
    max_seconds: float | None = None  # stop early (with a checkpoint) after this much training time
    on_nonfinite: str = "stop"  # non-finite loss/grad norm: stop (exit 4, last good checkpoint kept) | skip the step
    max_consecutive_skips: int = 10  # on_nonfinite=skip: stop after this many non-finite steps in a row
    fault_timeout: float | None = 180.0  # watchdog: a rank silent this long (s) stops every rank (exit 3); null: off
    step_timeout: float | None = None  # watchdog: no step finished for this long (s) = a hung rank (exit 3); null: off


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (no network, no key) | online | disabled
    project: str = "dsv3-trainer"
    entity: str | None = None
    group: str | None = None  # null: the sweep name under -m, else none


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float | None = None  # per-device dense peak for MFU; null: look the GPU up in a table
    deepspeed_log_level: str = "WARNING"  # DeepSpeed's own logger


@dataclass
class CheckpointConfig:
    dir: str | None = None  # null: <run_dir>/checkpoints
    interval: int = 100  # save every N steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints kept (older ones are deleted)
    save_final: bool = True
    export_hf: bool = False  # after the final save, write a Hugging Face copy to <run_dir>/hf (rank 0)
    async_save: bool = False  # write in the background while training goes on (docs/checkpoints.md)


@dataclass
class JobConfig:
    name: str = "default"  # run name (wandb name, run directory runs/<name>)
    run_dir: str | None = None  # null: runs/<name>; in a sweep, the job's directory multirun/<name>/<launch>/<job>
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # merged last into the generated DeepSpeed config


def launch_id() -> str:
    """One id per launch, equal on every rank of it: names the multirun sweep directory.

    DSV3_LAUNCH_ID or SLURM_JOB_ID when set; with several local ranks, the start time of the launcher that
    spawned them (their common parent); else now.
    """
    for var in ("DSV3_LAUNCH_ID", "SLURM_JOB_ID"):
        if os.environ.get(var):
            return os.environ[var]
    stamp = _launch_time()
    # exported, so that processes this one starts (submitit's sbatch jobs inherit the environment) agree on it
    os.environ["DSV3_LAUNCH_ID"] = stamp
    return stamp


def _launch_time() -> str:
    start = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            import psutil

            start = psutil.Process(os.getppid()).create_time()
        except Exception:  # no psutil / no parent: fall back to the clock
            pass
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(start))


def register_configs() -> None:
    """Register the schema (idempotent) and the `launch_id` resolver used by conf/config.yaml."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name=SCHEMA_NAME, node=JobConfig)
    if not OmegaConf.has_resolver("launch_id"):
        OmegaConf.register_new_resolver("launch_id", launch_id, use_cache=True)


# Keys that may change between a run and its resumption without changing what is trained.
_UNHASHED = {"name", "run_dir", "logging", "checkpoint", ("train", "resume"), ("train", "max_seconds"),
             ("train", "eval_interval"), ("train", "eval_batches")}


def training_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that defines the training trajectory (hashed into checkpoints)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in _UNHASHED:
            continue
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if (key, k) not in _UNHASHED}
        out[key] = value
    return out


def config_hash(cfg: dict[str, Any]) -> str:
    blob = json.dumps(training_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
