"""`python -m trainer.train [group=option ...] [key=value ...] [-m]`: the Hydra entry point of a training job.

Launch several ranks with `python -m trainer.launch --nproc-per-node N ...` (scripts/train.sh; it keeps the
signal and exit-code contract of docs/cluster.md); DeepSpeed's `deepspeed --num_gpus N -m trainer.train` works too.
DeepSpeed's `--local_rank` argument is removed before Hydra parses argv. Hydra
errors are re-raised to us (HYDRA_FULL_ERROR) so that every user mistake ends in one line and exit code 2.
Every way out ends in `run_and_end`: the process group is destroyed before the interpreter finalizes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.distributed import end_process, prepare_argv
from trainer.errors import run_reporting_user_errors


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from trainer.job import run

    # User errors of the job itself are reported here, inside the task function: Hydra would otherwise
    # print its own "Error executing job" line first.
    run_reporting_user_errors(run, cfg)


def main() -> None:
    prepare_argv()
    register_configs()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own multi-line report
    run_and_end(lambda: run_reporting_user_errors(_hydra_main))


def run_and_end(body: Callable[[], Any]) -> None:
    """Run all of this rank's work, then end the process in order (trainer.distributed.end_process: a bounded
    barrier, the process group destroyed while the interpreter is whole) with the exit code the work chose.
    Every SystemExit of ours (0, user error 2, non-finite stop 4, preemption 75) is taken by all ranks together;
    any other exception keeps its traceback and ends through the atexit path (no barrier). After all jobs of
    a multirun, which share one process group."""
    code: Any = 0
    try:
        body()
    except SystemExit as e:
        code = e.code
    # outside the except clause: the exception's frames (the engine, its groups) are gone before the teardown
    end_process(code, together=True)
    if code not in (None, 0):
        sys.exit(code)


if __name__ == "__main__":
    main()
