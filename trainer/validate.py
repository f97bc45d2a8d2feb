"""Cross-field checks of a composed config, run before any process group exists.

Hydra and the schema already rejected unknown keys and wrong types; here the values are checked against
each other, against the launch (world size, device) and against the data on disk. The first problem found
raises `UserError` (one line: key, problem, fix); `validate` returns the derived `Layout` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.compiled import compile_problem
from model.fp8.factory import FP8_BACKENDS, FP8_QUANTIZERS, FP8_RECIPES
from parallel.network_model import NetworkModel, NetworkModelError
from parallel.step_schedule import DUALPIPES, PIPELINES, SCHEDULES
from trainer.config import (
    DTYPES,
    EP_DISPATCHES,
    LR_SCHEDULES,
    MOMENT_DTYPES,
    NETWORK_CLOCKS,
    NETWORK_MODELS,
    RESUME_MODES,
    WANDB_MODES,
    JobConfig,
)
from trainer.errors import UserError


@dataclass(frozen=True)
class Layout:
    """What the config and the launch imply: parallel sizes, batch arithmetic, compute dtype, data facts."""

    world_size: int
    pp: int
    dp: int
    ep: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    dtype: str  # "bf16" | "fp32" (auto resolved)
    device: str  # "cpu" | "cuda"
    data_vocab_size: int
    cp: int = 1  # context parallelism: dp counts data replicas; a stage's ZeRO-1 group has dp x cp ranks

    def data_rank(self, rank: int) -> int:
        """The data replica a rank reads samples for (ranks are pipe-major, the cp ranks of a replica adjacent)."""
        return (rank % (self.dp * self.cp)) // self.cp


MAX_DOCUMENT_MASK_LEN = 16384  # a dense boolean mask of 256 MiB per sample


def _need(cond: bool, key: str, problem: str, fix: str) -> None:
    if not cond:
        raise UserError(key, problem, fix)


def _check_scalars(cfg: JobConfig) -> None:
    t, o, c = cfg.train, cfg.optim, cfg.checkpoint
    _need(cfg.parallel.schedule in SCHEDULES, "parallel.schedule", f"unknown schedule {cfg.parallel.schedule!r}",
          f"choose one of {', '.join(SCHEDULES)}")
    _need(cfg.parallel.pp >= 1, "parallel.pp", f"must be >= 1, got {cfg.parallel.pp}", "set parallel.pp=1")
    _need(cfg.parallel.ep >= 1, "parallel.ep", f"must be >= 1, got {cfg.parallel.ep}", "set parallel.ep=1")
    _need(cfg.parallel.zero_stage in (0, 1), "parallel.zero_stage",
          f"ZeRO stage {cfg.parallel.zero_stage} is not supported here",
          "use 0 or 1 (stages 2/3 shard gradients/weights, which the pipeline schedules cannot use)")
    _need(cfg.precision.dtype in DTYPES, "precision.dtype", f"unknown dtype {cfg.precision.dtype!r}",
          f"choose one of {', '.join(DTYPES)} (or precision=bf16 / precision=fp32)")
    _need(cfg.precision.grad_accum_dtype in ("fp32", "bf16"), "precision.grad_accum_dtype",
          f"unknown dtype {cfg.precision.grad_accum_dtype!r}", "use fp32 (recommended) or bf16")
    _need(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}", "set train.steps to the number of steps")
    _need(t.seq_len >= 1, "train.seq_len", f"must be >= 1, got {t.seq_len}", "set e.g. train.seq_len=128")
    _need(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}",
          "set e.g. train.micro_batch_size=4")
    _need(t.global_batch_size >= 1, "train.global_batch_size", f"must be >= 1, got {t.global_batch_size}",
          "set e.g. train.global_batch_size=16")
    _need(t.eval_interval >= 0, "train.eval_interval", f"must be >= 0, got {t.eval_interval}",
          "use 0 to evaluate only at the end")
    _need(t.eval_batches >= 0, "train.eval_batches", f"must be >= 0, got {t.eval_batches}",
          "use 0 to skip evaluation")
    _need(t.max_seconds is None or t.max_seconds > 0, "train.max_seconds", f"must be > 0, got {t.max_seconds}",
          "use null for no time limit")
    _need(t.resume in RESUME_MODES or Path(t.resume).exists(), "train.resume",
          f"{t.resume!r} is neither auto, never nor an existing checkpoint path",
          "use train.resume=auto, train.resume=never or the path of a checkpoint directory")
    _need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}", "set e.g. optim.lr=3e-3")
    _need(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be within [0, optim.lr={o.lr}], got {o.min_lr}",
          "set optim.min_lr to about optim.lr / 10")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
          f"must be two numbers in [0, 1), got {list(o.betas)}", "use optim.betas=[0.9,0.95]")
    _need(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}", "use optim.eps=1e-8")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}", "use 0.1 (or 0)")
    _need(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {o.grad_clip}", "use 1.0, or 0 to disable")
    _need(o.schedule in LR_SCHEDULES, "optim.schedule", f"unknown schedule {o.schedule!r}",
          f"choose one of {', '.join(LR_SCHEDULES)}")
    _need(0 <= o.warmup_steps <= t.steps, "optim.warmup_steps",
          f"must be within [0, train.steps={t.steps}], got {o.warmup_steps}", "lower optim.warmup_steps")
    _need(0 < o.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}",
          "use e.g. optim.decay_fraction=0.2")
    _need(c.interval >= 0, "checkpoint.interval", f"must be >= 0, got {c.interval}",
          "use 0 to save only at the end")
    _need(c.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {c.keep_last}",
          "keep at least the newest checkpoint")
    _need(cfg.logging.wandb.mode in WANDB_MODES, "logging.wandb.mode", f"unknown mode {cfg.logging.wandb.mode!r}",
          f"choose one of {', '.join(WANDB_MODES)}")
    _need(cfg.logging.peak_tflops is None or cfg.logging.peak_tflops > 0, "logging.peak_tflops",
          f"must be > 0, got {cfg.logging.peak_tflops}", "use null to look the GPU up")
    for key in ("scheduler", "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        own = {"scheduler": "optim.schedule", "train_batch_size": "train.global_batch_size",
               "train_micro_batch_size_per_gpu": "train.micro_batch_size",
               "gradient_accumulation_steps": "train.grad_accum"}[key]
        _need(key not in cfg.deepspeed, f"deepspeed.{key}", "is generated from the Hydra config",
              f"set {own} instead")


def _parallel_sizes(cfg: JobConfig, world_size: int) -> tuple[int, int, int, int]:
    p = cfg.parallel
    _need(p.cp >= 1, "parallel.cp", f"must be >= 1, got {p.cp}", "set parallel.cp=1 (no context parallelism)")
    _need(world_size % (p.pp * p.cp) == 0, "parallel.pp" if p.cp == 1 else "parallel.cp",
          f"world size {world_size} is not a multiple of pp={p.pp}" + (f" x cp={p.cp}" if p.cp > 1 else ""),
          "launch pp x dp x cp ranks or change parallel.pp / parallel.cp")
    dp = p.dp if p.dp is not None else world_size // (p.pp * p.cp)
    _need(dp >= 1, "parallel.dp", f"must be >= 1, got {dp}", "set parallel.dp=null to derive it")
    _need(p.pp * dp * p.cp == world_size, "parallel.dp",
          f"pp x dp x cp = {p.pp} x {dp} x {p.cp} = {p.pp * dp * p.cp} but {world_size} ranks were launched",
          f"launch {p.pp * dp * p.cp} ranks, or set parallel.dp={world_size // (p.pp * p.cp)} (or null)")
    _need((dp * p.cp) % p.ep == 0, "parallel.ep", f"ep={p.ep} does not divide dp={dp}" + (
          f" x cp={p.cp}" if p.cp > 1 else ""), "choose an expert-parallel size that divides the data-parallel size")
    _need(p.ep <= 1 or cfg.model.n_routed_experts % p.ep == 0, "parallel.ep",
          f"{cfg.model.n_routed_experts} routed experts do not split over ep={p.ep} ranks",
          "choose ep dividing model.n_routed_experts")
    if p.cp > 1:  # Ulysses: every rank holds seq_len / cp positions and num_attention_heads / cp heads
        _need(p.schedule != "1f1b", "parallel.cp",
              "context parallelism runs with parallel.schedule none, dualpipe or dualpipev, not 1f1b (DeepSpeed's "
              "PipelineEngine)", "use parallel.schedule=dualpipev (or dualpipe, none), or parallel.cp=1")
        _need(cfg.train.seq_len % p.cp == 0, "parallel.cp",
              f"train.seq_len={cfg.train.seq_len} does not split into cp={p.cp} equal parts",
              f"use a train.seq_len divisible by {p.cp}")
        _need(cfg.model.num_attention_heads % p.cp == 0, "parallel.cp",
              f"model.num_attention_heads={cfg.model.num_attention_heads} do not split over cp={p.cp} ranks "
              "(Ulysses attention gives each rank heads / cp heads)", "choose cp dividing the number of heads")
    return p.pp, dp, p.ep, p.cp


def _batch_sizes(cfg: JobConfig, dp: int, pp: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * dp
    nearest = per_step * max(1, t.global_batch_size // per_step)
    _need(t.global_batch_size % per_step == 0, "train.global_batch_size",
          f"{t.global_batch_size} is not a multiple of micro_batch_size x dp = {t.micro_batch_size} x {dp}",
          f"use a multiple of {per_step}, e.g. train.global_batch_size={nearest}")
    accum = t.global_batch_size // per_step
    if t.grad_accum is not None:
        _need(t.grad_accum == accum, "train.grad_accum",
              f"global batch {t.global_batch_size} != micro {t.micro_batch_size} x accumulation {t.grad_accum} "
              f"x dp {dp}", f"set train.grad_accum={accum} or null (derived)")
    if cfg.parallel.schedule in DUALPIPES:
        _need(accum >= 2 * pp, "train.global_batch_size",
              f"DualPipe needs >= 2 x pp = {2 * pp} microbatches per step, got {accum}",
              f"raise train.global_batch_size to >= {2 * pp * per_step}")
    return accum


def _check_model_fit(cfg: JobConfig) -> None:
    m, t = cfg.model, cfg.train
    _need(t.seq_len <= m.max_position_embeddings, "train.seq_len",
          f"{t.seq_len} exceeds the model's max_position_embeddings={m.max_position_embeddings}",
          f"lower train.seq_len or raise model.max_position_embeddings to >= {t.seq_len}")


def _check_data(cfg: JobConfig) -> int:
    """Every data dir prepared, one tokenizer, a vocabulary the model's embedding can hold, no recorded token id
    outside it, and validation data when the run evaluates (the reader's own checks run in trainer/data.py)."""
    from data_prep.errors import DataError
    from data_prep.manifest import Manifest, read_manifest

    d = cfg.data
    _need(len(d.dirs) >= 1, "data.dirs", "no data directory given", "set data.dirs=[data/python_stdlib]")
    _need(d.weights is None or len(d.weights) == len(d.dirs), "data.weights",
          f"{0 if d.weights is None else len(d.weights)} weights for {len(d.dirs)} directories",
          "give one weight per directory, or null")
    _need(d.weights is None or all(w > 0 for w in d.weights), "data.weights", "weights must be positive",
          "use positive blend weights")
    _need(d.mode in ("pack", "pad"), "data.mode", f"unknown mode {d.mode!r}", "use pack or pad")
    _need(d.verify in ("size", "full"), "data.verify", f"unknown mode {d.verify!r}", "use size or full")
    _need(not d.document_mask or d.mode == "pack", "data.document_mask",
          f"keeps packed documents apart, but data.mode={d.mode} holds one document per sample",
          "use data.mode=pack, or data.document_mask=false")
    _need(not d.document_mask or cfg.train.seq_len <= MAX_DOCUMENT_MASK_LEN, "data.document_mask",
          f"builds a dense [S, S] mask per sample: {cfg.train.seq_len ** 2 / 2**30:.1f} GiB at train.seq_len="
          f"{cfg.train.seq_len}", f"use data.document_mask=false above seq_len {MAX_DOCUMENT_MASK_LEN} (a varlen/flex "
          "attention path is not built yet)")
    _need(not d.restart_positions or d.document_mask, "data.restart_positions",
          "restarts RoPE positions at document starts, which needs data.document_mask=true",
          "set data.document_mask=true too, or data.restart_positions=false")
    evaluates = cfg.train.eval_batches > 0
    vocab = 0
    manifests: list[tuple[str, Manifest]] = []
    for directory in d.dirs:
        path = Path(directory)
        if path.is_dir():
            try:
                manifest = read_manifest(path)
            except DataError as e:
                raise UserError("data.dirs", f"{directory} is not a prepared data directory ({e})",
                                f"run `python -m data_prep out_dir={directory}` first") from None
            vocab = max(vocab, manifest.vocab_size)
            manifests.append((directory, manifest))
        else:
            # A Megatron PREFIX.bin/.idx pair has no manifest; the reader checks it when it opens it.
            megatron = Path(str(path) + ".bin").exists() or path.suffix == ".bin" and path.exists()
            _need(megatron, "data.dirs", f"{directory} does not exist",
                  f"prepare it with `python -m data_prep out_dir={directory}` (scripts/train.sh does this "
                  "for the default corpus)")
            _need(not evaluates, "train.eval_batches",
                  f"{directory} is a Megatron .bin/.idx pair, which has no validation split",
                  "set train.eval_batches=0, or train on a data_prep directory (it has a val split)")
    _need(vocab <= cfg.model.vocab_size, "model.vocab_size",
          f"the tokenizer has {vocab} tokens but the model's embedding holds {cfg.model.vocab_size}",
          f"set model.vocab_size>={vocab} or prepare the data with tokenizer.vocab_size<={cfg.model.vocab_size}")
    for directory, manifest in manifests:
        limit = min(manifest.vocab_size, cfg.model.vocab_size)
        for split in ("train", "val") if evaluates else ("train",):
            info = manifest.splits.get(split)
            for shard in info.shards if info is not None else []:
                # the largest id of each shard, as data_prep recorded it (older manifests: the reader scans)
                _need(shard.max_id is None or shard.max_id < limit, "data.dirs",
                      f"{Path(directory) / shard.bin_file} holds token id {shard.max_id}, outside the vocabulary "
                      f"(the tokenizer's {manifest.vocab_size} ids, model.vocab_size={cfg.model.vocab_size})",
                      f"rerun `python -m data_prep out_dir={directory} ...` with the tokenizer the model was meant "
                      "for (or overwrite=true) to rebuild it")
        val = manifest.splits.get("val")
        _need(not evaluates or (val is not None and val.num_tokens > 0), "train.eval_batches",
              f"{directory} has an empty validation split (prepared with "
              f"val_fraction={manifest.params.get('val_fraction')}), but the run evaluates {cfg.train.eval_batches} "
              "microbatches", "prepare it with more documents or a larger val_fraction, or set train.eval_batches=0")
    return vocab


def _check_pipeline(cfg: JobConfig, pp: int, microbatches: int) -> None:
    """Stage placement and schedule shape: even pp for DualPipe, layers split evenly over the stages."""
    schedule = cfg.parallel.schedule
    _need(cfg.parallel.timeline_step >= 0, "parallel.timeline_step", f"must be >= 0, got {cfg.parallel.timeline_step}",
          "use 0 to record no timeline")
    if schedule not in PIPELINES:
        _need(pp == 1, "parallel.pp", f"pp={pp} needs a pipeline schedule, but parallel.schedule={schedule}",
              "set parallel.pp=1, or parallel.schedule=dualpipe|dualpipev|1f1b")
        return
    from parallel.schedules import ScheduleError, check_args

    try:
        check_args("1f1b" if schedule == "1f1b" else schedule, pp, microbatches)
    except ScheduleError as e:
        raise UserError("parallel.pp", str(e), "see docs/pipeline.md for each schedule's needs") from None
    stages = 2 * pp if schedule == "dualpipev" else pp
    layers = cfg.model.num_hidden_layers
    _need(layers % stages == 0, "parallel.pp",
          f"{layers} decoder layers do not split into the {stages} stages of {schedule} at pp={pp}",
          "choose pp so the stage count divides model.num_hidden_layers")
    _need(cfg.parallel.zero_stage <= 1, "parallel.zero_stage", "pipelines need ZeRO stage 0 or 1",
          "set parallel.zero_stage=1")


def _check_precision(cfg: JobConfig, device: str, ep: int) -> None:
    """FP8 (docs/fp8.md) and the BF16 optimizer moments: values, the schedules they are wired into, and for
    Transformer Engine the machine (TE installed, GPU new enough for the recipe) and the GEMM shapes."""
    p, f = cfg.precision, cfg.precision.fp8
    _need(p.adam_moments_dtype in MOMENT_DTYPES, "precision.adam_moments_dtype",
          f"unknown dtype {p.adam_moments_dtype!r}", "use fp32 or bf16")
    _need(p.adam_moments_dtype == "fp32" or cfg.parallel.schedule != "1f1b", "precision.adam_moments_dtype",
          "bf16 moments are not wired into parallel.schedule=1f1b", "use dualpipe, dualpipev or none")
    _need(f.backend in FP8_BACKENDS, "precision.fp8.backend", f"unknown backend {f.backend!r}",
          f"choose one of {', '.join(FP8_BACKENDS)}")
    _need(f.recipe in FP8_RECIPES, "precision.fp8.recipe", f"unknown recipe {f.recipe!r}",
          f"choose one of {', '.join(FP8_RECIPES)}")
    _need(f.amax_history >= 1, "precision.fp8.amax_history", f"must be >= 1, got {f.amax_history}",
          "use e.g. 16")
    _need(not f.dispatch or f.enabled, "precision.fp8.dispatch", "FP8 dispatch needs FP8 training",
          "set precision=fp8, or precision.fp8.dispatch=false")
    _need(not f.dispatch or ep > 1, "precision.fp8.dispatch",
          f"quantizes the expert-parallel all-to-all, but parallel.ep={ep}",
          "set parallel.ep>1, or precision.fp8.dispatch=false")
    _need(f.quantizer in FP8_QUANTIZERS, "precision.fp8.quantizer", f"unknown quantizer {f.quantizer!r}",
          f"choose one of {', '.join(FP8_QUANTIZERS)}")
    if not f.enabled:
        return
    _need(f.quantizer == "eager" or f.backend == "torch", "precision.fp8.quantizer",
          f"quantizer {f.quantizer} is the torch backend's (backend {f.backend} quantizes its own way)",
          "set precision.fp8.backend=torch, or precision.fp8.quantizer=eager")
    _need(cfg.parallel.schedule != "1f1b", "precision.fp8.enabled", "FP8 is not wired into parallel.schedule=1f1b",
          "use parallel.schedule=dualpipe, dualpipev or none")
    if f.backend == "torch":  # real FP8 GEMMs through torch._scaled_mm: a CUDA GPU with FP8 tensor cores
        from model.fp8.scaled_mm import NativeFP8Unavailable, check_fused, check_native

        try:
            check_native(f.recipe, device)
            if f.quantizer == "triton":
                check_fused(f.recipe, device)
        except NativeFP8Unavailable as e:
            raise UserError(e.key, e.problem, e.fix) from None
        return
    if f.backend != "te":
        return
    fix = "use precision.fp8.backend=emulated"
    _need(device == "cuda", "precision.fp8.backend", "Transformer Engine needs a CUDA GPU and none is visible", fix)
    _need(resolve_dtype(cfg, device) == "bf16", "precision.dtype",
          f"Transformer Engine FP8 runs with bf16 parameters, got {cfg.precision.dtype}",
          "set precision.dtype=bf16 (or auto)")
    recomputes = cfg.model.activation_checkpointing or cfg.model.selective_recompute
    _need(not (f.recipe == "delayed" and recomputes), "precision.fp8.recipe",
          "delayed scaling with activation checkpointing or selective recompute records every amax twice (forward "
          "and recompute), so the recompute quantizes differently",
          "use recipe=blockwise or current, or turn model.activation_checkpointing / selective_recompute off")
    from model.fp8.te import TEUnavailable, check_te, shape_problems

    try:
        check_te(f.recipe)
    except TEUnavailable as e:
        raise UserError("precision.fp8.backend", e.problem, e.fix) from None
    problems = shape_problems(cfg.model, f.recipe, cfg.train.micro_batch_size * cfg.train.seq_len)
    _need(not problems, "precision.fp8.recipe",
          f"Transformer Engine's FP8 GEMMs need aligned shapes: {', '.join(problems)}",
          f"change those sizes, choose a recipe with a smaller multiple (current: 16), or {fix}")


def resolve_dtype(cfg: JobConfig, device: str) -> str:
    if cfg.precision.dtype == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return cfg.precision.dtype


def network_model(cfg: JobConfig) -> NetworkModel | None:
    """`parallel.network` as a NetworkModel (None: off); an impossible value names its key."""
    net = cfg.parallel.network
    _need(net.model in NETWORK_MODELS, "parallel.network.model", f"unknown network model {net.model!r}",
          f"choose one of {', '.join(NETWORK_MODELS)}")
    _need(net.clock in NETWORK_CLOCKS, "parallel.network.clock", f"unknown clock {net.clock!r}",
          f"choose one of {', '.join(NETWORK_CLOCKS)}")
    if net.model == "none":
        return None
    try:
        return NetworkModel(latency_us=net.latency_us, intra_node_gbs=net.intra_node_gbs,
                            inter_node_gbs=net.inter_node_gbs, ranks_per_node=net.ranks_per_node,
                            shared_links=bool(net.shared_links))
    except NetworkModelError as e:
        key, _, problem = str(e).partition(": ")
        raise UserError(f"parallel.network.{key}", problem, "see docs/expert_parallel.md (modelled "
                        "interconnect)") from None


def validate(cfg: JobConfig, world_size: int, device: str, check_data: bool = True) -> Layout:
    """All cross-field rules; raises UserError on the first violation, else returns the Layout."""
    _check_scalars(cfg)
    pp, dp, ep, cp = _parallel_sizes(cfg, world_size)
    accum = _batch_sizes(cfg, dp, pp)
    _check_model_fit(cfg)
    vocab = _check_data(cfg) if check_data else 0
    _check_pipeline(cfg, pp, accum)
    _check_precision(cfg, device, ep)
    if cfg.model.compile_regions:
        problem = compile_problem(device)
        _need(problem is None, "model.compile_regions", str(problem),
              "install a C++ compiler (CPU) or Triton (CUDA), or set model.compile_regions=false")
    _need(cfg.parallel.network.model == "none" or device == "cpu", "parallel.network.model",
          f"the modelled interconnect runs on CPU ranks (gloo), this job runs on {device}",
          "set parallel.network.model=none")
    network_model(cfg)
    # -- expert parallelism (parallel/expert_shard.py), every schedule, under ZeRO-1 (its optimizer reduces expert
    # gradients over the expert-DP group; stage 0 would all-reduce them over dp)
    if ep > 1 and cfg.parallel.schedule == "1f1b" and cfg.model.num_hidden_layers % pp == 0:
        per_stage = cfg.model.num_hidden_layers // pp
        # DeepSpeed's ZeRO-1 all-reduces the gradient norm over the pipeline once per parameter group, and a
        # stage without experts has fewer groups: the stages would wait on each other forever
        _need(cfg.model.first_k_dense_replace < per_stage, "parallel.ep",
              f"with parallel.schedule=1f1b every pipeline stage needs a MoE layer, but stage 0 holds layers "
              f"0-{per_stage - 1}, all dense (model.first_k_dense_replace={cfg.model.first_k_dense_replace})",
              f"lower model.first_k_dense_replace below {per_stage}, use fewer stages, or "
              "parallel.schedule=dualpipe|dualpipev")
    if cfg.parallel.ep_ranks_per_node is not None:  # node-limited routing: router groups map onto nodes
        from parallel.expert_shard import node_limited_groups

        try:
            node_limited_groups(ep, cfg.parallel.ep_ranks_per_node, cfg.model.n_group, cfg.model.topk_group)
        except ValueError as e:
            raise UserError("parallel.ep_ranks_per_node", str(e), "see docs/expert_parallel.md (node-limited "
                            "routing)") from None
    dispatch = cfg.parallel.ep_dispatch
    _need(dispatch in EP_DISPATCHES, "parallel.ep_dispatch", f"unknown dispatch {dispatch!r}",
          f"choose one of {', '.join(EP_DISPATCHES)}")
    if dispatch == "two_hop":
        _need(ep > 1 and cfg.parallel.ep_ranks_per_node is not None, "parallel.ep_dispatch",
              f"two_hop needs expert parallelism over nodes, got ep={ep}, "
              f"ep_ranks_per_node={cfg.parallel.ep_ranks_per_node}",
              "set parallel.ep>1 and parallel.ep_ranks_per_node (EP ranks per node), or ep_dispatch=one_hop")
        _need(not cfg.precision.fp8.dispatch, "parallel.ep_dispatch", "two_hop does not send FP8 rows",
              "set precision.fp8.dispatch=false, or parallel.ep_dispatch=one_hop")
    _need(ep == 1 or cfg.parallel.zero_stage == 1, "parallel.ep",
          f"ep={ep} needs the ZeRO-1 optimizer, got zero_stage={cfg.parallel.zero_stage}",
          "set parallel.zero_stage=1")
    # -- end expert parallelism
    return Layout(
        world_size=world_size, pp=pp, dp=dp, ep=ep, micro_batch_size=cfg.train.micro_batch_size,
        grad_accum=accum, global_batch_size=cfg.train.global_batch_size, dtype=resolve_dtype(cfg, device),
        device=device, data_vocab_size=vocab, cp=cp,
    )
