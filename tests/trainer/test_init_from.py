"""`train.init_from`: a new run from another run's checkpoint (weights, router biases, optionally the optimizer
state) with a fresh step count, data position and LR schedule; other sequence length and schedule allowed."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.conftest import base_overrides, launch, rows
from trainer.elastic_state import KINDS, read_full


def _last_checkpoint(run):
    return max((run / "checkpoints").glob("step*"))


@pytest.mark.slow
def test_a_new_run_starts_from_the_weights_with_everything_else_fresh(tiny_data, tmp_path):
    source = tmp_path / "source"
    launch(base_overrides(tiny_data, source, "parallel=dp", "train.steps=3", "checkpoint.interval=0"), nproc=1)
    src = read_full(_last_checkpoint(source), KINDS)

    def new_run(name: str, *extra: str):
        run = tmp_path / name
        # lr 1e-30: the step's update (<= lr per entry, Adam's normalised step) is far below the fp32 spacing of
        # any weight (init std 0.006), so the run saves exactly what it loaded; another seq_len and LR schedule
        # than the source's, which a resume would refuse
        proc = launch(base_overrides(tiny_data, run, "parallel=dp", "train.steps=1", "train.seq_len=16",
                                     "optim.lr=1e-30", "optim.min_lr=1e-30", "optim.schedule=constant",
                                     "optim.warmup_steps=0", "train.eval_batches=0",
                                     f"train.init_from={source}", *extra), nproc=1)
        return run, proc, read_full(_last_checkpoint(run), KINDS)

    fresh_run, proc, fresh = new_run("fresh")
    line = next(x for x in proc.stdout.splitlines() + proc.stderr.splitlines() if "initialised from" in x)
    assert "(step 3)" in line and "reset step count, data position, learning-rate schedule, RNG, optimizer" in line
    assert [r["step"] for r in rows(fresh_run)] == [1]  # a fresh step count
    for name, t in src["param"].items():  # the weights and router biases carried over, bit for bit
        assert torch.equal(fresh["param"][name], t), name
    # the new run's one bias update moves each bias by exactly +-gamma or 0 from the carried one (from zero, a
    # bias the source had moved to +-gamma would end at 0 or +-2 gamma instead)
    gamma = 1e-3
    for name, t in src["buffer"].items():
        if "e_score_correction_bias" in name:
            delta = (fresh["buffer"][name] - t).abs()
            assert (((delta - gamma).abs() < 1e-7) | (delta == 0)).all() and t.abs().max() > 0, (name, t)

    carried_run, proc, carried = new_run("carried", "train.init_optimizer=true")
    assert "fp32 masters and Adam moments" in proc.stdout + proc.stderr
    # both new runs took one step on the same first batch (the data position restarts) with the same weights,
    # so their gradients g are equal; Adam's first moment is b1 * m_source + (1 - b1) * g with the carried
    # state and (1 - b1) * g without: the difference is b1 * m_source, up to one fp32 rounding of each sum
    b1 = 0.9
    for name, m in src["exp_avg"].items():
        diff = carried["exp_avg"][name] - fresh["exp_avg"][name]
        scale = float(carried["exp_avg"][name].abs().max() + fresh["exp_avg"][name].abs().max()) + 1e-30
        assert torch.allclose(diff, b1 * m, rtol=0, atol=4 * torch.finfo(torch.float32).eps * scale), name


@pytest.mark.slow
def test_init_from_refuses_another_model_shape(tiny_data, tmp_path):
    source = tmp_path / "source"
    launch(base_overrides(tiny_data, source, "parallel=dp", "train.steps=2", "train.eval_batches=0"), nproc=1)
    run = tmp_path / "run"
    proc = launch(base_overrides(tiny_data, run, "parallel=dp", "train.steps=2", "model.hidden_size=96",
                                 f"train.init_from={source}"), nproc=1, check=False)
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.init_from:") and "hidden_size=64" in errors[0]
    assert not (run / "config.yaml").exists()
