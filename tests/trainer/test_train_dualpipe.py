"""The default job's parallelism end to end: DualPipe over 2 ranks through trainer.launch (CPU, gloo).

One DualPipe run (8 steps, checkpoints at 4 and 8) is compared with the single-process model trained by the
plain data-parallel schedule on 1 rank with the same global batch; then a DualPipe run killed inside its
step-8 save resumes from step 4 and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.conftest import assert_first_step_matches, base_overrides, launch, losses, rows

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = ["parallel=dualpipe", "train.steps=8", "train.eval_interval=4", "checkpoint.interval=4",
         "parallel.timeline_step=2"]


@pytest.fixture(scope="module")
def dualpipe_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("dualpipe") / "run"
    launch(base_overrides(tiny_data, run_dir, *STEPS, "checkpoint.export_hf=true"), nproc=2)
    return run_dir


def test_dualpipe_matches_the_single_process_model(dualpipe_run: Path, tiny_data: Path, tmp_path: Path):
    single = tmp_path / "single"
    launch(base_overrides(tiny_data, single, *STEPS, "parallel=dp", "checkpoint.save_final=false",
                          "checkpoint.interval=0"), nproc=1)
    # the first step (the same samples and weights; gradients summed in another order: microbatches interleave,
    # W runs late, the two stage copies add up) and the schedule; DualPipe's evaluation against the trained
    # single-process model: tests/parallel/test_pipeline_engine.py
    assert_first_step_matches(dualpipe_run, single)
    pipe = losses(dualpipe_run)
    assert pipe[8] < pipe[1] - 0.5
    evals = rows(dualpipe_run, "eval")
    assert [r["step"] for r in evals] == [r["step"] for r in rows(single, "eval")] == [4, 8]
    assert all(r["eval/lm_loss"] > 0 and 0.0 <= r["eval/mtp_acceptance"] <= 1.0 for r in evals), evals
    # MTP and balance losses come back from the pipeline too; per-layer loads of every stage are logged
    last = rows(dualpipe_run)[-1]
    assert last["train/mtp_loss"] > 0 and last["train/balance_loss"] > 0
    assert "train/maxvio/layer_1" in last and "train/maxvio/layer_2" in last  # layer 2: the MTP block


def test_dualpipe_checkpoint_exports_and_records_a_timeline(dualpipe_run: Path):
    ckpt = dualpipe_run / "checkpoints" / "step00000008"
    # each pipeline rank wrote its pieces (one copy of each stage: the mirror copies are skipped)
    assert sorted(p.name for p in (ckpt / "state").iterdir()) == [
        "index.json", "rank_00000.safetensors", "rank_00001.safetensors"]
    assert not list(ckpt.glob("*.pt"))  # no DeepSpeed files
    assert (dualpipe_run / "hf" / "config.json").is_file()  # both pipeline ranks' weights merged
    trace = json.loads((dualpipe_run / "timeline.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in events} == {0, 1} and all(e["dur"] > 0 for e in events)
    assert {e["cat"] for e in events} >= {"F", "B", "W"}
    assert (dualpipe_run / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_dualpipe_killed_during_save_resumes_exactly(dualpipe_run: Path, tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "crash"
    args = base_overrides(tiny_data, run_dir, *STEPS)
    crashed = launch(args, nproc=2, env={"DSV3_FAULT_INJECT": "checkpoint_save:8"}, check=False)
    assert crashed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000004"
    resumed = launch([*args, "train.resume=auto"], nproc=2)
    assert "resumed from" in resumed.stdout
    assert losses(run_dir) == losses(dualpipe_run)


def test_dualpipev_stop_and_resume_equals_uninterrupted(tiny_data: Path, tmp_path: Path):
    """DualPipeV (4 stages on 2 ranks: rank 0 holds embedding, head and MTP): a run killed inside its step-6
    save resumes from step 3 and reproduces the uninterrupted run exactly."""
    args = ["parallel=dualpipev", "model.num_hidden_layers=4", "train.eval_interval=0", "train.eval_batches=0",
            "checkpoint.interval=3", "train.steps=6"]
    full = tmp_path / "full"
    launch(base_overrides(tiny_data, full, *args), nproc=2)
    split = tmp_path / "split"
    crashed = launch(base_overrides(tiny_data, split, *args), nproc=2, env={"DSV3_FAULT_INJECT": "checkpoint_save:6"},
                     check=False)
    assert crashed.returncode != 0 and (split / "checkpoints" / "latest").read_text() == "step00000003"
    launch(base_overrides(tiny_data, split, *args, "train.resume=auto"), nproc=2)
    assert sorted(losses(full)) == list(range(1, 7))
    assert losses(split) == losses(full)
