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

# collectors of kept_for_backward calls in progress: bytes kept outside autograd's saved tensors
_outside: list[list[int]] = []


def note_kept_outside_autograd(nbytes: int) -> None:
    """Report bytes kept for the backward where saved-tensor hooks do not see them (a selective checkpoint's
    cache of the results it must keep); counted by any kept_for_backward in progress."""
    for collector in _outside:
        collector.append(nbytes)


def kept_for_backward(fn: Callable[[], Any], params: Iterable[torch.Tensor] = (),
                      breakdown: dict[str, int] | None = None) -> tuple[Any, int]:
    """(fn(), bytes of the distinct storages autograd saved for the backward while fn ran, those of `params`
    excluded (the saved tensor is an alias, not the Parameter itself, so storages are compared), plus what
    selective checkpoints keep in their caches). `breakdown`, if given, receives both parts."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[tuple[int, torch.dtype], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[(storage.data_ptr(), t.dtype)] = storage.nbytes()
        return t

    outside: list[int] = []
    _outside.append(outside)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
    finally:
        _outside.remove(outside)
    if breakdown is not None:
        breakdown.update(autograd=sum(kept.values()), checkpoint_caches=sum(outside))
    return out, sum(kept.values()) + sum(outside)
