"""Hand DeepSpeed's optimizer the gradients our pipeline produced outside `engine.backward`.

Two cases, for the two optimizers DeepSpeed builds for ZeRO-1 here: `DeepSpeedZeroOptimizer` (fp32), and
`BF16_Optimizer` (bf16 parameters, fp32 gradient accumulation; DeepSpeed picks it for ZeRO-1 in that mix).

- `hand_local_gradients`: each rank's own gradients, which DeepSpeed then reduces (`engine.allreduce_gradients`):
  what the engine's backward epilogue would have done (ZeRO's `grad_accum`, BF16's fp32 copies).
- `hand_reduced_gradients`: gradients the pipeline's tail reduction (parallel/grad_reduce.py) has already
  averaged over the data-parallel ranks exactly as DeepSpeed would (divided by the data-parallel size, summed
  over the data group; expert gradients over their expert-DP group). DeepSpeed's collective step is skipped:
  ZeRO's epilogue builds this rank's partitions from them (its reduction replaced by a local copy into the compact
  fp32 partition where it keeps one); BF16_Optimizer's fp32 gradients are set to them. Norm, clipping, overflow
  and the step stay DeepSpeed's.

Written against deepspeed==0.19.8 (pinned); tests/parallel/test_zero_handoff.py compares both with DeepSpeed's
own backward and reduction, so an upgrade that moves these internals fails there, not in a run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _kind(engine: Any) -> str | None:
    """Which of the two optimizers this is, in a setup the hand-off reproduces exactly; None otherwise (DeepSpeed
    then reduces itself). Left out: ZeRO's `overlap_comm` (its hooks reduce inside the backward) and CPU offload
    (its partition copy lives in the reduction we skip), gradients not averaged or split over sequence-parallel
    ranks (another divisor than the data-parallel size), BF16's `immediate_grad_update` (its hooks move the
    gradients autograd makes, but not the deferred weight-gradients)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, BF16_Optimizer):
        return None if getattr(opt, "immediate_grad_update", False) or not engine.gradient_average else "bf16"
    if isinstance(opt, DeepSpeedZeroOptimizer) and not engine.zero_optimization_partition_gradients():
        plain = (not opt.overlap_comm and not opt.cpu_offload and opt.gradient_average
                 and getattr(opt, "sequence_parallel_size", 1) == 1)
        return "zero1" if plain else None
    return None


def takes_reduced_gradients(engine: Any) -> bool:
    """Whether `hand_reduced_gradients` knows this engine's optimizer."""
    return _kind(engine) is not None


def gradient_dtype(engine: Any) -> torch.dtype | None:
    """The dtype the optimizer accumulates and reduces gradients in when it is not the parameters' (bf16 with fp32
    accumulation), else None."""
    kind, opt = _kind(engine), engine.optimizer
    if kind == "bf16":
        return torch.float32
    if kind == "zero1" and getattr(opt, "use_grad_accum_attribute", False):
        return opt.gradient_accumulation_dtype
    return None


def _gradient(p: torch.Tensor) -> torch.Tensor | None:
    accum = getattr(p, "grad_accum", None)
    return accum if accum is not None else p.grad


@torch.no_grad()
def hand_local_gradients(engine: Any) -> None:
    """This rank's own gradients (in `param.grad`), for DeepSpeed's reduction that follows."""
    kind, opt = _kind(engine), engine.optimizer
    if kind == "bf16":
        opt.update_hp_grads()  # engine.backward's epilogue: bf16 gradients into the fp32 accumulators
    elif getattr(opt, "use_grad_accum_attribute", False):
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad_accum = p.grad.to(opt.gradient_accumulation_dtype)


@torch.no_grad()
def hand_reduced_gradients(engine: Any) -> None:
    """In place of `hand_local_gradients` + `engine.allreduce_gradients()` at the step's boundary, for gradients
    already averaged over the data-parallel ranks (in `param.grad_accum` when `gradient_dtype` is set, else in
    `param.grad`)."""
    kind, opt = _kind(engine), engine.optimizer
    if kind == "bf16":
        for i, group in enumerate(opt.bf16_groups):
            for j, lp in enumerate(group):
                grad = _gradient(lp)
                if grad is None:
                    continue
                hp = opt.fp32_groups_gradients[i][j]
                hp.copy_(grad.view(hp.shape))
                lp._hp_grad = hp
                opt.fp32_groups_has_gradients[i][j] = True
        return
    if kind != "zero1":
        raise TypeError(f"{type(opt).__name__} does not take reduced gradients (see takes_reduced_gradients)")
    opt.set_gradient_accumulation_boundary(True)
    if getattr(opt, "use_grad_accum_attribute", False):  # gradients left in `param.grad` (nothing to reduce)
        for p in engine.module.parameters():
            if getattr(p, "grad_accum", None) is None and p.grad is not None:
                p.grad_accum = p.grad.to(opt.gradient_accumulation_dtype)

    def copy_into_compact_partitions(comm_dtype: torch.dtype | None = None) -> None:
        for group_idx, params in enumerate(opt.params_in_partition):
            if not opt._use_compact_grad_partition_buffer(group_idx):
                continue  # the epilogue reads these gradients from the parameters itself
            partition_id = dist.get_rank(group=opt.real_dp_process_group[group_idx])
            for p in params:
                param_id = opt.get_param_id(p)
                start = int(opt.grad_start_offset[group_idx][partition_id][param_id])
                dest = int(opt.grad_partition_insertion_offset[group_idx][partition_id][param_id])
                n = int(min(p.numel() - start, opt.partition_size[group_idx] - dest))
                grad = opt.get_param_gradient_attribute(p)
                if n > 0 and grad is not None:
                    out = opt._get_compact_grad_partition_slice(group_idx, partition_id, param_id, n)
                    out.copy_(grad.reshape(-1).narrow(0, start, n).to(out.dtype))

    opt.reduce_ipg_grads = copy_into_compact_partitions  # the instance's collective step, for this call only
    try:
        opt.independent_gradient_partition_epilogue()
    finally:
        del opt.reduce_ipg_grads
