"""Expert-shard files of a format-1 checkpoint (DeepSpeed's per-layout files, written before the layout-free
state of trainer/elastic_state.py): under expert parallelism every rank's routed experts were saved beside
DeepSpeed's files as `experts/[pipe_<p>_]ep_rank_<k>.pt`. Read here only: restored when such a checkpoint
resumes on its own layout, gathered when it is exported. New checkpoints hold the experts in `state/`."""


from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from parallel.expert_shard import ep_layout, gather_expert_state, is_expert_key
from trainer.checkpoint_manifest import load_torch

EXPERT_DIR = "experts"


def expert_file(ckpt: Path, ep_rank: int, pipe_rank: int | None = None) -> Path:
    prefix = "" if pipe_rank is None else f"pipe_{pipe_rank:02d}_"
    return ckpt / EXPERT_DIR / f"{prefix}ep_rank_{ep_rank:03d}.pt"


def load_expert_shard(module: nn.Module, ckpt: Path) -> bool:
    """After `engine.load_checkpoint` of a format-1 checkpoint at ep > 1: DeepSpeed loaded mp_rank_<p>'s experts
    (ep rank 0's) into every rank's module; put this rank's own experts back from `experts/`. (The ZeRO-1 fp32
    masters and Adam moments of the experts come back correctly from the zero_pp_rank_* files.) The file is the
    one of this rank's ep rank whose experts are this rank's layers (a pipeline checkpoint has one file set per
    pipeline rank; DualPipe's mirror ranks share one). Returns whether anything was loaded."""
    layout = ep_layout(module)
    if layout is None:
        return False
    ep_rank, ep_size = layout
    saved = checkpoint_ep_size(ckpt)
    if saved != ep_size:
        raise ValueError(f"{ckpt} was written at ep={saved}, this run has ep={ep_size}: an older checkpoint "
                         f"(DeepSpeed's per-layout files) resumes only with the ep it was written with")
    params = dict(module.named_parameters())
    mine = {n for n in params if is_expert_key(n)}
    for pipe in _pipe_ranks(ckpt):
        path = expert_file(ckpt, ep_rank, pipe)
        if not path.is_file():
            continue
        shard = load_torch(path, map_location="cpu", weights_only=True)["module"]
        if set(shard) == mine:
            with torch.no_grad():
                for name, value in shard.items():
                    params[name].copy_(value)
            return True
    raise FileNotFoundError(f"{ckpt}: no expert shard of ep rank {ep_rank} holds this rank's layers (written with "
                            f"another pipeline layout?); resume with the parallel settings the checkpoint was "
                            f"written with")


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
    """The full model's state of a format-1 checkpoint: `module_state` (the union of the mp_rank files, ep rank
    0's experts) with every expert weight replaced by all ep ranks' shards concatenated (per pipeline rank for a
    pipeline checkpoint). A checkpoint without `experts/` is returned as is."""
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
