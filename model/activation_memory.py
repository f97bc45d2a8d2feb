"""What a forward keeps for its backward: the bytes of the distinct activation tensors autograd saves.

A resident-set peak mixes this with transients (attention scores, logits) and the allocator's habits; the saved
tensors are what activation-memory levers (selective recompute, whole-block checkpointing) act on. A
checkpointed region's own saves go to the checkpoint's hooks, not to these, so they are not counted: what is
counted is what stays until the backward. Parameters are left out: a linear layer saves its weight, but the
weight exists whatever the backward needs (and a checkpointed region would hide it from the count, which would
credit recompute with memory it does not free).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

# collectors of bytes kept outside autograd's saved tensors, for the counts in progress
_outside: list[Callable[[int], None]] = []


def note_kept_outside_autograd(nbytes: int) -> None:
    """Report bytes kept for the backward where saved-tensor hooks do not see them (a selective checkpoint's
    cache of the results it must keep); counted by any count in progress."""
    for collect in _outside:
        collect(nbytes)


class SavedTensorLedger:
    """Bytes kept for the backward by section: each storage counted once, by the first section that saves it
    (a tensor two pieces save, e.g. a block's output that the next block keeps too, is one allocation);
    parameters left out; selective-checkpoint caches counted in the section running when they are made.
    `classify(t)` may name a section for a saved tensor by what it is (e.g. vocabulary-wide logits), else
    the current section gets it.

        ledger = SavedTensorLedger(model.parameters())
        with ledger.recording():
            with ledger.section("layer0"): ...
        ledger.bytes  # {"layer0": ..., ...}
    """

    def __init__(self, params: Iterable[torch.Tensor] = (),
                 classify: Callable[[torch.Tensor], str | None] | None = None) -> None:
        self._skip = {p.untyped_storage().data_ptr() for p in params}
        self._seen: set[tuple[int, torch.dtype]] = set()
        self._classify = classify
        self._current = "other"
        self.bytes: dict[str, int] = defaultdict(int)
        self.autograd = 0  # of the total: saved tensors
        self.checkpoint_caches = 0  # of the total: selective-checkpoint caches

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.dtype)
        if key[0] not in self._skip and key not in self._seen:
            self._seen.add(key)
            name = (self._classify(t) if self._classify is not None else None) or self._current
            self.bytes[name] += storage.nbytes()
            self.autograd += storage.nbytes()
        return t

    def _outside(self, nbytes: int) -> None:
        self.bytes[self._current] += nbytes
        self.checkpoint_caches += nbytes

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedTensorLedger]:
        _outside.append(self._outside)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            _outside.remove(self._outside)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        previous, self._current = self._current, name
        try:
            yield
        finally:
            self._current = previous

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


def kept_for_backward(fn: Callable[[], Any], params: Iterable[torch.Tensor] = (),
                      breakdown: dict[str, int] | None = None) -> tuple[Any, int]:
    """(fn(), bytes of the distinct storages autograd saved for the backward while fn ran, those of `params`
    excluded (the saved tensor is an alias, not the Parameter itself, so storages are compared), plus what
    selective checkpoints keep in their caches). `breakdown`, if given, receives both parts."""
    ledger = SavedTensorLedger(params)
    with ledger.recording():
        out = fn()
    if breakdown is not None:
        breakdown.update(autograd=ledger.autograd, checkpoint_caches=ledger.checkpoint_caches)
    return out, ledger.total
