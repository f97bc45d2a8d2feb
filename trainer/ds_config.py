"""The DeepSpeed config, generated from the Hydra config (never written by hand), and the optimizer groups.

ZeRO-1 (optimizer states sharded over data-parallel ranks), AdamW with the report's betas and weight decay,
explicit gradient clipping (DeepSpeed would silently clip at 1.0 otherwise), bf16 with fp32 gradient
accumulation on GPU and plain fp32 on CPU. The LR schedule is a torch LambdaLR handed to
`deepspeed.initialize` (trainer/lr_schedule.py): DeepSpeed has no warmup-stable-decay schedule. The
`deepspeed:` section of the Hydra config is merged in last, for anything not covered here.
"""


from __future__ import annotations

import copy
from typing import Any

from trainer.config import JobConfig
from trainer.validate import Layout

NEVER = 2**31 - 1  # steps_per_print: the trainer logs, not DeepSpeed
# ZeRO-1/2's gradient staging bucket, in elements. DeepSpeed's default (5e8) allocates a 2 GB fp32 buffer per
# parameter group every step, even where nothing is staged in it (our pipeline schedules hand ZeRO-1 gradients
# already reduced); 5e7 is Megatron's order of magnitude (~40M-element buckets) and stays large enough for few
# collectives
REDUCE_BUCKET_ELEMENTS = 50_000_000


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_ds_config(cfg: JobConfig, layout: Layout) -> dict[str, Any]:
    o = cfg.optim
    torch_adam = o.torch_adam if o.torch_adam is not None else layout.device == "cpu"
    ds: dict[str, Any] = {
        # DeepSpeed counts a microbatch per rank of its data group (dp x cp): a CP rank's part-sequences count
        "train_batch_size": layout.global_batch_size * layout.cp,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": {"stage": cfg.parallel.zero_stage, "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": float(o.lr),
                "betas": [float(b) for b in o.betas],
                "eps": float(o.eps),
                "weight_decay": float(o.weight_decay),
                # torch's AdamW on CPU: DeepSpeed's fused CPU Adam would need a JIT C++ build
                "torch_adam": bool(torch_adam),
            },
        },
        "bf16": {"enabled": layout.dtype == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }
    if layout.dtype == "bf16":
        ds["data_types"] = {"grad_accum_dtype": cfg.precision.grad_accum_dtype}
    if cfg.precision.adam_moments_dtype == "bf16":
        # the optimizer is then a client optimizer (`client_optimizer`); ZeRO-1 shards it like its own
        del ds["optimizer"]
        ds["zero_allow_untested_optimizer"] = True
    return deep_merge(ds, dict(cfg.deepspeed))
