"""Worker bodies for the expert-parallel DeepSpeed-engine tests: ep ranks with ZeRO-1 through
`deepspeed.initialize` (the trainer's `parallel.schedule=none` path) against single-process AdamW training."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.parallel import engine_workers
from tests.parallel.engine_workers import EPS, LR, WD, capture_grads, compare, reference_steps
from tests.parallel.pipeline_workers import MICRO, make_batches

# Router biases for selection only (scores lie in (0, 1), so +-10 decides): experts 1, 2 and 6 never chosen
# (one empty expert on ep rank 1 and two on ep rank 0 at ep=2), expert 5 always.
BAN, FAVOUR = (1, 2, 6), (5,)


def skew(model: torch.nn.Module) -> None:
    for router in model.routers():
        for e in BAN:
            router.e_score_correction_bias[e] = -10.0
        for e in FAVOUR:
            router.e_score_correction_bias[e] = 10.0


def skewed_model(cfg) -> DeepseekV3:
    model = DeepseekV3(cfg)
    with torch.no_grad():
        skew(model)
    return model


@contextmanager
def skewed_reference():
    """reference_steps builds its own DeepseekV3: give it the same skew."""
    with mock.patch.object(engine_workers, "DeepseekV3", skewed_model):
        yield


def ds_config(world: int, microbatches: int, clip: float) -> dict:
    return {
        "train_batch_size": MICRO * microbatches * world, "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": microbatches,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": EPS, "weight_decay": WD,
                                                   "torch_adam": True}},
        "zero_optimization": {"stage": 1}, "gradient_clipping": clip, "steps_per_print": 2**31 - 1,
    }


def gather_full(local: dict[str, torch.Tensor], ranks: list[int]) -> dict[str, torch.Tensor]:
    """{name: tensor} of the whole model from every rank's (collective over the world): expert shards of the
    `ranks` of each pipeline rank concatenated (ep ranks 0..ep-1 of one EP group per pipeline rank)."""
    from parallel.expert_shard import gather_expert_state

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, {n: t.detach().clone() for n, t in local.items()})
    full: dict = {}
    for group in ranks:
        full.update(gather_expert_state([everyone[r] for r in group]))
    return full


def run_ep_engine(rank: int, world: int, ep: int, microbatches: int, steps: int, clip: float, ckpt: str) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from parallel.expert_groups import is_expert_param
    from parallel.topology import PipelineTopology
    from tests.parallel.engine_workers import build_schedule
    from trainer.checkpoint import Checkpointer
    from trainer.load_balance import moe_routers, update_router_biases
    from trainer.optim import param_groups
    from trainer.training_state import TrainingState

    cfg = tiny_config()
    topo = PipelineTopology(pp=1, dp=world, rank=rank, ep=ep)
    topo.build_groups()

    def schedule(seed: int):
        with mock.patch.object(torch, "manual_seed", lambda _: torch.random.manual_seed(seed)):
            sched = build_schedule("none", cfg, topo, microbatches, ds_config(world, microbatches, clip),
                                   lambda m: param_groups(m, WD), lr_lambda=lambda step: 1.0)
        with torch.no_grad():
            skew(sched.module)
        return sched

    sched = schedule(0)
    grads = capture_grads(sched.engine, sched.module.named_parameters())
    n_marked = sum(is_expert_param(p) for p in sched.module.parameters())
    # the count exchanges on the EP ranks' second communicator, the rows on the first
    layouts = [(m.dispatcher.group, m.dispatcher.layout_group) for m in sched.module.modules()
               if hasattr(getattr(m, "dispatcher", None), "layout_group")]
    layout_groups = (len(layouts), all(g is topo.groups["ep"] and lg is topo.groups["ep_layout"] and lg is not g
                                       for g, lg in layouts),
                     dist.get_process_group_ranks(topo.groups["ep_layout"]) == topo.group_ranks["ep"])
    all_batches = make_batches(cfg, steps * microbatches * world)
    per_step = [all_batches[s * microbatches * world:(s + 1) * microbatches * world] for s in range(steps)]
    routers = moe_routers(sched.module)
    losses, norms, biases = [], [], []
    for s in range(steps):
        mine = [{**b, "loss_mask": torch.ones_like(b["tokens"], dtype=torch.float32)}
                for b in per_step[s][rank * microbatches:(rank + 1) * microbatches]]
        out = sched.train_batch(iter(mine))
        norms.append(float(sched.engine.get_global_grad_norm()))
        counts = update_router_biases(routers)  # summed over the whole DP group (EP ranks included)
        vec = out.loss.double().clone()
        dist.all_reduce(vec)
        losses.append(float(vec) / world)
        biases.append({i: r.e_score_correction_bias.clone() for i, r in routers.items()})

    # every rank's weights and first-step gradients, gathered to the full model (ep ranks 0..ep-1 of the first
    # EP group)
    state = {n: t.detach().clone() for n, t in sched.module.state_dict().items()}
    full = gather_full(state, [list(range(ep))])
    with skewed_reference():
        ref = reference_steps(cfg, per_step, clip)
    report = compare(ref, gather_full(grads, [list(range(ep))]), norms[0], full, losses, steps)
    empty = {i: [e for e, c in enumerate(row.tolist()) if c == 0] for i, row in counts.items()}

    # the checkpoint as the trainer writes it (the layout-free state: trainer/elastic_state.py), through the
    # Checkpointer
    checkpointer = Checkpointer(ckpt, rank, rank, keep_last=2)
    saved = checkpointer.save(TrainingState(sched, rank), steps, {"tokens": 0},
                              {"model_config.json": json.dumps(cfg.to_dict())})
    probe = make_batches(cfg, world, seed=3)[rank]["tokens"]
    sched.module.eval()
    with torch.no_grad():
        logits = sched.module(probe, return_logits=True).logits

    # resume: a fresh engine (other weights) loads the checkpoint; every parameter, experts included, restored
    sched2 = schedule(1)
    Checkpointer(ckpt, rank, rank, keep_last=2).load(TrainingState(sched2, rank), saved)
    resume_diff = _max_diff(sched2.module.state_dict(), state)

    # a format-1 checkpoint (what the trainer wrote before: DeepSpeed's files plus our expert shards) resumes on
    # the layout that wrote it: weights (each rank's own experts) and the ZeRO-1 fp32 masters
    legacy = write_legacy_checkpoint(sched, topo, Path(ckpt).parent / "legacy", steps, cfg)
    sched3 = schedule(2)
    Checkpointer(legacy.parent, rank, rank, keep_last=2).load(TrainingState(sched3, rank), legacy)
    legacy_diff = _max_diff(sched3.module.state_dict(), state)
    masters = zip(sched.engine.optimizer.single_partition_of_fp32_groups,
                  sched3.engine.optimizer.single_partition_of_fp32_groups, strict=True)
    legacy_masters_equal = all(torch.equal(a, b) for a, b in masters)
    return {
        **report, "n": len(full), "n_ref": len(ref.state),
        "n_marked": n_marked, "layout_groups": layout_groups,
        "bias_diff": max(float((b - ref.state[f"{name}.e_score_correction_bias"]).abs().max())
                         for name, b in _bias_names(sched.module, biases[-1]).items()),
        "biases": {i: b.tolist() for i, b in biases[-1].items()}, "empty_last_step": empty,
        "logits": logits.tolist(), "probe": probe.tolist(), "resume_diff": resume_diff,  # no tensors: queue
        "legacy_diff": legacy_diff, "legacy_masters_equal": legacy_masters_equal, "legacy": str(legacy),
    }


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[n] - t).abs().max()) for n, t in want.items() if t.is_floating_point())


def write_legacy_checkpoint(sched, topo, ckpt_dir: Path, step: int, cfg) -> Path:
    """A format-1 checkpoint as trainer/checkpoint.py wrote it before the layout-free state (pp=1): DeepSpeed's
    `save_checkpoint` (mp_rank_00 with ep rank 0's experts, one ZeRO-1 file per rank) and each ep rank's experts
    in `experts/ep_rank_<k>.pt`, written by the first EP group; meta.json last (collective)."""
    from parallel.expert_shard import ep_layout, is_expert_key
    from trainer.checkpoint import tag_for
    from trainer.expert_files import expert_file

    path = ckpt_dir / tag_for(step)
    sched.engine.save_checkpoint(str(ckpt_dir), tag=path.name, client_state={}, save_latest=False)
    ep_rank, ep_size = ep_layout(sched.module)
    if topo.dp_rank < ep_size:
        experts = {n: t.detach().clone() for n, t in sched.module.state_dict().items() if is_expert_key(n)}
        expert_file(path, ep_rank).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ep_size": ep_size, "ep_rank": ep_rank, "module": experts}, expert_file(path, ep_rank))
    dist.barrier()
    if dist.get_rank() == 0:
        (path / "model_config.json").write_text(json.dumps(cfg.to_dict()))
        (path / "meta.json").write_text(json.dumps({"step": step, "format": 1}))
    dist.barrier()
    return path


def _bias_names(model: torch.nn.Module, biases: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{router module name: bias} for the layer-indexed biases."""
    names = {}
    for name, module in model.named_modules():
        if hasattr(module, "e_score_correction_bias"):
            for i, b in biases.items():
                if module is moe_router_of(model, i):
                    names[name] = b
    return names


def moe_router_of(model: torch.nn.Module, layer: int):
    from trainer.load_balance import moe_routers

    return moe_routers(model)[layer]


def run_pipeline_ep(rank: int, world: int, schedule: str, pp: int, ep: int, microbatches: int, steps: int,
                    clip: float, layers: int, overlap: bool) -> dict:
    """A pipeline schedule with expert parallelism inside each stage's data group (pp x dp ranks, EP groups of
    `ep` data ranks), trained through its DeepSpeed engine, against single-process AdamW with the same skew."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from parallel.topology import PipelineTopology
    from tests.parallel.engine_workers import build_schedule
    from tests.parallel.engine_workers import ds_config as pipe_ds_config
    from trainer.load_balance import moe_routers, update_router_biases
    from trainer.optim import param_groups

    cfg = tiny_config(num_hidden_layers=layers)
    dp = world // pp
    topo = PipelineTopology(pp=pp, dp=dp, rank=rank, dualpipe=schedule == "dualpipe", ep=ep)
    topo.build_groups()
    sched = build_schedule(schedule, cfg, topo, microbatches, pipe_ds_config(clip), lambda m: param_groups(m, WD),
                           overlap_ep=overlap)
    with torch.no_grad():
        skew(sched.rank_model)
    grads = capture_grads(sched.engine, sched.rank_model.named_parameters())
    all_batches = make_batches(cfg, steps * microbatches * dp)
    per_step = [all_batches[s * microbatches * dp:(s + 1) * microbatches * dp] for s in range(steps)]
    routers = moe_routers(sched.rank_model)
    losses, counts, norms = [], {}, []
    for s in range(steps):
        mine = per_step[s][topo.dp_rank * microbatches:(topo.dp_rank + 1) * microbatches]
        if s == steps - 1:
            sched.record_next_step()
        out = sched.train_batch(iter(mine))
        norms.append(float(sched.engine.get_global_grad_norm()))
        counts = update_router_biases(routers, group=sched.counts_group)
        vec = out.loss.double().clone()
        dist.all_reduce(vec, group=topo.groups["data"])
        losses.append(float(vec) / dp)
    events = sched.take_timeline()

    # the full model: every rank's state and gradients, expert shards gathered per pipeline rank, stages united
    ranks = [[topo.global_rank(p, d) for d in range(ep)] for p in range(pp)]
    full = gather_full(sched.rank_model.state_dict(), ranks)
    with skewed_reference():
        ref = reference_steps(cfg, per_step, clip)
    report = compare(ref, gather_full(grads, ranks), norms[0], full, losses, steps)
    empty = {i: [e for e, c in enumerate(row.tolist()) if c == 0] for i, row in counts.items()}
    return {
        **report, "n": len(full), "n_ref": len(ref.state),
        "bias_diff": max(float((full[n] - ref.state[n]).abs().max()) for n in full if n.endswith("correction_bias")),
        "empty_last_step": empty,
        "a2a_events": sum(1 for e in events if e.kind == "all_to_all"),
        "a2a_seconds": sum(e.end - e.start for e in events if e.kind == "all_to_all"),
    }


def run_pipeline_ep_grads(rank: int, world: int, schedule: str, pp: int, ep: int, microbatches: int,
                          checkpointing: bool, documents: bool = False) -> dict:
    """One step of the pipeline runtime (no optimizer) with experts sharded over `ep` data ranks, once with the
    EP blocks as overlapped sub-steps and once sequential: per-microbatch losses and the full model's gradients
    (expert shards gathered, DualPipe mirror copies and data ranks summed), against the single-process model."""
    from model.gemm import defer_weight_grads
    from parallel.expert_shard import gather_expert_state, is_expert_key, shard_experts
    from parallel.instructions import Placement
    from parallel.p2p import P2P
    from parallel.runtime import PipelineRuntime
    from parallel.schedules import build_instructions
    from parallel.stages import Stage, stage_pieces
    from parallel.topology import PipelineTopology
    from parallel.weight_grad import WeightGradStore
    from tests.parallel.pipeline_workers import SEQ, reference

    cfg = tiny_config(num_hidden_layers=2 * pp, activation_checkpointing=checkpointing)
    dp = world // pp
    topo = PipelineTopology(pp=pp, dp=dp, rank=rank, dualpipe=schedule == "dualpipe", ep=ep)
    topo.build_groups()
    placement = Placement(schedule, pp)
    batches = make_batches(cfg, microbatches * dp, documents=documents)
    mine = batches[topo.dp_rank * microbatches:(topo.dp_rank + 1) * microbatches]
    out: dict = {}
    for overlap in (True, False):
        torch.manual_seed(0)
        model = skewed_model(cfg).train()
        shard_experts(model, topo.ep_rank, ep, topo.groups["ep"])
        store = WeightGradStore()
        defer_weight_grads(model, store)
        stages = {c: Stage(stage_pieces(model, placement.stage(topo.pipe_rank, c), placement.num_stages),
                           placement.stage(topo.pipe_rank, c), placement.num_stages, overlap_ep=overlap)
                  for c in range(placement.chunks_per_rank)}
        runtime = PipelineRuntime(placement, topo.pipe_rank, stages, P2P(topo.pipe_ranks(), topo.groups["pipe"]),
                                  store, (MICRO, SEQ, cfg.hidden_size), torch.float32, torch.device("cpu"), SEQ)
        instrs = build_instructions(schedule, pp, microbatches, defer_w=True)[topo.pipe_rank]
        result = runtime.run(instrs, mine, loss_scale=1.0 / microbatches)
        held = {id(p) for s in stages.values() for p in s.parameters()}
        grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                 for n, p in model.named_parameters() if id(p) in held}
        if schedule == "dualpipe":
            for name in sorted(grads):
                dist.all_reduce(grads[name], group=topo.groups["mirror"])
        for name in sorted(grads):  # the mean over data ranks (expert grads: summed over expert-DP, / dp)
            if is_expert_key(name):
                if "expert_data" in topo.groups:
                    dist.all_reduce(grads[name], group=topo.groups["expert_data"])
            else:
                dist.all_reduce(grads[name], group=topo.groups["data"])
            grads[name] /= dp
        everyone: list = [None] * world
        dist.all_gather_object(everyone, grads)
        full: dict = {}
        for p in range(pp):
            full.update(gather_expert_state([everyone[topo.global_rank(p, d)] for d in range(ep)]))
        out[overlap] = {"losses": {(topo.dp_rank, mb): v for mb, v in result.loss.items()}, "grads": full,
                        "substep_blocks": sum(len(s._substep_blocks) for s in stages.values())}
    with skewed_reference():
        import tests.parallel.pipeline_workers as pw

        with mock.patch.object(pw, "DeepseekV3", skewed_model):
            ref_losses, ref_grads, _ = reference(cfg, batches)

    def rel(a: dict, b: dict) -> float:
        return max(float((a[n] - b[n]).abs().max()) / (float(b[n].abs().max()) + 1e-12) for n in a)

    # the reference averages over all microbatches * dp samples, as the pipeline's sum over data ranks / dp

    return {
        "loss_pairs": [(out[True]["losses"][k], out[False]["losses"][k], ref_losses[k[0] * microbatches + k[1]])
                       for k in out[True]["losses"]],
        "overlap_vs_sequential": rel(out[True]["grads"], out[False]["grads"]),
        "overlap_vs_reference": rel(out[True]["grads"], ref_grads),
        "n_grads": len(out[True]["grads"]), "n_ref": len(ref_grads),
        "substep_blocks": out[True]["substep_blocks"], "sequential_substep_blocks": out[False]["substep_blocks"],
    }
