"""`python -m trainer.train [group=option ...] [key=value ...] [-m]`: the Hydra entry point of a training job.

Launch several ranks with the deepspeed launcher (`deepspeed --num_gpus N -m trainer.train ...`; on CPU
see scripts/train.sh). The launcher's `--local_rank` argument is removed before Hydra parses argv. Hydra
errors are re-raised to us (HYDRA_FULL_ERROR) so that every user mistake ends in one line and exit code 2.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from trainer.config import register_configs
from trainer.distributed import prepare_argv
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
    run_reporting_user_errors(_hydra_main)


if __name__ == "__main__":
    main()
