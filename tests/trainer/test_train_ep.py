"""Expert parallelism in the trainer: DualPipe pp=2 x dp=2 with ep=2 (4 ranks through trainer.launch)
trains like one process, writes layout-free checkpoints that export and resume exactly, and
records the expert all-to-alls in its timeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.conftest import assert_first_step_matches, base_overrides, launch, losses

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS = ["parallel=dualpipe", "parallel.ep=2", "train.global_batch_size=16", "train.steps=4",
         "train.eval_interval=0", "train.eval_batches=0", "checkpoint.interval=2", "parallel.timeline_step=2"]


@pytest.fixture(scope="module")
def ep_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("ep") / "run"
    proc = launch(base_overrides(tiny_data, run_dir, *STEPS, "checkpoint.export_hf=true"), nproc=4, timeout=400)
    return run_dir, proc.stdout


def test_pipeline_ep_matches_the_single_process_model(ep_run, tiny_data: Path, tmp_path: Path):
    run_dir, _ = ep_run
    single = tmp_path / "single"
    launch(base_overrides(tiny_data, single, *STEPS, "parallel=dp", "parallel.ep=1", "checkpoint.interval=0",
                          "checkpoint.save_final=false"), nproc=1)
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    assert_first_step_matches(run_dir, single)  # as for DualPipe without experts (test_train_dualpipe.py)


def test_pipeline_ep_checkpoint_timeline_and_export(ep_run):
    run_dir, stdout = ep_run
    ckpt = run_dir / "checkpoints" / "step00000004"
    assert not (ckpt / "experts").exists()  # the experts are in the layout-free state, with everything else
    index = json.loads((ckpt / "state" / "index.json").read_text())
    # every rank wrote the pieces its ZeRO-1 partition updates: a MoE layer's stacked experts come from the two
    # ep ranks (each its own experts) of the pipeline rank whose primary copy of the stage holds that layer
    # (DualPipe's mirror copy is not written)
    pieces = index["tensors"]["layers.1.block.mlp.experts.gate_up_proj.weight"]["pieces"]["param"]
    assert index["tensors"]["layers.1.block.mlp.experts.gate_up_proj.weight"]["shape"][0] == 4
    assert len({fname for _, _, fname, _ in pieces}) == 2
    assert sorted(p.name for p in (ckpt / "state").glob("rank_*")) == [f"rank_{r:05d}.safetensors" for r in range(4)]
    assert (run_dir / "hf" / "config.json").is_file()  # experts gathered over ep ranks and pipeline ranks
    trace = json.loads((run_dir / "timeline.json").read_text())
    comm = [e for e in trace["traceEvents"] if e.get("cat") == "all_to_all"]
    assert comm and all(e["tid"] == 1 and e["dur"] > 0 for e in comm)
    assert {e["pid"] for e in comm} == {0, 1, 2, 3}
    assert "expert all-to-all in step 2" in stdout


def test_pipeline_ep_killed_during_save_resumes_exactly(ep_run, tiny_data: Path, tmp_path: Path):
    reference, _ = ep_run
    run_dir = tmp_path / "crash"
    args = base_overrides(tiny_data, run_dir, *STEPS)
    crashed = launch(args, nproc=4, env={"DSV3_FAULT_INJECT": "checkpoint_save:4"}, check=False, timeout=400)
    assert crashed.returncode != 0
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    resumed = launch([*args, "train.resume=auto"], nproc=4, timeout=400)
    assert "resumed from" in resumed.stdout
    assert losses(run_dir) == losses(reference)
