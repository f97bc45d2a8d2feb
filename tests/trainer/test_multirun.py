"""Hydra multirun (-m) with the basic launcher: 2 jobs, each on 2 ranks, each with its own run directory,
the sweep as their wandb group, and the sweep's summary table (trainer/cluster/sweep.py) at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.conftest import MODEL, TRAIN, launch, losses

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_multirun_two_jobs_two_ranks_each(tiny_data: Path, tmp_path: Path):
    sweep = tmp_path / "sweep"
    proc = launch(["-m", *MODEL, *TRAIN, f"data.dirs=[{tiny_data}]", "train.steps=2", "train.eval_interval=0",
                   "checkpoint.interval=0", "logging.wandb.mode=offline", "name=sweep-marker",
                   f"hydra.sweep.dir={sweep}", "optim.lr=0.01,0.005"],
                  nproc=2, env={"DSV3_LAUNCH_ID": "launch-7f3a"})
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"], proc.stdout
    group = str(sweep).removeprefix("multirun/").replace("/", "-")
    lrs = []
    for job in jobs:
        assert sorted(losses(job)) == [1, 2]
        assert (job / "checkpoints" / "latest").read_text() == "step00000002"
        assert (job / "loss_curve.png").is_file()
        cfg = (job / "config.yaml").read_text()
        assert f"run_dir: {job}" in cfg
        lrs.append(next(line for line in cfg.splitlines() if line.strip().startswith("lr:")).split()[-1])
        runs = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        data = runs[0].read_bytes()
        assert len(runs) == 1 and group.encode() in data and f"sweep-marker-{job.name}".encode() in data
    assert lrs == ["0.01", "0.005"]
    # one table of the jobs' final metrics, written once (rank 0) and printed
    table = (sweep / "sweep_summary.md").read_text().splitlines()
    assert table[2].startswith("| job | optim.lr | state | step | train LM loss | val LM loss |")
    for job, lr in ((0, "0.01"), (1, "0.005")):
        row = table[4 + job]
        assert row.startswith(f"| {job} | {lr} | done | 2 | "), row
        loss = losses(sweep / str(job))[2]
        assert f" {loss:.4f} " in row
    assert proc.stdout.count("sweep summary (") == 1 and "| 1 | 0.005 | done | 2 |" in proc.stdout
