"""What a forward keeps for its backward: the bytes of the distinct activation tensors autograd saves.

A resident-set peak mixes this with transients (attention scores, logits) and the allocator's habits; the saved
tensors are what activation-memory levers (selective recompute, whole-block checkpointing) act on. A
checkpointed region's own saves go to the checkpoint's hooks, not to these, so they are not counted: what is
counted is what stays until the backward. Parameters are left out: a linear layer saves its weight, but the
weight exists whatever the backward needs (and a checkpointed region would hide it from the count, which would
credit recompute with memory it does not free).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def kept_for_backward(fn: Callable[[], Any], params: Iterable[torch.Tensor] = ()) -> tuple[Any, int]:
    """(fn(), bytes of the distinct storages autograd saved for the backward while fn ran, those of `params`
    excluded; the saved tensor is an alias, not the Parameter itself, so storages are compared)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[tuple[int, torch.dtype], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[(storage.data_ptr(), t.dtype)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())
