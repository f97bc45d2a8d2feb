"""FP8 under DualPipe / DualPipeV with activation checkpointing and deferred weight-gradients gives the
losses and gradients of the single-process FP8 model (no pipeline, no checkpointing, no deferral)."""

import pytest

from parallel.spawn import run_ranks
from tests.fp8.fp8_pipeline_workers import run_fp8_pipeline
from tests.parallel.engine_workers import GRAD_RTOL

# Losses: every stage quantizes the same tensors with the same tiles and computes the same products in the
# same order as the single process, so they are equal bitwise. Gradients: each parameter sums the same
# per-microbatch terms (products of the same quantized operands) in another order (microbatches interleave, W
# runs late, mirror copies add up): fp32 reassociation after the quantization, GRAD_RTOL of the gradient's
# largest entry (derived in tests/parallel/engine_workers.py).


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "schedule, world, microbatches, checkpointing",
    [("dualpipe", 2, 4, True), ("dualpipev", 2, 4, True), ("dualpipe", 2, 4, False)],
)
def test_fp8_pipeline_equals_single_process(schedule, world, microbatches, checkpointing):
    stages = 2 * world if schedule == "dualpipev" else world
    overrides = {"num_hidden_layers": stages, "first_k_dense_replace": 1, "activation_checkpointing": checkpointing}
    reports = run_ranks(world, run_fp8_pipeline, schedule, microbatches, overrides, "blockwise")
    seen = {}
    for rep in reports:
        assert rep["checked"] > 0
        assert rep["max_grad_diff"] <= GRAD_RTOL, rep["max_grad_diff"]
        for mb, (loss, ref) in rep["losses"].items():
            assert loss == ref, (mb, loss, ref)
            seen[mb] = loss
    assert sorted(seen) == list(range(microbatches))
