"""The signal contract of `make train` (scripts/train.sh -> python -m trainer.launch -> 2 ranks), with signals
delivered as they come on a cluster or a workstation, wandb in its default offline mode:

- SIGTERM to every process of the job (the script, the launcher, the ranks and rank 0's wandb service: Slurm
  signals every process of a job step), each rank getting it twice (once more from the launcher);
- SIGTERM to the launcher alone (`kill <pid>`, a scheduler that signals the process it started);
- SIGUSR1 to one rank only.

Each ends with exit 75, a complete checkpoint of the step reached, and no process left behind. Before
trainer.launch, the first two exited 143 (DeepSpeed's runner, at once, the ranks left training) or 1 (its
launch.py, after terminating every process tree), and the first one lost rank 0 to a ConnectionResetError from
the dead wandb service. The srun path (train.sbatch, every process signalled, then an exact resume) is
tests/cluster/test_preemption.py.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.cluster.conftest import (
    ROOT,
    base_overrides,
    cpu_env,
    finish_job,
    job_processes,
    left_behind,
    names,
    preemption_checkpoint,
    start_job,
    wait_for_step,
)
from trainer.cluster.exit_codes import EXIT_PREEMPTED

STEPS = ["train.steps=12", "train.eval_interval=5", "checkpoint.interval=5", "parallel.timeline_step=0"]


def train_sh(tiny_data: Path, run_dir: Path):
    overrides = [o for o in base_overrides(tiny_data, run_dir, *STEPS) if not o.startswith(("data.dirs=",
                                                                                            "logging.wandb.mode="))]
    env = cpu_env(PYTHON=__import__("sys").executable, NPROC="2", DATA_DIR=str(tiny_data))
    return start_job(["bash", str(ROOT / "scripts" / "train.sh"), *overrides], env)  # wandb: the default, offline


def ranks(procs):
    return [p for p in procs if p.cmdline()[1:4] == ["-u", "-m", "trainer.train"]]  # not the launcher(s)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("target", ["every process", "the launcher"])
def test_sigterm_through_make_train_checkpoints_and_exits_75(tiny_data: Path, tmp_path: Path, target: str):
    run_dir = tmp_path / "run"
    proc = train_sh(tiny_data, run_dir)
    wait_for_step(proc, run_dir, 2)
    procs = job_processes(proc)
    assert len(ranks(procs)) == 2 and any(p.name() == "wandb-core" for p in procs), names(procs)
    if target == "every process":
        targets = procs
    else:
        targets = [p for p in procs if "trainer.launch" in p.cmdline()]
        assert len(targets) == 1, names(procs)
    for p in targets:
        p.send_signal(signal.SIGTERM)
    out = finish_job(proc)
    assert proc.returncode == EXIT_PREEMPTED, out[-4000:]
    stopped = preemption_checkpoint(run_dir, out)
    assert stopped < 12
    assert "run the same command again to resume" in out
    # a wandb service that died with the job costs one warning line (and nothing when only the launcher was signalled)
    warned = out.count("warning: wandb failed")
    assert warned == (1 if target == "every process" else 0), out[-4000:]
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert not left_behind(procs)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigusr1_to_one_rank_through_make_train(tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = train_sh(tiny_data, run_dir)
    wait_for_step(proc, run_dir, 2)
    procs = job_processes(proc)
    rank1 = next(p for p in ranks(procs) if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)
    out = finish_job(proc)
    assert proc.returncode == EXIT_PREEMPTED, out[-4000:]
    preemption_checkpoint(run_dir, out, how="a signal to another rank")  # rank 0 reports, after the same step
    assert "warning: wandb failed" not in out
    assert not left_behind(procs)


def test_a_dead_wandb_service_costs_one_warning_and_no_row(tmp_path: Path, capsys: pytest.CaptureFixture):
    import psutil

    from trainer.report.run_logger import RunLogger

    logger = RunLogger(tmp_path / "run", {"a": 1}, rank=0, wandb_mode="offline", show_progress=False)
    logger.log(1, {"lm_loss": 3.0})
    service = [p for p in psutil.Process().children(recursive=True) if p.name() == "wandb-core"]
    assert service, "wandb's service process is a child of the logging rank"
    for p in service:
        p.send_signal(signal.SIGTERM)  # as Slurm signals it with the job
        p.wait(timeout=30)
    for step in (2, 3):
        logger.log(step, {"lm_loss": 3.0 - step / 10})  # no exception into the training loop
    logger.finish()
    out = capsys.readouterr().out
    assert out.count("warning: wandb failed in log at step 2 (") == 1 and out.count("warning") == 1, out
    assert [r["step"] for r in logger.rows] == [1, 2, 3]  # metrics.jsonl keeps every row
