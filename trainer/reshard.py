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

from parallel.expert_shard import (
    is_expert_key,
    slice_expert_state,
)
from trainer.expert_files import expert_file

MODEL_FILE = "mp_rank_00_model_states.pt"
COPIED = ("model_config.json", "config.yaml", "meta.json")  # meta.json marks it complete; no optimizer/RNG


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
