"""Expert parallelism inside pipeline stages (pp=2 x dp=2, ep=2: 4 processes) equals the single-process model,
and the overlapped sub-step blocks (parallel/ep_overlap.py) equal the sequential layer; 1F1B (DeepSpeed's
PipelineEngine) with synchronous dispatch too. Also dp = 2 x ep at
pp=1 through the DeepSpeed engine.

Routing is skewed (experts 1, 2, 6 never chosen, 5 always), so some experts, and whole expert slices of a
rank, receive no rows."""

from __future__ import annotations

import pytest

from parallel.spawn import run_ranks
from tests.parallel.engine_workers import assert_matches
from tests.parallel.ep_engine_workers import run_ep_engine, run_pipeline_ep, run_pipeline_ep_grads


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule, checkpointing, documents",
                         [("dualpipe", False, False), ("dualpipev", True, False), ("dualpipe", False, True)],
                         ids=["dualpipe", "dualpipev_checkpointing", "dualpipe_packed_documents"])
def test_pipeline_ep_gradients_equal_single_process(schedule, checkpointing, documents):
    """(packed documents: the overlapped sub-steps keep attention inside each document, as the single process)"""
    reports = run_ranks(4, run_pipeline_ep_grads, schedule, 2, 2, 4, checkpointing, documents)
    seen = 0
    for rep in reports:
        assert rep["n_grads"] == rep["n_ref"]
        # the overlapped path really ran on some rank's stages; the sequential run used none
        assert rep["sequential_substep_blocks"] == 0
        for overlapped, sequential, single in rep["loss_pairs"]:
            assert overlapped == sequential  # the same operations on the same rows in forward
            assert abs(overlapped - single) <= 1e-6 * abs(single)
            seen += 1
        # same arithmetic; only autograd's order of summing a tensor's gradient contributions may differ
        assert rep["overlap_vs_sequential"] <= 1e-6, rep["overlap_vs_sequential"]
        assert rep["overlap_vs_reference"] <= 1e-5, rep["overlap_vs_reference"]
    assert seen == 4 * 2  # every microbatch of both data ranks has its loss on exactly one pipeline rank
    assert sum(rep["substep_blocks"] for rep in reports) > 0


def check_engine_steps(reports: list[dict]) -> None:
    """Every rank's run_pipeline_ep report against single-process training: the full model's tensors, first-step
    gradients, grad norm and losses, and the bias update (global counts, the same on every rank as in one
    process; the skewed experts stay empty)."""
    for rep in reports:
        assert rep["n"] == rep["n_ref"]
        assert_matches(rep)
        assert rep["bias_diff"] == 0.0
        assert all(set(empty) >= {1, 2, 6} for empty in rep["empty_last_step"].values())


@pytest.mark.multiprocess
def test_pipeline_ep_engine_steps_equal_single_process():
    """DualPipe pp=2 x dp=2 with ep=2 through its DeepSpeed engine (ZeRO-1 over the expert-DP groups, AdamW,
    clipping): first-step gradients and grad norm, two steps and their losses equal single-process training
    (compared as in test_pipeline_engine.py)."""
    reports = run_ranks(4, run_pipeline_ep, "dualpipe", 2, 2, 4, 2, 1.0, 2, True)
    check_engine_steps(reports)
    for rep in reports:
        # the recorded step holds this rank's all-to-alls: 2 MoE blocks x 2 microbatches x 5 (count exchange,
        # dispatch, combine and their gradients)
        assert rep["a2a_events"] == 20, rep["a2a_events"]


@pytest.mark.multiprocess
def test_dp_twice_ep_engine_steps_equal_single_process(tmp_path):
    """pp=1, dp=4, ep=2: expert gradients summed over the expert-DP pairs, ZeRO-1 partitions there."""
    reports = run_ranks(4, run_ep_engine, 2, 2, 2, 1.0, str(tmp_path / "checkpoints"))
    for rep in reports:
        assert rep["n"] == rep["n_ref"]
        assert_matches(rep)
        assert rep["ref_norm"] > 1.0  # the clip is active
        assert rep["bias_diff"] == 0.0 and rep["resume_diff"] == 0.0


@pytest.mark.multiprocess
def test_1f1b_with_ep_steps_equal_single_process():
    """DeepSpeed's 1F1B PipelineEngine (pp=2 x dp=2) with ep=2: the experts' all-to-alls run synchronously inside
    its forward and backward instructions; ZeRO-1 reduces expert gradients over the expert-DP pairs. First-step
    gradients and grad norm, two steps' losses and the bias updates equal single-process training. Four layers,
    so stage 0 holds a MoE layer too (validate refuses a stage without one: DeepSpeed's per-group grad-norm
    reduction over the pipeline would not pair up)."""
    check_engine_steps(run_ranks(4, run_pipeline_ep, "1f1b", 2, 2, 4, 2, 1.0, 4, False))
