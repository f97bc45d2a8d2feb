"""The pipeline schedule as data: per-rank instruction lists and where each stage lives.

A schedule generator (parallel/schedules.py) turns (schedule, pp, microbatches) into one list of `Instr` per
rank; the simulator (parallel/simulate.py) times those lists from per-op costs, and the runtime
(parallel/runtime.py) executes them with real tensors and point-to-point communication. All three agree on
the meaning below.

Chunks. A rank holds one or two model chunks (stages), addressed locally as chunk 0 and chunk 1:
- `1f1b`, `zb1p`: rank r holds stage r as chunk 0.
- `dualpipe` (pp even): chunk 0 is stage r of the downward pipeline (data flows rank r -> r+1), chunk 1 is
  stage pp-1-r of the upward pipeline (data flows rank r -> r-1). Microbatches 0 .. M/2-1 enter at rank 0
  and go down; microbatches M/2 .. M-1 enter at rank pp-1 and go up.
- `dualpipev`: chunk 0 is stage r (flows r -> r+1), chunk 1 is stage 2*pp-1-r (flows r -> r-1); at rank pp-1
  chunk 0's output feeds chunk 1 on the same rank without communication. Every microbatch enters at rank 0
  chunk 0 and its loss is computed at rank 0 chunk 1.

Microbatch ids are global (0 .. M-1). For each (rank, chunk) every microbatch that passes through it gets
exactly one F, one B (input-gradient, or full backward when `defer_w` is False) and, when its B deferred the
weight gradient, exactly one W. W instructions pop the oldest deferred weight-gradient work of the rank
(FIFO), so a W names the (chunk, mb) it is expected to pop as a check.

Communication. SEND_* / RECV_* post a non-blocking point-to-point op; a RECV's data is waited for by the
compute instruction that consumes it, a SEND's buffer is released by the end of the step. Consecutive
communication instructions form one batch (`batch_isend_irecv`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    F = "F"  # forward of (chunk, mb)
    B = "B"  # backward of (chunk, mb): input-gradient only when defer_w, else input- and weight-gradient
    W = "W"  # the deferred weight-gradient of (chunk, mb)
    FB = "FB"  # overlapped pair: forward of (chunk, mb) and backward of (b_chunk, b_mb)
    SEND_F = "SEND_F"  # send the activation produced by F(chunk, mb) to `peer`
    RECV_F = "RECV_F"  # receive the input activation of F(chunk, mb) from `peer`
    SEND_B = "SEND_B"  # send the input-gradient produced by B(chunk, mb) to `peer`
    RECV_B = "RECV_B"  # receive the output-gradient needed by B(chunk, mb) from `peer`
    REDUCE_GRADS = "REDUCE_GRADS"  # sum gradients across stage copies / data-parallel ranks
    STEP = "STEP"  # optimizer step


COMPUTE = frozenset({Kind.F, Kind.B, Kind.W, Kind.FB})
COMM = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})


@dataclass(frozen=True)
class Instr:
    kind: Kind
    chunk: int = -1
    mb: int = -1
    peer: int = -1  # communication only
    b_chunk: int = -1  # FB only: the backward half
    b_mb: int = -1
    defer_w: bool = False  # B and FB: queue the weight-gradient work for a later W

    def __str__(self) -> str:
        if self.kind == Kind.FB:
            return f"FB(F{self.chunk}.{self.mb},B{self.b_chunk}.{self.b_mb}{',zb' if self.defer_w else ''})"
        if self.kind in COMM:
            return f"{self.kind.value}({self.chunk}.{self.mb}<->{self.peer})"
        if self.kind in (Kind.REDUCE_GRADS, Kind.STEP):
            return self.kind.value
        return f"{self.kind.value}{self.chunk}.{self.mb}{',zb' if self.defer_w else ''}"


@dataclass(frozen=True)
class Placement:
    """Which stage each (rank, chunk) holds, and where its activations come from and go to."""

    schedule: str
    pp: int

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.schedule in ("dualpipe", "dualpipev") else 1

    @property
    def num_stages(self) -> int:
        return 2 * self.pp if self.schedule == "dualpipev" else self.pp

    def stage(self, rank: int, chunk: int) -> int:
        if chunk == 0:
            return rank
        if self.schedule == "dualpipe":
            return self.pp - 1 - rank
        return 2 * self.pp - 1 - rank  # dualpipev

    def direction(self, chunk: int) -> int:
        """+1 when chunk's activations flow to rank + 1, -1 when to rank - 1."""
        return 1 if chunk == 0 else -1

    def next_hop(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """(rank, chunk) that consumes the forward output of (rank, chunk); None for the last stage."""
        if self.schedule == "dualpipev":
            if chunk == 0:
                return (rank + 1, 0) if rank < self.pp - 1 else (rank, 1)
            return (rank - 1, 1) if rank > 0 else None
        nxt = rank + self.direction(chunk)
        return (nxt, chunk) if 0 <= nxt < self.pp else None

    def prev_hop(self, rank: int, chunk: int) -> tuple[int, int] | None:
        """(rank, chunk) whose forward output this (rank, chunk) consumes; None for the first stage."""
        if self.schedule == "dualpipev":
            if chunk == 1:
                return (rank + 1, 1) if rank < self.pp - 1 else (rank, 0)
            return (rank - 1, 0) if rank > 0 else None
        prv = rank - self.direction(chunk)
        return (prv, chunk) if 0 <= prv < self.pp else None

    def is_first_stage(self, rank: int, chunk: int) -> bool:
        return self.prev_hop(rank, chunk) is None

    def is_last_stage(self, rank: int, chunk: int) -> bool:
        return self.next_hop(rank, chunk) is None

    def chunk_of_mb(self, mb: int, microbatches: int) -> int:
        """For dualpipe: the direction (chunk index at its entry rank) a microbatch travels; else 0."""
        if self.schedule == "dualpipe":
            return 0 if mb < microbatches // 2 else 1
        return 0
