"""A checkpoint resumes only under the parallel layout it was written with: another schedule (or pp, ep) is one
`error: parallel.<key>: ...` line and exit 2, before anything is loaded."""

from __future__ import annotations

from pathlib import Path

from tests.trainer.conftest import base_overrides, launch


def test_resume_with_another_schedule_is_one_line(tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    args = base_overrides(tiny_data, run_dir, "parallel=dp", "train.steps=1", "train.eval_interval=0",
                          "train.eval_batches=0", "checkpoint.interval=1", "optim.warmup_steps=0")
    launch(args, nproc=1)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000001"
    proc = launch([*args, "train.steps=2", "parallel.schedule=dualpipev", "train.resume=auto"], nproc=1,
                  check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith("error: parallel.schedule:"), proc.stderr[-2000:]
    assert "saved with parallel.schedule=none" in errors[0]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000001"  # nothing written
