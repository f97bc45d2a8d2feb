"""Zero-bubble backward split: input-gradients now (B), weight-gradients later (W).

`model.gemm.defer_weight_grads(model, store)` makes every linear and grouped-expert GEMM compute the
input-gradient in backward and hand its weight-gradient GEMM to this `WeightGradStore` (run at once when the
store is not capturing). Everything else (norm weights, router, embedding) keeps ordinary autograd: those
gradients are cheap and computed in B. A W instruction pops the oldest captured group and runs it,
accumulating into `param.grad`.

With activation checkpointing the block is recomputed inside B; the closures keep the recomputed inputs alive
until W runs, which is the memory a zero-bubble schedule trades for its smaller bubble.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import contextmanager


class WeightGradStore:
    """FIFO of deferred weight-gradient groups; one group per deferred backward call."""

    def __init__(self) -> None:
        self.capturing = False
        # set by the runtime while it runs the forward of a microbatch whose backward will defer W: only those
        # forwards need the GEMMs that can defer; the others take the plain (faster) autograd path
        self.forward_may_defer = False
        self._pending: list[Callable[[], None]] = []
        self._queue: deque[tuple[object, list[Callable[[], None]]]] = deque()

    @contextmanager
    def capture(self, key: object):
        """Inside: weight-gradient work is queued instead of run; it becomes one group named `key`."""
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False
            self._queue.append((key, self._pending))
            self._pending = []

    @property
    def active(self) -> bool:
        return self.capturing or self.forward_may_defer

    # ---- a group filled over several separate stretches (a backward run piece by piece, interleaved with
    # another microbatch's forward): open it, capture into it step by step, close it
    def open_group(self, key: object) -> tuple[object, list[Callable[[], None]]]:
        return (key, [])

    @contextmanager
    def capturing_into(self, group: tuple[object, list[Callable[[], None]]]):
        saved, self._pending, self.capturing = self._pending, group[1], True
        try:
            yield
        finally:
            self._pending, self.capturing = saved, False

    def close_group(self, group: tuple[object, list[Callable[[], None]]]) -> None:
        self._queue.append(group)

    def defer_or_run(self, fn: Callable[[], None]) -> None:
        if self.capturing:
            self._pending.append(fn)
        else:
            fn()

    def pop(self, on_final: Callable[[object], None] | None = None) -> object:
        """Run the oldest group; returns its key (the schedule checks it is the one it expected).
        `on_final(weight)`: called once per weight the group writes (`model.gemm.WeightGradWork`), right after its
        last GEMM in the group, for a caller that knows no later group adds to it (its gradient is final)."""
        key, fns = self._queue.popleft()
        last = {id(w): i for i, w in enumerate(getattr(fn, "weight", None) for fn in fns) if w is not None}
        for i, fn in enumerate(fns):
            fn()
            weight = getattr(fn, "weight", None)
            if on_final is not None and weight is not None and last[id(weight)] == i:
                on_final(weight)
        return key

    def peek_weights(self) -> list[object]:
        """The weights the oldest group writes (`WeightGradWork.weight`), each once."""
        seen: dict[int, object] = {}
        for fn in self._queue[0][1] if self._queue else []:
            weight = getattr(fn, "weight", None)
            if weight is not None:
                seen.setdefault(id(weight), weight)
        return list(seen.values())

    def __len__(self) -> int:
        return len(self._queue)
