"""`1f1b` (DeepSpeed's PipelineModule / PipelineEngine on our model) equals single-process training."""

from __future__ import annotations

import os

import pytest

from parallel.spawn import run_ranks
from tests.conftest import tiny_config
from tests.parallel.engine_workers import assert_evaluation_matches, assert_matches, ds_config, reference_steps
from tests.parallel.pipeline_workers import MICRO, SEQ, make_batches


def run_1f1b(rank: int, world: int, pp: int, microbatches: int, steps: int, clip: float, layers: int,
             documents: bool = False) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from parallel.topology import PipelineTopology
    from tests.parallel.engine_workers import build_schedule, capture_grads, compare, evaluate_reference
    from trainer.load_balance import moe_routers, update_router_biases

    cfg = tiny_config(num_hidden_layers=layers)
    dp = world // pp
    topo = PipelineTopology(pp=pp, dp=dp, rank=rank)
    topo.build_groups()
    sched = build_schedule("1f1b", cfg, topo, microbatches, ds_config(clip))
    grads = capture_grads(sched.engine, sched.model.named_parameters())  # the tied copy: its tied gradient
    all_batches = make_batches(cfg, steps * microbatches * dp, documents=documents)
    per_step = [all_batches[s * microbatches * dp:(s + 1) * microbatches * dp] for s in range(steps)]
    dp_rank = rank % dp
    routers = moe_routers(sched.module)
    losses, lm, norms = [], [], []
    for s in range(steps):
        if s == steps - 1:
            sched.record_next_step()
        out = sched.train_batch(iter(per_step[s][dp_rank * microbatches:(dp_rank + 1) * microbatches]))
        norms.append(float(sched.engine.get_global_grad_norm()))
        update_router_biases(routers, group=sched.counts_group)
        losses.append(float(out.loss))
        lm.append(float(out.lm_loss))
    timeline = sorted(e.label for e in sched.take_timeline())
    ref = reference_steps(cfg, per_step, clip)
    state = sched.model.state_dict()  # single-process names of this rank's pieces (tied copy included)
    report = compare(ref, grads, norms[0], state, losses, steps)

    # evaluation through the pipeline: the trained weights' losses (and logits) against the reference model's
    logits, lm_losses = {}, {}

    def seen(mb: int, ctx) -> None:
        logits[mb], lm_losses[mb] = ctx.logits.shape, float(ctx.lm_loss)

    sched.forward_only(per_step[0][:microbatches], seen)
    want = evaluate_reference(cfg, ref, per_step[0][:microbatches], steps)
    eval_pairs = {mb: (loss, want[mb]) for mb, loss in lm_losses.items()}
    return {**report, "lm": lm, "names": sorted(state), "eval": eval_pairs,
            "logits": {mb: tuple(s) for mb, s in logits.items()}, "timeline": timeline}


@pytest.mark.multiprocess
@pytest.mark.parametrize("documents", [False, True], ids=["plain", "packed_documents"])
def test_1f1b_steps_equal_single_process(documents: bool):
    """pp=2, MoE (grouped routing, shared expert) and MTP: stage 0 holds a MoE block whose balance loss only
    reaches backward through the seed, stage 1 the head whose MTP reads the tied embedding. Tolerances as in
    test_pipeline_engine.py (clipping on, so the grad norm must count the tied copy once; the tied copy's
    gradient is the sum over both stages). Packed documents: their boundaries ride the pipeline tuple to every
    stage (attention masks on both, the target masks on the loss stage)."""
    reports = run_ranks(2, run_1f1b, 2, 4, 2, 1.0, 4, documents)
    for rep in reports:
        assert_matches(rep)
    assert reports[0]["lm"] == reports[1]["lm"]  # the loss stage's LM loss reaches every rank
    for rep in reports:  # the recorded step: one F and one B per microbatch on each stage
        assert rep["timeline"] == sorted(f"{k}0.{mb}" for k in "FB" for mb in range(4)), rep["timeline"]
    first, last = (set(r["names"]) for r in reports)
    assert "embed.embed_tokens.weight" in first and "embed.embed_tokens.weight" in last  # the tied copy
    assert not any(n.startswith("head.") for n in first) and any(n.startswith("head.mtp.") for n in last)
    # forward_only: the loss stage sees every microbatch, with logits, equal to the trained reference model
    assert not reports[0]["eval"] and sorted(reports[1]["eval"]) == [0, 1, 2, 3]
    assert_evaluation_matches(reports[1])
    assert set(reports[1]["logits"].values()) == {(MICRO, SEQ, 256)}


def test_1f1b_needs_layers_divisible_by_pp():
    from parallel.rank_model import RankStages, build_stage_model
    from parallel.stages import StageError

    with pytest.raises(StageError, match=r"^parallel\.pp: 3 decoder layers do not split into 2"):
        build_stage_model(tiny_config(num_hidden_layers=3), RankStages((0,), 2))
