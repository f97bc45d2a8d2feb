"""The optimizer side of a run: AdamW parameter groups (decay / no decay / expert groups for ZeRO), AdamW with
BF16 moments (`precision.adam_moments_dtype=bf16`, as the DeepSeek-V3 report keeps them) and the client-
optimizer glue that hands it to `deepspeed.initialize`."""


from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from trainer.config import JobConfig


# ---- low-precision optimizer states ------------------------------------------------------------------
class BF16MomentsAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) that stores exp_avg and exp_avg_sq in BF16, as the
    DeepSeek-V3 report does; the update itself is computed in fp32 on the fp32 master weights. Halves the
    optimizer-state memory. torch's AdamW and DeepSpeed's FusedAdam keep moments in the parameter dtype."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m = state["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                update = (m / (1 - b1**t)).div_(denom)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer states (a check for the BF16-moments switch)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def client_optimizer(cfg: JobConfig) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer] | None:
    """AdamW with BF16 moments (`precision.adam_moments_dtype=bf16`) for `deepspeed.initialize`, or None
    (the config's AdamW). Weight decay comes from each parameter group."""
    if cfg.precision.adam_moments_dtype != "bf16":
        return None
    from trainer.optim import BF16MomentsAdamW

    o = cfg.optim

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return BF16MomentsAdamW(groups, lr=float(o.lr), betas=(float(o.betas[0]), float(o.betas[1])),
                                eps=float(o.eps), weight_decay=float(o.weight_decay))

    return make


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights and biases (vectors) are not decayed; the router bias is a buffer, never optimized."""
    return param.ndim < 2 or "norm" in name or name.endswith("bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """decay / no_decay groups; expert parameters marked by `mark_expert_params` (parallel/expert_groups.py,
    `allreduce=False`) go to their own groups with `moe: True` and `name` = their DeepSpeed expert group, as
    ZeRO expects."""
    decay, keep = [], []
    expert: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "allreduce", True) is False:  # deepspeed.moe.utils.is_moe_param
            expert.setdefault((p.group_name, no_decay(name, p)), []).append(p)
        else:
            (keep if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": keep, "weight_decay": 0.0, "name": "no_decay"}]
    groups += [{"params": ps, "weight_decay": 0.0 if nd else weight_decay, "name": group_name, "moe": True}
               for (group_name, nd), ps in expert.items()]
    return [g for g in groups if g["params"]]
