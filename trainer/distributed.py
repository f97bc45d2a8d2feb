"""The distributed environment: launcher arguments, rank variables, the process group.

Order matters and is fixed by `trainer/train.py`: `prepare_argv` (before Hydra parses argv) ->
`prepare_env` (rank variables; before validation, which needs the world size) -> `init_process_group`
(after validation, so a config mistake never leaves half a job waiting on a rendezvous).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from parallel.spawn import free_port

MULTIRUN_FLAGS = ("-m", "--multirun")


def prepare_argv(argv: list[str] | None = None) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N` (appended by the deepspeed launcher; Hydra rejects it) and
    move `-m`/`--multirun` in front of the overrides (argparse rejects overrides on both sides of a flag,
    as in `scripts/train.sh`'s `checkpoint.export_hf=true -m a=1,2`).

    The value goes to LOCAL_RANK if that is not set already. Edits sys.argv in place unless argv is given.
    """
    args = sys.argv if argv is None else argv
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(args):
            os.environ.setdefault("LOCAL_RANK", args[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    flags = [a for a in out[1:] if a in MULTIRUN_FLAGS]
    args[:] = out[:1] + flags + [a for a in out[1:] if a not in MULTIRUN_FLAGS]
    return args


def map_slurm_env() -> None:
    """srun (one task per GPU) sets SLURM_* but not the torch rank variables; map them when RANK is missing.

    The mapping (RANK, WORLD_SIZE, LOCAL_RANK, NODE_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR from the node list,
    MASTER_PORT from the job id) is `trainer.cluster.slurm.slurm_rank_env`; see docs/cluster.md.
    """
    if "RANK" in os.environ:
        return
    from trainer.cluster.slurm import slurm_rank_env

    os.environ.update(slurm_rank_env(os.environ))


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cpu" | "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_env() -> DistEnv:
    """Rank variables for any launch: deepspeed/torchrun (already set), srun (mapped) or a plain `python`."""
    map_slurm_env()
    if "RANK" not in os.environ:  # a single process started by hand
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-rank launch; use the deepspeed launcher")
        os.environ["MASTER_PORT"] = str(free_port())
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # Tell DeepSpeed before it probes for accelerators (it would warn and guess CPU anyway).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), device)


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on start-up (minutes on a small
    machine, and it needs a compiler). Only DeepSpeed's inference all-reduce uses it, so mark it unavailable:
    training collectives go through torch.distributed (gloo) either way."""
    import deepspeed.ops

    compatible = deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
    compatible["deepspeed_shm_comm"] = False


def init_process_group(env: DistEnv) -> None:
    """deepspeed.init_distributed on gloo (CPU) or nccl (GPU); a no-op when already initialised (multirun)."""
    import warnings

    import torch
    import torch.distributed as dist

    # DeepSpeed's ZeRO all-gather calls a torch API that warns on every step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if env.device == "cuda":
        torch.cuda.set_device(env.local_rank)
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    if env.device == "cpu":
        _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo" if env.device == "cpu" else "nccl", verbose=False)


def dp_rank(env: DistEnv, pp: int) -> int:
    """This rank's data-parallel index. Ranks are pipe-major (rank = pipe * dp + data, DeepSpeed's grid), so
    every pipeline rank of one replica reads the same data; plain data parallel (pp=1): the global rank."""
    return env.rank % (env.world_size // pp)
