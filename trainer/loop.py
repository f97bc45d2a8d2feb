"""The training loop: global steps, the router bias update, metrics, evaluation, checkpoints.

    for each step:
        losses = schedule.train_batch(stream)       # all microbatches, backward, optimizer step
        counts = update_router_biases(routers, dp)   # global expert counts -> bias update
        metrics (reduced over dp) -> logger; checkpoint every N, then eval every N (a failing evaluation
        never costs training); stop on: train.steps, train.max_seconds, a preemption signal (checkpoint before
        the step is logged, no eval), a non-finite step (train.on_nonfinite, trainer/cluster/nonfinite.py); the
        stop flags are summed over all ranks with the losses, and so is "my asynchronous checkpoint write is still
        running": once no rank is writing, the save is published (the same step on every rank); the loop returns
        with none pending
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from model.info import training_flops_per_token
from parallel.modelled_comm import StepTraffic
from parallel.step_schedule import StepLosses, StepSchedule
from trainer.cluster.nonfinite import NonFiniteLoss
from trainer.load_balance import gather_layer_counts, moe_routers, update_router_biases
from trainer.report import metrics as M


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    train_seconds: float = 0.0  # this process's training time (excludes start-up, eval, checkpoints)
    last_train: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    expert_load: dict[int, torch.Tensor] = field(default_factory=dict)  # cumulative global counts per layer
    preempted: bool = False  # stopped on a preemption signal (a checkpoint of `step` was saved)
    skipped_steps: int = 0  # non-finite steps skipped (train.on_nonfinite=skip)


@dataclass
class LoopHooks:
    """What the loop needs from the job, as callables, so the loop stays readable and testable."""

    stream: Any  # iterator of microbatches for this DP rank
    log: Callable[[int, dict[str, Any], str], None]
    progress: Callable[[int, dict[str, Any]], None]
    evaluate: Callable[[], dict[str, float]]
    save: Callable[[LoopState], None]
    timeline: Callable[[list], None] | None = None  # receives this rank's recorded pipeline timeline events
    preempt_requested: Callable[[], bool] = lambda: False  # a preemption signal reached this rank
    step_done: Callable[[int], None] | None = None  # progress beat for the watchdog (steps done)
    nonfinite: Any = None  # trainer.cluster.nonfinite.NonFiniteGuard: decides on non-finite steps
    save_writing: Callable[[], bool] = lambda: False  # this rank's asynchronous checkpoint write still runs
    finish_save: Callable[[], None] = lambda: None  # collective: publish a pending asynchronous save (waits for it)


def _dp_mean(losses: StepLosses, stop: list[bool], dp_size: int, group: Any = None
             ) -> tuple[dict[str, float], list[bool]]:
    """This step's losses averaged over data-parallel ranks, and for each stop flag whether any rank raised it.

    Reduced over every rank: the pipeline ranks of one replica report identical losses, so the world
    average (`dp_size` = world size) is the data-parallel average."""
    parts = [losses.loss, losses.lm_loss, losses.balance_loss, *losses.mtp_losses]
    flags = torch.tensor([float(f) for f in stop], dtype=torch.float64, device=losses.loss.device)
    vec = torch.cat([torch.stack([p.double() for p in parts]), flags])  # on the model's device: nccl needs GPU
    n = len(stop)
    if dp_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(vec, group=group)
        vec[:-n] /= dp_size
    vec = vec.cpu()
    out = {"loss": float(vec[0]), "lm_loss": float(vec[1]), "balance_loss": float(vec[2])}
    mtp = vec[3:-n].tolist()
    if len(mtp) == 1:
        out["mtp_loss"] = mtp[0]
    for k, v in enumerate(mtp, start=1):
        if len(mtp) > 1:
            out[f"mtp_loss_{k}"] = v
    return out, [bool(v > 0) for v in vec[-n:]]


def run_loop(schedule: StepSchedule, cfg: Any, layout: Any, state: LoopState, hooks: LoopHooks) -> LoopState:
    t = cfg.train
    engine = schedule.engine
    routers = moe_routers(schedule.module)
    tokens_per_step = layout.global_batch_size * t.seq_len
    flops_per_token = training_flops_per_token(cfg.model, t.seq_len)
    device_name = torch.cuda.get_device_name() if layout.device == "cuda" else None
    peak = M.peak_flops(device_name, layout.dtype, None if cfg.logging.peak_tflops is None
                        else cfg.logging.peak_tflops * 1e12)
    throughput = M.Throughput(window=20)
    network = StepTraffic()  # parallel.network: bytes per link type and modelled seconds per step
    eval_every, ckpt_every = t.eval_interval, cfg.checkpoint.interval

    timeline_step = cfg.parallel.timeline_step
    if hooks.step_done is not None:
        hooks.step_done(state.step)
    while state.step < t.steps:
        lr = float(engine.get_lr()[0])
        if state.step + 1 == timeline_step:
            schedule.record_next_step()
        network.begin_step()
        start = time.perf_counter()
        losses = schedule.train_batch(hooks.stream)
        if state.step + 1 == timeline_step and hooks.timeline is not None:
            hooks.timeline(schedule.take_timeline())
        skipped = hooks.nonfinite is not None and hooks.nonfinite.optimizer_skipped()
        if skipped:  # DeepSpeed dropped the update (non-finite gradients): the router biases stay too
            for router in routers.values():
                router.step_counts.zero_()
            counts = {}
        else:
            counts = gather_layer_counts(update_router_biases(routers, group=schedule.counts_group),
                                         schedule.pipe_group)
        step_seconds = time.perf_counter() - start
        network.end_step()
        state.step += 1
        state.tokens_seen += tokens_per_step
        state.train_seconds += step_seconds
        over_time = t.max_seconds is not None and state.train_seconds >= t.max_seconds
        row, (stop, preempt, writing) = _dp_mean(
            losses, [over_time, hooks.preempt_requested(), hooks.save_writing()], layout.world_size)
        if not writing or skipped or not math.isfinite(row["loss"]):
            hooks.finish_save()  # no rank is writing (or a non-finite stop would name the checkpoint: wait for it)
        # every rank sees the same reduced loss and DeepSpeed's (reduced) skip decision, so all decide alike
        bad = hooks.nonfinite.check(state.step, row["loss"], skipped) if hooks.nonfinite is not None else None
        state.skipped_steps += int(bad is not None and bad.skipped)
        state.preempted = preempt
        stop = stop or preempt
        throughput.update(tokens_per_step, step_seconds)
        tok_s = throughput.tokens_per_s
        per_device = tok_s * flops_per_token / layout.world_size
        # key names as documented in docs/metrics.md
        row.update(lr=lr, grad_norm=_grad_norm(engine), tokens_per_s=tok_s, tflops=per_device / 1e12,
                   step_time_s=throughput.seconds_per_update, tokens=state.tokens_seen,
                   peak_mem_gib=M.peak_memory_bytes() / 2**30, skipped_steps=state.skipped_steps)
        utilisation = M.mfu(tok_s, flops_per_token, peak, num_devices=layout.world_size)
        if utilisation is not None:
            row["mfu"] = utilisation
        row.update(network.step_metrics(getattr(schedule, "last_reduce", {})))
        if counts:
            row.update(M.expert_load_stats(counts))
            for layer, c in counts.items():
                state.expert_load[layer] = state.expert_load.get(layer, torch.zeros_like(c)) + c
        state.last_train = row
        # a preemption checkpoints first: nothing (a logger whose service died with the job, a slow progress bar)
        # stands between the signal and the checkpoint; a non-finite stop never checkpoints its step
        saved = preempt and (bad is None or bad.skipped)
        if saved:
            hooks.save(state)
        hooks.log(state.step, row, "train")
        hooks.progress(state.step, {"loss": row["lm_loss"], "tok/s": tok_s})
        if bad is not None and not bad.skipped:
            raise NonFiniteLoss(bad.message)  # before any checkpoint of this step: `latest` stays the last good one

        last = state.step == t.steps or stop
        # the checkpoint first: an evaluation that fails (bad validation data, a lost peer) costs no training
        if not saved and ((ckpt_every and state.step % ckpt_every == 0) or (last and cfg.checkpoint.save_final)):
            hooks.save(state)
        # a preempted run has seconds left: it checkpoints and goes, evaluation waits for the resumed run
        if t.eval_batches > 0 and not preempt and ((eval_every and state.step % eval_every == 0) or last):
            state.last_eval = hooks.evaluate()
            state.last_eval_step = state.step
            hooks.log(state.step, state.last_eval, "eval")
        if hooks.step_done is not None:
            hooks.step_done(state.step)
        if stop:
            break
    hooks.finish_save()  # the end, a stop or a preemption: the last checkpoint is complete when the loop returns
    return state


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)
