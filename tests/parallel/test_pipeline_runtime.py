"""Pipelined training steps equal the single-process model: losses per microbatch and every gradient."""

import pytest

from parallel.spawn import run_ranks
from tests.parallel.pipeline_workers import run_pipeline

# Gradients: each parameter sums the same per-microbatch terms as the single-process model but in another
# order (microbatches interleave, W runs later), so equality is to fp32 reassociation, 1e-5 relative to the
# gradient's magnitude. Losses: the forward arithmetic is the same, so they are compared exactly.
GRAD_RTOL = 1e-5


def check(reports, microbatches):
    seen = {}
    for rep in reports:
        assert rep["checked"] > 0
        assert rep["max_grad_diff"] <= GRAD_RTOL, rep["max_grad_diff"]
        assert rep["counts_equal"]
        for mb, (loss, ref) in rep["losses"].items():
            assert loss == ref, (mb, loss, ref)
            seen[mb] = loss
    assert sorted(seen) == list(range(microbatches))


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "schedule, world, microbatches, defer_w, recompute",
    [
        ("dualpipev", 1, 2, True, "selective"),
        ("dualpipev", 2, 4, True, "selective"),
        ("dualpipev", 3, 6, True, "full"),
        ("dualpipev", 4, 8, False, "none"),
        ("dualpipe", 2, 4, True, "none"),
        ("dualpipe", 2, 4, True, "chunked_head"),  # no recompute; the heads' loss without logits
        ("dualpipe", 2, 6, False, "full"),
        ("dualpipe", 4, 8, True, "full"),
    ],
)
def test_pipeline_equals_single_process(schedule, world, microbatches, defer_w, recompute):
    """The tiny model with MoE (grouped routing, shared expert) and MTP; one block per stage. `recompute`: none,
    selective (model.selective_recompute), full (whole blocks, model.activation_checkpointing) or chunked_head
    (none, with model.chunked_head_loss: the head's weight-gradient then comes in B, not in a deferred W)."""
    stages = 2 * world if schedule == "dualpipev" else world
    overrides = {"num_hidden_layers": stages, "first_k_dense_replace": 1,
                 "activation_checkpointing": recompute == "full", "selective_recompute": recompute == "selective",
                 "chunked_head_loss": recompute == "chunked_head"}
    reports = run_ranks(world, run_pipeline, schedule, microbatches, overrides, defer_w)
    check(reports, microbatches)
