"""Expert-shard files of a checkpoint: under expert parallelism every rank's routed experts are saved beside
DeepSpeed's files as `experts/[pipe_<p>_]ep_rank_<k>.pt`, restored on resume and gathered for export."""


from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.expert_shard import (
    ExpertShardRole,
    ep_layout,
    expert_shard_role,
    gather_expert_state,
    is_expert_key,
)
from trainer.checkpoint_manifest import load_torch

EXPERT_DIR = "experts"


def expert_file(ckpt: Path, ep_rank: int, pipe_rank: int | None = None) -> Path:
    prefix = "" if pipe_rank is None else f"pipe_{pipe_rank:02d}_"
    return ckpt / EXPERT_DIR / f"{prefix}ep_rank_{ep_rank:03d}.pt"


def _role(module: nn.Module) -> ExpertShardRole:
    """Which file this rank's experts go to, and whether it writes (see `parallel.expert_shard.set_expert_shard_role`).
    Without a role (pp=1): the ranks of the first EP group write."""
    role = expert_shard_role(module)
    if role is not None:
        return role
    layout = ep_layout(module)
    first_group = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() < layout[1]
    return ExpertShardRole(pipe_rank=None, writer=first_group)


def save_expert_shard(module: nn.Module, ckpt: Path) -> Path | None:
    """This rank's expert weights into `ckpt/experts/` (collective-free; only the first EP group of each
    pipeline rank writes). Returns the file written, None when this rank writes nothing (ep=1 or a replica)."""
    layout = ep_layout(module)
    if layout is None:
        return None
    ep_rank, ep_size = layout
    role = _role(module)
    if not role.writer:
        return None  # the same experts as the first EP group's rank ep_rank (expert-DP replicas)
    experts = {n: t.detach().cpu().clone() for n, t in module.state_dict().items() if is_expert_key(n)}
    path = expert_file(ckpt, ep_rank, role.pipe_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ep_size": ep_size, "ep_rank": ep_rank, "module": experts}, path)
    return path


def load_expert_shard(module: nn.Module, ckpt: Path) -> bool:
    """After `engine.load_checkpoint` at ep > 1: DeepSpeed loaded mp_rank_00 (ep rank 0's experts) into every
    rank's module; put this rank's own experts back from `experts/`. (The ZeRO-1 fp32 masters and Adam moments
    of the experts come back correctly from the zero_pp_rank_* files.) Returns whether anything was loaded."""
    layout = ep_layout(module)
    if layout is None:
        return False
    ep_rank, ep_size = layout
    saved = checkpoint_ep_size(ckpt)
    if saved != ep_size:
        raise ValueError(f"{ckpt} was written at ep={saved}, this run has ep={ep_size}: resuming across ep sizes "
                         f"is not supported (optimizer states); reshard the weights with `python -m trainer.reshard "
                         f"{ckpt} OUT --ep {ep_size}` and start from them")
    path = expert_file(ckpt, ep_rank, _role(module).pipe_rank)
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: expert shard {path.name} is missing (written with another pipeline "
                                f"layout?); resume with the parallel settings the checkpoint was written with")
    shard = load_torch(path, map_location="cpu", weights_only=True)["module"]
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in shard.items():
            params[name].copy_(value)
    return True


def _pipe_ranks(ckpt: Path) -> list[int | None]:
    """The pipeline ranks with expert files ([None] for a pp=1 checkpoint, [] without experts)."""
    names = [f.name for f in (ckpt / EXPERT_DIR).glob("*ep_rank_*.pt")]
    if any(n.startswith("ep_rank_") for n in names):
        return [None]
    return sorted({int(n.split("_")[1]) for n in names if n.startswith("pipe_")})


def checkpoint_ep_size(ckpt: Path) -> int:
    pipes = _pipe_ranks(ckpt)
    if not pipes:
        return 1
    prefix = "" if pipes[0] is None else f"pipe_{pipes[0]:02d}_"
    return len(list((ckpt / EXPERT_DIR).glob(f"{prefix}ep_rank_*.pt")))


def gather_expert_files(ckpt: Path, module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model's state: `module_state` (the union of the mp_rank files, ep rank 0's experts) with every
    expert weight replaced by all ep ranks' shards concatenated (per pipeline rank for a pipeline checkpoint).
    A checkpoint without `experts/` is returned as is."""
    ep_size = checkpoint_ep_size(ckpt)
    pipes = _pipe_ranks(ckpt)
    if not pipes:
        return module_state
    full = dict(module_state)
    for pipe in pipes:  # each pipeline rank's experts: that rank's layers, concatenated over its ep ranks
        shards = []
        for k in range(ep_size):
            path = expert_file(ckpt, k, pipe)
            if not path.is_file():
                raise FileNotFoundError(f"{ckpt}: expert shard {path.name} is missing (ep={ep_size} checkpoint)")
            shard = load_torch(path, map_location="cpu", weights_only=True)
            if shard["ep_size"] != ep_size or shard["ep_rank"] != k:
                raise ValueError(f"{path}: holds ep rank {shard['ep_rank']} of {shard['ep_size']}, expected {k} "
                                 f"of {ep_size}")
            shards.append(shard["module"])
        full.update(gather_expert_state(shards))
    return full
