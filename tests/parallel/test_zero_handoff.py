"""DeepSpeed's ZeRO-1 optimizers handed gradients made outside `engine.backward` (parallel/zero_handoff.py) build
the same partitions and take the same step as after the engine's own backward and reduction: each rank's local
gradients (DeepSpeed reduces them), and gradients our tail reduction already averaged (it does not). fp32
(DeepSpeedZeroOptimizer) and bf16 with fp32 accumulation (BF16_Optimizer). Two ranks: the average of two values
is exact in either order of division and sum, so the comparison is exact."""

import pytest
import torch

from parallel.spawn import run_ranks
from tests.parallel.zero_handoff_workers import run_handoff, run_refusal


@pytest.mark.multiprocess
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_handoff_equals_zero1_own_reduction(dtype):
    reports = run_ranks(2, run_handoff, dtype)
    # the exact average of the two ranks' gradients (in fp32: halving is exact, so is the order of the two ops)
    exact = [(a + b) / 2 for a, b in zip(reports[0]["own"], reports[1]["own"], strict=True)]
    for rep in reports:
        assert rep["takes"]
        assert rep["optimizer"] == {"fp32": "DeepSpeedZeroOptimizer", "bf16": "BF16_Optimizer"}[dtype]
        for key in ("grads", "params"):  # local gradients, DeepSpeed reducing them: exactly its own backward
            for ours, theirs in zip(rep["local"][key], rep["deepspeed"][key], strict=True):
                assert torch.equal(ours, theirs), ("local", key, (ours - theirs).abs().max())
        for ours, want in zip(rep["reduced"]["grads"], exact, strict=True):  # reduced by us in fp32: exact
            assert torch.equal(ours, want), (ours - want).abs().max()
        if dtype == "fp32":
            for ours, theirs in zip(rep["reduced"]["params"], rep["deepspeed"]["params"], strict=True):
                assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        else:
            # DeepSpeed's BF16_Optimizer communicates in bf16: each rank's value and the sum rounded to bf16
            # (relative 2^-9 each), against our fp32 average
            for theirs, a, b, want in zip(rep["deepspeed"]["grads"], reports[0]["own"], reports[1]["own"], exact,
                                          strict=True):
                bound = 2**-9 * ((a.abs() + b.abs()) / 2 + want.abs()) * 1.01
                assert bool(((theirs - want).abs() <= bound).all()), ((theirs - want).abs() - bound).max()
        assert all(float(g.abs().max()) > 0 for g in rep["reduced"]["grads"])


@pytest.mark.multiprocess
def test_a_setup_the_handoff_cannot_reproduce_keeps_deepspeeds_reduction():
    assert run_ranks(2, run_refusal) == [False, False]
