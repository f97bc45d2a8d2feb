"""The training loop: global steps, the router bias update, metrics, evaluation, checkpoints.

    for each step:
        losses = schedule.train_batch(stream)       # all microbatches, backward, optimizer step
        counts = update_router_biases(routers, dp)   # global expert counts -> bias update
        metrics (reduced over dp) -> logger; eval every N; checkpoint every N
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel.step_schedule import StepLosses, StepSchedule
from trainer import metrics as M
from trainer.load_balance import gather_layer_counts, moe_routers, update_router_biases


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    train_seconds: float = 0.0  # this process's training time (excludes start-up, eval, checkpoints)
    last_train: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # cumulative global counts per layer


@dataclass
class LoopHooks:
    """What the loop needs from the job, as callables, so the loop stays readable and testable."""

    stream: Any  # iterator of microbatches for this DP rank
    log: Callable[[int, dict[str, Any], str], None]
    progress: Callable[[int, dict[str, Any]], None]
    evaluate: Callable[[], dict[str, float]]
    save: Callable[[LoopState], None]
    timeline: Callable[[list], None] | None = None  # receives this rank's recorded pipeline timeline events


def _dp_mean(losses: StepLosses, stop: bool, dp_size: int, group: Any = None) -> tuple[dict[str, float], bool]:
    """This step's losses averaged over data-parallel ranks, and whether any rank asked to stop.

    Reduced over every rank: the pipeline ranks of one replica report identical losses, so the world
    average (`dp_size` = world size) is the data-parallel average."""
    parts = [losses.loss, losses.lm_loss, losses.balance_loss, *losses.mtp_losses]
    flag = torch.tensor(float(stop), dtype=torch.float64, device=losses.loss.device)
    vec = torch.stack([p.double() for p in parts] + [flag])  # on the model's device: nccl needs GPU tensors
    if dp_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(vec, group=group)
        vec[:-1] /= dp_size
    vec = vec.cpu()
    out = {"loss": float(vec[0]), "lm_loss": float(vec[1]), "balance_loss": float(vec[2])}
    mtp = vec[3:-1].tolist()
    if len(mtp) == 1:
        out["mtp_loss"] = mtp[0]
    for k, v in enumerate(mtp, start=1):
        if len(mtp) > 1:
            out[f"mtp_loss_{k}"] = v
    return out, bool(vec[-1] > 0)


def run_loop(schedule: StepSchedule, cfg: Any, layout: Any, state: LoopState, hooks: LoopHooks) -> LoopState:
    t = cfg.train
    engine = schedule.engine
    routers = moe_routers(schedule.module)
    tokens_per_step = layout.global_batch_size * t.seq_len
    flops_per_token = M.training_flops_per_token(cfg.model, t.seq_len)
    device_name = torch.cuda.get_device_name() if layout.device == "cuda" else None
    peak = M.peak_flops(device_name, layout.dtype, None if cfg.logging.peak_tflops is None
                        else cfg.logging.peak_tflops * 1e12)
    throughput = M.Throughput(window=20)
    eval_every, ckpt_every = t.eval_interval, cfg.checkpoint.interval

    timeline_step = getattr(cfg.parallel, "timeline_step", 0) if hasattr(schedule, "record_next_step") else 0
    while state.step < t.steps:
        lr = float(engine.get_lr()[0])
        if state.step + 1 == timeline_step:
            schedule.record_next_step()
        start = time.perf_counter()
        losses = schedule.train_batch(hooks.stream)
        if state.step + 1 == timeline_step and hooks.timeline is not None:
            hooks.timeline(schedule.take_timeline())
        counts = gather_layer_counts(update_router_biases(routers, group=getattr(schedule, "counts_group", None)),
                                     getattr(schedule, "pipe_group", None))
        step_seconds = time.perf_counter() - start
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.train_seconds += step_seconds
        over_time = t.max_seconds is not None and state.train_seconds >= t.max_seconds
        row, stop = _dp_mean(losses, over_time, layout.world_size)
        throughput.update(tokens_per_step, step_seconds)
        tok_s = throughput.tokens_per_s
        per_device = tok_s * flops_per_token / layout.world_size
        # key names as documented in docs/metrics.md
        row.update(lr=lr, grad_norm=_grad_norm(engine), tokens_per_s=tok_s, tflops=per_device / 1e12,
                   step_time_s=throughput.seconds_per_update, tokens=state.tokens_seen,
                   peak_mem_gib=M.peak_memory_bytes() / 2**30)
        utilisation = M.mfu(tok_s, flops_per_token, peak, num_devices=layout.world_size)
        if utilisation is not None:
            row["mfu"] = utilisation
        if counts:
            row.update(M.expert_load_stats(counts))
            for layer, c in counts.items():
                state.expert_load[layer] = state.expert_load.get(layer, torch.zeros_like(c)) + c
        state.last_train = row
        hooks.log(state.step, row, "train")
        hooks.progress(state.step, {"loss": row["lm_loss"], "tok/s": tok_s})

        last = state.step == t.steps or stop
        if t.eval_batches > 0 and ((eval_every and state.step % eval_every == 0) or last):
            state.last_eval = hooks.evaluate()
            state.last_eval_step = state.step
            hooks.log(state.step, state.last_eval, "eval")
        if (ckpt_every and state.step % ckpt_every == 0) or (last and cfg.checkpoint.save_final):
            hooks.save(state)
        if stop:
            break
    return state


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)
