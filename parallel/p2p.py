"""Point-to-point transfers between pipeline ranks: batched, non-blocking, waited at the last moment.

Every transfer has a tag derived from (kind, chunk, microbatch), so two ranks that exchange activations and
gradients in both directions at once (DualPipe) never confuse one message for another on backends that match
by tag (gloo); on NCCL, which matches in order, the schedule's matching send/recv order guarantees the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_KIND_CODE = {"F": 0, "B": 1}


def message_tag(kind: str, chunk: int, mb: int) -> int:
    return (mb * 2 + chunk) * 2 + _KIND_CODE[kind]


@dataclass
class P2P:
    """Posts batches of isend/irecv on `group` (global ranks in `ranks`, indexed by pipeline rank)."""

    ranks: list[int]
    group: dist.ProcessGroup | None = None
    _batch: list[dist.P2POp] = field(default_factory=list)
    _send_handles: list = field(default_factory=list)

    def post_send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        self._batch.append(dist.P2POp(dist.isend, tensor, self.ranks[peer], self.group, tag))

    def post_recv(self, tensor: torch.Tensor, peer: int, tag: int) -> list:
        """Queue a receive; returns the list its handle will be put in when the batch is flushed."""
        slot: list = []
        self._batch.append(dist.P2POp(dist.irecv, tensor, self.ranks[peer], self.group, tag))
        self._batch[-1].slot = slot  # type: ignore[attr-defined]
        return slot

    def flush(self) -> None:
        """Issue the queued ops as one batch."""
        if not self._batch:
            return
        ops, self._batch = self._batch, []
        handles = dist.batch_isend_irecv(ops)
        for op, handle in zip(ops, handles):
            if op.op is dist.irecv:
                op.slot.append(handle)  # type: ignore[attr-defined]
            else:
                self._send_handles.append(handle)

    def wait_sends(self) -> None:
        for h in self._send_handles:
            h.wait()
        self._send_handles.clear()
