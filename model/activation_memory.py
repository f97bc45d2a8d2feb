"""What a forward keeps for its backward: the bytes of the distinct tensors autograd saves, counted exactly.

A resident-set peak mixes this with transients (attention scores, logits) and the allocator's habits; the saved
tensors are what activation-memory levers (selective recompute, whole-block checkpointing) act on. A
checkpointed region's own saves go to the checkpoint's hooks, not to these, so they are not counted: what is
counted is what stays until the backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def kept_for_backward(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), bytes of the distinct storages autograd saved for the backward while fn ran)."""
    kept: dict[tuple[int, torch.dtype], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        kept[(storage.data_ptr(), t.dtype)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())
