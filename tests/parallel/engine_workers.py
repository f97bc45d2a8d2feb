"""Worker bodies for the DeepSpeed-engine pipeline tests (DualPipe / DualPipeV as a DeepSpeed engine), and the
comparison every engine-vs-single-process test uses (`Reference`, `capture_grads`, `compare`, `assert_matches`).

What is compared is what is well-conditioned (docs: DESIGN.md section 5), never AdamW's sign-like first steps:
  1. the first step's gradients, as ZeRO-1 holds them for the optimizer (reduced over data ranks, mirror copies
     summed, before clipping), against the single-process model's, and the global grad norm the engine clips by;
  2. the parameters after the steps, with an AdamW whose eps makes the update Lipschitz in the gradient (EPS);
  3. the losses, to the first-order effect of those parameter tolerances.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from model.transformer import DeepseekV3
from tests.conftest import tiny_config
from tests.parallel.pipeline_workers import MICRO, SEQ, forward, make_batches

LR, WD = 1e-2, 0.1
U = 2.0**-24  # fp32 unit roundoff (eps_fp32 / 2)
# AdamW's step is lr * m / (sqrt(v) + eps). With eps = 1e-8 the first steps are ~lr * sign(g), so an entry whose
# gradient is reassociation noise (nearly cancelling terms) may move by 2 lr either way on another CPU. With
# EPS = 1e-2 (above the noise of every entry, <= GRAD_RTOL * 0.1) the update is Lipschitz in g: |d step/d g| <=
# 2 lr / EPS = 2 (m and sqrt(v) each move by at most |dg|), still ~lr for entries with |g| >> EPS.
EPS = 1e-2
# An entry of a gradient sums its terms (microbatches x data ranks x stage copies; a GEMM's tokens) in another
# order than one process: the error is <= n u sum|terms| with n <= 32 and sum|terms| a few times the tensor's
# largest entry (per-microbatch gradients are the size of their mean): 32 * 6e-8 * 5 ~ 1e-5 of max|g|.
GRAD_RTOL = 1e-5
# The global grad norm: DeepSpeed sums the squares in fp64, as the reference does, so only the gradients' errors
# count: d|g| <= sum_i |g_i| |dg_i| / |g|, the same reassociation bound weighted by |g_i| (condition 1: no
# cancellation among squares), plus one fp32 rounding.
NORM_RTOL = GRAD_RTOL
# A step's loss on identical weights: the per-microbatch forward is the same arithmetic (bitwise, see
# test_pipeline_runtime.py) and only the mean over n <= 16 microbatch losses is reassociated (n u ~ 1e-6); under
# EP an expert GEMM may see its rows in another batch, which at most reassociates each K <= 128-term dot product
# (<= K u of its sum|terms|, independent errors that average out over the loss's tokens).
FWD_RTOL = 1e-6
# Context parallelism: a rank's GEMMs see S / cp rows instead of S. Each output element is the same K-term dot
# product, but the kernel may block K differently for another row count, so activations differ by <= K u |terms|
# per layer (K <= 128: ~1e-5 of their scale over the <= 5 blocks of these models, MTP's included); the losses
# carry that, and gradients add the reassociation of their sums over positions split in cp parts (<= n u,
# n <= 64): 1e-4 of each tensor's largest entry. A wrong position offset, exchange or loss scale moves them by
# O(1) of that scale.
CP_FWD_RTOL = 1e-5
CP_GRAD_RTOL = 1e-4


@dataclass
class Reference:
    """Single-process AdamW training (same groups, lr, eps, clipping) and what the comparisons need of it."""

    losses: list[float]  # per step: the mean loss over the step's microbatches
    state: dict[str, torch.Tensor]  # after the last step: parameters and buffers
    grads: dict[str, torch.Tensor]  # the first step's gradients, before clipping
    norm: float  # the first step's global grad norm
    gmax: dict[str, float]  # per parameter: the largest |g| the optimizer saw in any step (after clipping)
    l1: list[dict[str, float]]  # per step, per parameter: sum |dL/dp| at that step's weights
    grad_rtol: float = GRAD_RTOL  # the schedule's gradient error bound (context parallelism: looser, its forward
    fwd_rtol: float = FWD_RTOL  # differs too) and its forward's (tests/parallel/test_context_parallel.py)

    def param_tolerance(self, name: str) -> float:
        """What one step may move a parameter entry apart: the clipped gradient's error (GRAD_RTOL of the
        tensor's largest entry, plus NORM_RTOL of it through the clip coefficient) times the step's Lipschitz
        constant 2 lr / EPS, plus the rounding of p (1 - lr wd) - step on each side (2 u |p|, and a few u of a
        step <= lr)."""
        pmax = float(self.state[name].abs().max())
        return 2 * LR / EPS * 2 * self.grad_rtol * self.gmax[name] + 4 * U * (pmax + 3 * LR)

    def loss_tolerances(self) -> list[float]:
        """Step s sees weights that may differ by s param_tolerances: its loss by that, to first order, summed
        against |dL/dp|, plus the reassociation of the forward."""
        return [self.fwd_rtol * abs(loss) + s * sum(self.l1[s][n] * self.param_tolerance(n) for n in self.gmax)
                for s, loss in enumerate(self.losses)]


def ds_config(clip: float) -> dict:
    return {
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": EPS, "weight_decay": WD,
                                                   "torch_adam": True}},
        "zero_optimization": {"stage": 1}, "gradient_clipping": clip, "steps_per_print": 2**31 - 1,
    }


def param_groups(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    keep = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": WD}, {"params": keep, "weight_decay": 0.0}) if g["params"]]


def build_schedule(name: str, cfg, topo, microbatches: int, ds_config: dict, groups_fn=param_groups,
                   gemm_backend=None, **spec_fields):
    """This rank's model and step schedule as the trainer builds them (parallel/rank_model.py, registry.py)."""
    from parallel.rank_model import build_rank_model
    from parallel.registry import build_step_schedule
    from parallel.step_schedule import PipelineSpec

    spec = PipelineSpec(name=name, topo=topo, microbatches=microbatches, micro_batch_size=MICRO, seq_len=SEQ,
                        ds_config=ds_config, **spec_fields)
    torch.manual_seed(0)
    model = build_rank_model(cfg, spec, gemm_backend)
    spec.param_groups = groups_fn(model)
    return build_step_schedule(model, spec)


def reference_steps(cfg, batches_per_step, clip: float, cp: int = 1) -> Reference:
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    opt = torch.optim.AdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), eps=EPS)
    named = list(model.named_parameters())
    losses, l1, gmax, first, norm = [], [], {n: 0.0 for n, _ in named}, {}, 0.0
    for s, batches in enumerate(batches_per_step):
        opt.zero_grad()
        total = 0.0
        for b in batches:
            out = forward(model, b)
            (out.loss / len(batches)).backward()
            total += float(out.loss.detach()) / len(batches)
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in named}
        l1.append({n: float(g.abs().sum()) for n, g in grads.items()})
        step_norm = float(sum(float(g.double().square().sum()) for g in grads.values()) ** 0.5)  # fp64, as ZeRO
        if s == 0:
            first, norm = {n: g.clone() for n, g in grads.items()}, step_norm
        if clip:  # torch.nn.utils.clip_grad_norm_ with the fp64 norm
            for g in grads.values():
                g.mul_(min(1.0, clip / (step_norm + 1e-6)))
        for n, p in named:
            if p.grad is not None:
                gmax[n] = max(gmax[n], float(p.grad.abs().max()))
        opt.step()
        model.update_router_biases()
        losses.append(total)
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    if cp > 1:
        return Reference(losses, state, first, norm, gmax, l1, CP_GRAD_RTOL, CP_FWD_RTOL)
    return Reference(losses, state, first, norm, gmax, l1)


def evaluate_reference(cfg, ref: Reference, batches, steps: int) -> list[tuple[float, float]]:
    """(LM loss, tolerance) of each batch in eval mode at the reference's trained weights: the tolerance is the
    forward's reassociation plus the parameters' (`steps` param_tolerances) to first order, against |dL/dp|."""
    model = DeepseekV3(cfg)
    model.load_state_dict(ref.state)
    model.eval()
    out = []
    for b in batches:
        model.zero_grad()
        loss = forward(model, b).lm_loss
        loss.backward()
        tol = ref.fwd_rtol * abs(float(loss)) + steps * sum(float(p.grad.abs().sum()) * ref.param_tolerance(n)
                                                        for n, p in model.named_parameters() if p.grad is not None)
        out.append((float(loss), tol))
    return out


def capture_grads(engine, named_params) -> dict[str, torch.Tensor]:
    """Filled when the engine's first optimizer step starts: the full gradient of each (name, parameter) as
    ZeRO-1 hands it to the optimizer (reduced over the parameter's data-parallel group, mirror copies and tied
    copies summed, before clipping). A collective over each parameter's ZeRO group."""
    from deepspeed.utils import safe_get_full_grad

    named = list(named_params)
    grads: dict[str, torch.Tensor] = {}
    take_step = engine._take_model_step

    def capture_then_step(*args, **kwargs):
        if not grads:
            for name, p in named:
                grads[name] = safe_get_full_grad(p).detach().reshape(p.shape).clone()
        return take_step(*args, **kwargs)

    engine._take_model_step = capture_then_step
    return grads


def compare(ref: Reference, grads: dict, norm: float, state: dict, losses: list[float], steps: int) -> dict:
    """The report `assert_matches` reads (plain values: it travels through a queue). `grads` (first step) and
    `state` (after `steps`) by single-process name: this rank's, or the full model gathered."""

    def worst(values: dict[str, float]) -> tuple[float, str]:
        return max((v, n) for n, v in values.items()) if values else (0.0, "")

    grad_rel = {n: float((g - ref.grads[n]).abs().max()) / (float(ref.grads[n].abs().max()) + 1e-30)
                for n, g in grads.items()}
    param_ratio = {n: float((t - ref.state[n]).abs().max()) / (steps * ref.param_tolerance(n))
                   for n, t in state.items() if n in ref.gmax}
    buffers = {n: float((t - ref.state[n]).abs().max()) for n, t in state.items()
               if n not in ref.gmax and t.is_floating_point()}
    return {
        "grad_rel": worst(grad_rel), "n_grads": len(grads), "norm": norm, "ref_norm": ref.norm,
        "param_ratio": worst(param_ratio), "n_params": len(param_ratio), "buffer_diff": worst(buffers),
        "losses": losses, "ref_losses": ref.losses, "loss_tols": ref.loss_tolerances(), "grad_rtol": ref.grad_rtol,
    }


def assert_evaluation_matches(rep: dict) -> None:
    """forward_only through the schedule at the trained weights: the loss stage's microbatches against the
    trained reference model (`evaluate_reference`)."""
    for mb, (loss, (want, tol)) in rep["eval"].items():
        assert abs(loss - want) <= tol, (mb, loss, want, tol)


def assert_matches(rep: dict) -> None:
    """First-step gradients and grad norm, parameters after the steps and every step's loss, against the single
    process, each to the tolerance its arithmetic allows (see the constants above and Reference)."""
    assert rep["n_grads"] == rep["n_params"] > 0, rep  # every parameter's gradient was captured
    assert rep["grad_rel"][0] <= rep["grad_rtol"], rep["grad_rel"]
    assert abs(rep["norm"] - rep["ref_norm"]) <= rep["grad_rtol"] * rep["ref_norm"], (rep["norm"], rep["ref_norm"])
    assert rep["param_ratio"][0] <= 1.0, rep["param_ratio"]
    assert rep["buffer_diff"][0] == 0.0, rep["buffer_diff"]  # router biases: integer counts, the same update
    for got, want, tol in zip(rep["losses"], rep["ref_losses"], rep["loss_tols"], strict=True):
        assert abs(got - want) <= tol, (rep["losses"], rep["ref_losses"], rep["loss_tols"])


def run_engine(rank: int, world: int, schedule: str, pp: int, microbatches: int, steps: int, clip: float,
               layers: int, documents: bool = False, cp: int = 1):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from parallel.topology import PipelineTopology
    from trainer.load_balance import moe_routers, update_router_biases

    cfg = tiny_config(num_hidden_layers=layers)
    dp = world // pp // cp  # data replicas; a stage's data group has dp x cp ranks
    topo = PipelineTopology(pp=pp, dp=dp * cp, rank=rank, dualpipe=schedule == "dualpipe", cp=cp)
    topo.build_groups()
    sched = build_schedule(schedule, cfg, topo, microbatches, ds_config(clip))
    grads = capture_grads(sched.engine, sched.module.named_parameters())
    all_batches = make_batches(cfg, steps * microbatches * dp, documents=documents)
    # global batch of a step: dp x microbatches samples; data rank d takes its contiguous slice
    per_step = [all_batches[s * microbatches * dp:(s + 1) * microbatches * dp] for s in range(steps)]
    losses, norms = [], []
    routers = moe_routers(sched.module)
    replica = topo.dp_rank // cp  # the cp ranks of a replica read the same samples
    for s in range(steps):
        mine = per_step[s][replica * microbatches:(replica + 1) * microbatches]
        out = sched.train_batch(iter(mine))
        norms.append(float(sched.engine.get_global_grad_norm()))
        update_router_biases(routers, group=sched.counts_group)
        # the loop averages over dp
        vec = out.loss.double().clone()
        torch.distributed.all_reduce(vec, group=topo.groups["data"])
        losses.append(float(vec) / (dp * cp))
    ref = reference_steps(cfg, per_step, clip, cp)
    report = compare(ref, grads, norms[0], sched.module.state_dict(), losses, steps)

    # evaluation through the pipeline (the trainer's eval path) at the trained weights
    batches = per_step[0][:sched.eval_microbatches(microbatches)]
    evals: dict[int, float] = {}
    sched.forward_only(batches, lambda i, mb: evals.__setitem__(i, float(mb.lm_loss)))
    if cp > 1:  # each cp rank's loss is its part of the token mean, times cp: the mean over the pair is the loss
        keys = sorted(evals)
        both = torch.tensor([evals[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(both, group=topo.groups["cp"])
        evals = {k: float(v) / cp for k, v in zip(keys, both)}
    want = evaluate_reference(cfg, ref, batches, steps)
    return {**report, "eval": {i: (loss, want[i]) for i, loss in evals.items()}, "n_eval": len(batches)}
