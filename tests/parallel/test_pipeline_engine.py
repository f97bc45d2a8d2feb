"""DualPipe / DualPipeV through a DeepSpeed engine (ZeRO-1, AdamW, clipping) equal single-process training, and
their evaluation (`forward_only`) equals the trained single-process model."""

import pytest

from parallel.spawn import run_ranks
from tests.parallel.engine_workers import assert_evaluation_matches, assert_matches, run_engine

# Gradients are summed in another order than in the single-process model (microbatches interleave, W runs late,
# mirror copies add up), so they agree to fp32 reassociation: the first step's gradients as ZeRO-1 hands them to
# the optimizer and the grad norm it clips by are compared directly, the parameters after two AdamW steps through
# an eps that keeps the update Lipschitz in the gradient, the losses to first order (tests/parallel/engine_workers).
# A missing mirror sum halves a stage's gradients; a stage counted twice in the norm moves it by ~10%.


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "schedule, world, pp, microbatches, clip, layers, documents",
    [
        ("dualpipe", 2, 2, 4, 0.0, 2, False),
        ("dualpipev", 2, 2, 4, 1.0, 4, False),
        ("dualpipe", 4, 2, 4, 1.0, 2, False),  # pp=2 x dp=2
        ("dualpipev", 2, 2, 4, 1.0, 4, True),  # packed documents: masks on every stage, from the rank's batches
    ],
)
def test_engine_steps_equal_single_process(schedule, world, pp, microbatches, clip, layers, documents):
    reports = run_ranks(world, run_engine, schedule, pp, microbatches, 2, clip, layers, documents)
    for rep in reports:
        assert_matches(rep)
        assert_evaluation_matches(rep)
    # forward_only: every microbatch's loss lands on exactly one pipeline rank of each data replica
    assert sum(len(rep["eval"]) for rep in reports) == (world // pp) * reports[0]["n_eval"]
