"""Preemption and the two-node rehearsal.

The rehearsal runs scripts/slurm/train.sbatch as Slurm would on two nodes (two local processes with distinct
node ranks, srun's environment, MASTER_ADDR from the node list): the default DualPipe job over 2 ranks. It
is also the uninterrupted reference: the same job SIGTERMed mid-run as Slurm signals a job step (every process:
the batch shell, srun, the ranks and rank 0's wandb service, wandb in its default offline mode; srun forwards
the signal once more) checkpoints, exits 75, and run again resumes to exactly the same losses. SIGUSR1 delivered
to one rank only (through DeepSpeed's own runner) stops every rank at the same step. The same deliveries through
`make train` (trainer.launch): tests/cluster/test_signals.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import (
    base_overrides,
    fake_slurm_env,
    finish_job,
    job_processes,
    left_behind,
    losses,
    names,
    preemption_checkpoint,
    rows,
    sbatch,
    sbatch_cmd,
    start_job,
    wait_for_step,
)
from tests.trainer.conftest import launch
from trainer.cluster.exit_codes import EXIT_PREEMPTED
from trainer.cluster.preemption import PreemptionHandler

STEPS = ["train.steps=10", "train.eval_interval=5", "checkpoint.interval=5", "parallel.timeline_step=0"]


def test_handler_sets_a_flag_and_chains_the_previous_handler():
    seen = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with PreemptionHandler() as h:
            assert not h.requested
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal from another sender: the first one is reported
            time.sleep(0.01)
            assert h.requested and h.received == signal.SIGUSR1 and seen == []  # only a flag, nothing else
            h.chain_previous()  # after the checkpoint: the launcher's own handler (submitit's requeue) runs
            assert seen == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) is not h._on_signal
            # where the previous handler was the default (death), ours stays: a repeat cannot kill the way out
            assert signal.getsignal(signal.SIGUSR2) == h._on_signal
        assert seen == [signal.SIGUSR1]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)



@pytest.fixture(scope="module")
def rehearsal(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("rehearsal") / "run"
    env = fake_slurm_env(nodes=2)
    proc = sbatch(base_overrides(tiny_data, run_dir, *STEPS), env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_node_rehearsal_through_the_batch_script(rehearsal):
    run_dir, proc = rehearsal
    port = next(int(line.split(":")[-1]) for line in proc.stdout.splitlines() if line.startswith("== job "))
    # two "nodes" with distinct node ranks, one rank each; the master is the node list's first host
    assert f"world: 2 ranks on 2 nodes: localhost (node 0): ranks 0; 127.0.0.1 (node 1): ranks 1; master " \
           f"localhost:{port}" in proc.stdout
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 11)) and loss[10] < loss[1] - 0.3
    ckpt = run_dir / "checkpoints" / "step00000010"
    assert {"rank_00000.safetensors", "rank_00001.safetensors"} <= {p.name for p in (ckpt / "state").iterdir()}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_to_every_process_checkpoints_exits_75_and_resumes_exactly(rehearsal, tiny_data: Path,
                                                                           tmp_path: Path):
    reference, _ = rehearsal
    run_dir = tmp_path / "run"
    args = base_overrides(tiny_data, run_dir, *STEPS, "logging.wandb.mode=offline")  # wandb's default mode
    proc = start_job(sbatch_cmd(args), fake_slurm_env(nodes=2))
    wait_for_step(proc, run_dir, 2)
    procs = job_processes(proc)  # bash (the batch script), local-srun, 2 ranks, rank 0's wandb service
    tasks = [p for p in procs if "trainer.train" in p.cmdline() and "trainer.slurm" not in p.cmdline()]
    assert len(tasks) == 2 and any(p.name() == "wandb-core" for p in procs), names(procs)
    for p in procs:  # Slurm signals every process of the job
        p.send_signal(signal.SIGTERM)
    out = finish_job(proc)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = preemption_checkpoint(run_dir, out)
    assert 2 <= stopped < 10
    ckpts = run_dir / "checkpoints"
    assert out.count("warning: wandb failed") == 1, out[-3000:]  # the service died with the job: one line
    assert "run this script again to resume" in out  # no scontrol here; on Slurm the script requeues the job
    assert [r["step"] for r in rows(run_dir, "eval")] == [s for s in (5,) if s <= stopped and s != stopped]
    assert not left_behind(procs)

    resumed = sbatch(args, fake_slurm_env(nodes=2))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {ckpts / f'step{stopped:08d}'} at step {stopped}" in resumed.stdout
    assert losses(run_dir) == losses(reference)  # bit for bit, every step
    assert [r["eval/lm_loss"] for r in rows(run_dir, "eval")] == [r["eval/lm_loss"] for r in rows(reference, "eval")]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigusr1_on_one_rank_stops_all_ranks_at_the_same_step(rehearsal, tiny_data: Path, tmp_path: Path):
    # DeepSpeed's own runner (`deepspeed --num_gpus 2`); the signal reaches rank 1 only, in the middle of step 3
    run_dir = tmp_path / "run"
    proc = launch(base_overrides(tiny_data, run_dir, *STEPS), nproc=2, check=False, launcher="deepspeed",
                  env={"DSV3_FAULT_INJECT": "signal:USR1:rank:1:step:3"})
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preempted (a signal to another rank): stopped after step 3" in proc.stdout  # rank 0 reports
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000003"
    # the deepspeed launcher runs the same job as the two-node batch script: the same losses so far
    reference, _ = rehearsal
    assert losses(run_dir) == {s: v for s, v in losses(reference).items() if s <= 3}
