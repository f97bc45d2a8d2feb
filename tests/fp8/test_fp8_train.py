"""The trainer with emulated FP8: DualPipe over 2 ranks with activation checkpointing follows the
single-process run of the same config, and the FP8 training loss stays within 0.25% of fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fp8_emulated import final_loss, rel_gap, train_losses
from tests.trainer.conftest import assert_first_step_matches, base_overrides, launch, losses

FP8 = ["precision=fp8", "precision.fp8.backend=emulated", "precision.fp8.recipe=blockwise"]
STEPS = ["train.steps=4", "train.eval_interval=0", "train.eval_batches=0", "checkpoint.interval=0",
         "checkpoint.save_final=false"]
# Same samples and weights: the first step's loss and grad norm agree as in fp32 (the per-microbatch FP8 forward
# is the same arithmetic, tests/fp8/test_fp8_pipeline.py; gradients are summed in another order). Later steps
# are not compared: AdamW's sign-like first steps (see assert_first_step_matches), and then every weight that
# differs may cross an E4M3 rounding boundary.


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fp8_dualpipe_with_checkpointing_matches_one_process(tiny_data: Path, tmp_path: Path):
    pipe, single = tmp_path / "pipe", tmp_path / "single"
    launch(base_overrides(tiny_data, pipe, *FP8, *STEPS, "parallel=dualpipe", "model.activation_checkpointing=true"),
           nproc=2)
    launch(base_overrides(tiny_data, single, *FP8, *STEPS, "parallel=dp"), nproc=1)
    assert sorted(losses(pipe)) == [1, 2, 3, 4]
    assert_first_step_matches(pipe, single)


@pytest.mark.slow
def test_blockwise_training_gap_vs_fp32(tiny_data: Path):
    """The tiny model, 200 steps on python_stdlib data, same initial weights and batches: the final training
    loss (mean of the last 20 steps) with blockwise FP8 GEMMs is within 0.25% of fp32 (the report's bar vs
    BF16). `python -m bench fp8_emulated` runs 300 steps and every recipe. The learning rate is constant after
    warm-up, so these are that run's first 200 steps: gaps 0.0002 at 200 and 0.0006 at 300 steps (2026-12-06),
    both far under the bar, for two thirds of the time."""
    reference = train_losses(tiny_data, None, steps=200)
    blockwise = train_losses(tiny_data, "blockwise", steps=200)
    assert final_loss(reference) < reference[0] - 1.5  # it learned
    gap = rel_gap(blockwise, reference)
    print(f"blockwise rel_gap {gap:.5f} (fp32 {final_loss(reference):.4f}, fp8 {final_loss(blockwise):.4f})")
    assert gap <= 0.0025, gap
