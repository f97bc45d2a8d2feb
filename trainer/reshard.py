"""Expert-parallel checkpoints: the expert shards' files, reading them back, and resharding between ep sizes.

`python -m trainer.reshard CHECKPOINT OUT --ep N` writes OUT, a checkpoint of the same model weights for
`parallel.ep=N` (N=1: the full model, as an ep=1 run writes it).

Layout of a checkpoint written at ep > 1 (besides DeepSpeed's files, see trainer/checkpoint.py):

    mp_rank_00_model_states.pt      DeepSpeed (data-parallel rank 0): every replicated weight, and ep rank 0's
                                    experts (`...experts.*.weight` of shape [E/ep, ...])
    zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                    DeepSpeed: rank r's ZeRO-1 partition of the replicated parameters and of its
                                    expert-DP group's partition of its local experts (fp32 master + Adam moments)
    experts/ep_rank_<k>.pt          ours: {"ep_size", "ep_rank", "module": ep rank k's expert weights} (written by
                                    the first EP group's ranks; the other EP groups hold identical copies)
    experts/pipe_<p>_ep_rank_<k>.pt the same for pipeline rank p's stages (a pipeline run at ep > 1; mp_rank_<p>
                                    holds that pipeline rank's replicated weights; DualPipe's mirror ranks p and
                                    pp-1-p hold the same stages and write them once, under min(p, pp-1-p))

DeepSpeed's own MoE checkpoint files (`layer_*_expert_*_mp_rank_*_model_states.pt`, `expp_rank_*`) are written
only for its `deepspeed.moe.layer.MoE` modules, so the engine saves our model on its plain path and the experts
go to `experts/`. `load_module_state` (trainer/checkpoint.py) gathers them into the full model, so
export_hf, sampling and resharding read either kind of checkpoint. Resuming at the same ep restores everything
through DeepSpeed (the ZeRO partitions hold each rank's own experts). Optimizer states are NOT resharded:
a resharded checkpoint carries weights only (start a run from it with fresh optimizer states).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallel.ep import (
    ExpertShardRole,
    ep_layout,
    expert_shard_role,
    gather_expert_state,
    is_expert_key,
    slice_expert_state,
)

EXPERT_DIR = "experts"
MODEL_FILE = "mp_rank_00_model_states.pt"
COPIED = ("model_config.json", "config.yaml", "meta.json")  # meta.json marks it complete; no optimizer/RNG


def expert_file(ckpt: Path, ep_rank: int, pipe_rank: int | None = None) -> Path:
    prefix = "" if pipe_rank is None else f"pipe_{pipe_rank:02d}_"
    return ckpt / EXPERT_DIR / f"{prefix}ep_rank_{ep_rank:03d}.pt"


def _role(module: nn.Module) -> ExpertShardRole:
    """Which file this rank's experts go to, and whether it writes (see `parallel.ep.set_expert_shard_role`).
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
    shard = torch.load(path, map_location="cpu", weights_only=True)["module"]
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
            shard = torch.load(path, map_location="cpu", weights_only=True)
            if shard["ep_size"] != ep_size or shard["ep_rank"] != k:
                raise ValueError(f"{path}: holds ep rank {shard['ep_rank']} of {shard['ep_size']}, expected {k} "
                                 f"of {ep_size}")
            shards.append(shard["module"])
        full.update(gather_expert_state(shards))
    return full


def reshard(checkpoint: str | Path, out: str | Path, ep: int) -> Path:
    """Write `out`: the weights of `checkpoint` (any ep) laid out for ep=`ep`. Weights only (see module doc)."""
    from trainer.checkpoint import load_module_state, resolve_checkpoint

    src = resolve_checkpoint(checkpoint)
    full, _ = load_module_state(src)
    dst = Path(out)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose a new directory")
    dst.mkdir(parents=True)
    meta = torch.load(src / MODEL_FILE, map_location="cpu", weights_only=False)
    meta["module"] = slice_expert_state(full, 0, ep) if ep > 1 else full
    # DeepSpeed's optimizer/scheduler bookkeeping belongs to the old run's layout: drop it
    for key in ("optimizer", "lr_scheduler", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments"):
        meta.pop(key, None)
    torch.save(meta, dst / MODEL_FILE)
    if ep > 1:
        for k in range(ep):
            experts = {n: t for n, t in slice_expert_state(full, k, ep).items() if is_expert_key(n)}
            path = expert_file(dst, k)
            path.parent.mkdir(exist_ok=True)
            torch.save({"ep_size": ep, "ep_rank": k, "module": experts}, path)
    for name in COPIED:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    (dst / "resharded.json").write_text(json.dumps({"from": str(src), "ep": ep, "weights_only": True}) + "\n")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.reshard", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint directory (or a checkpoints directory: its latest)")
    parser.add_argument("out", help="the new checkpoint directory (must not exist)")
    parser.add_argument("--ep", type=int, required=True, help="expert-parallel size to lay the experts out for")
    args = parser.parse_args(argv)
    if args.ep < 1:
        parser.error(f"--ep must be >= 1, got {args.ep}")
    try:
        out = reshard(args.checkpoint, args.out, args.ep)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (ep={args.ep}, weights only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
