"""Gradient reduction in the pipeline's tail: a rank's gradients reduced bucket by bucket as they become final.

DualPipe / DualPipeV run their backward outside DeepSpeed's engine, so the engine's reduction would start only
after the last instruction, with nothing left to hide it behind. Here the runtime reports (parallel/runtime.py
`GradientHooks`) when a chunk's gradients are final; each of the chunk's buckets (consecutive parameters in
backward order, at least `bucket_bytes`, dense and expert parameters apart) is all-reduced asynchronously as soon
as all its parameters are, while the rank computes the other chunk. In the chunk's last W the buckets follow the
weight-gradient GEMMs one by one, so most of even the last chunk's reduction runs under that W.

One reduction does both jobs it replaces: DualPipe's mirror sum (the two copies of a stage) and the
data-parallel average (ZeRO-1's reduce), over the group of every rank holding a copy of the stage (the expert
parameters: the ranks holding the same expert shard). Gradients are divided by the data-parallel size first, as
ZeRO-1 does, and handed to its partitions already reduced (`parallel/zero_handoff.py`), so DeepSpeed keeps the
optimizer, its partitions, clipping and the step. Without ZeRO-1 (stage 0) the reduction covers the mirror sum
only and DeepSpeed reduces over the data ranks afterwards.

Buckets are posted in their list order on every rank (a bucket waits for the ones before it), so the ranks of a
group issue the same collectives in the same order even if their GEMMs finish in another order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.network_model import timeline_now
from parallel.runtime import TimelineEvent

BUCKET_BYTES = 4 * 2**20  # Megatron's and DDP's default range (DDP: 25 MB, Megatron: ~40 M elements per bucket)


@dataclass
class Bucket:
    params: list[torch.nn.Parameter]
    group: object  # None: no other rank holds these parameters
    flat: torch.Tensor | None = None
    work: object = None
    posted_at: float = 0.0


@dataclass
class ReducePlan:
    """What to reduce where. `chunks[c]`: chunk c's parameters in backward order (the last layer first), each
    with its group; `shared`: parameters several chunks write (a tied embedding), each with its group and the
    chunks that write it: reduced once all of those are done with it."""

    chunks: dict[int, list[tuple[torch.nn.Parameter, object]]]
    shared: list[tuple[torch.nn.Parameter, object, frozenset[int]]] = field(default_factory=list)
    divisor: int = 1  # the data-parallel size when this reduction averages over it (ZeRO-1 is handed the result)
    accum_dtype: torch.dtype | None = None  # reduce and hand over in this dtype, as `param.grad_accum` (ZeRO bf16)
    bucket_bytes: int = BUCKET_BYTES


SHARED = "shared"  # the bucket list of `ReducePlan.shared`


@dataclass
class ReduceTimes:
    """One step's reduction: modelled seconds of its collectives, and how long the step's end still waited for
    them (both 0 without a network model: `parallel.modelled_comm`)."""

    modelled_s: float = 0.0
    exposed_s: float = 0.0
    buckets: int = 0
    # (posted, waited until, label, modelled seconds of the bucket's all-reduce alone on its link)
    events: list[tuple[float, float, str, float]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The schedule's `last_reduce` (logged as `train/net_grad_reduce_*`)."""
        return {"grad_reduce_s": self.modelled_s, "grad_reduce_exposed_s": self.exposed_s}

    def timeline(self, rank: int) -> list[TimelineEvent]:
        """The recorded buckets as timeline events on the `grad_reduce` track."""
        return [TimelineEvent(rank, posted, end, label, "grad_reduce", -1, modelled=seconds)
                for posted, end, label, seconds in self.events]


def buckets_of(params: list[tuple[torch.nn.Parameter, object]], bucket_bytes: int) -> list[Bucket]:
    """Consecutive parameters of one group, cut once a bucket holds `bucket_bytes` (a group change cuts too)."""
    out: list[Bucket] = []
    size = 0
    for p, group in params:
        if not out or out[-1].group is not group or size >= bucket_bytes:
            out.append(Bucket([], group))
            size = 0
        out[-1].params.append(p)
        size += p.numel() * p.element_size()
    return out


class GradientReducer:
    """The runtime's `GradientHooks`: posts each bucket's all-reduce once its parameters are final; `finish()`
    waits for them all and writes the reduced gradients back."""

    def __init__(self, plan: ReducePlan, clock=None) -> None:
        self.plan = plan
        self.clock = clock or timeline_now
        self._template = {c: buckets_of(params, plan.bucket_bytes) for c, params in plan.chunks.items()}
        self._template[SHARED] = buckets_of([(p, group) for p, group, _ in plan.shared], plan.bucket_bytes)
        self._holders = {id(p): chunks for p, _, chunks in plan.shared}
        self.record = False
        self.begin_step()

    def begin_step(self) -> None:
        self._buckets = {c: [Bucket(b.params, b.group) for b in bs] for c, bs in self._template.items()}
        self._next = dict.fromkeys(self._buckets, 0)  # first bucket of each list not posted yet
        self._final: set[int] = set()  # ids of parameters whose gradients are final
        self._done: set[int] = set()  # chunks whose gradients are all final
        self._pass: tuple[int, set[int]] | None = None  # the chunk in its last W, and the weights it still writes

    # ---- GradientHooks -------------------------------------------------------------------------------
    def final_pass_begins(self, chunk: int, pending: list[torch.Tensor]) -> None:
        self._pass = (chunk, {id(w) for w in pending})
        self._final.update(id(p) for b in self._buckets[chunk] for p in b.params if id(p) not in self._pass[1])
        self._post_ready(chunk)

    def weight_final(self, weight: torch.Tensor) -> None:
        if self._pass is None:
            return
        self._pass[1].discard(id(weight))
        self._final.add(id(weight))
        self._post_ready(self._pass[0])

    def chunk_done(self, chunk: int) -> None:
        if chunk in self._done:
            raise RuntimeError(f"chunk {chunk}'s gradients reported final twice in one step")
        self._done.add(chunk)
        if self._pass is not None and self._pass[0] == chunk:
            self._pass = None
        self._post_ready(chunk, everything=True)

    # ---- posting and finishing -------------------------------------------------------------------------
    def _shared_final(self, p: torch.Tensor) -> bool:
        """Every chunk writing `p` is done, or in its last W and not writing `p` there."""
        return all(c in self._done or (self._pass is not None and self._pass[0] == c and id(p) not in self._pass[1])
                   for c in self._holders[id(p)])

    def _post_ready(self, chunk: int, everything: bool = False) -> None:
        for key, last in ((chunk, everything), (SHARED, False)):
            buckets = self._buckets.get(key, [])
            while self._next[key] < len(buckets):
                bucket = buckets[self._next[key]]
                ready = all(self._shared_final(p) if key == SHARED else id(p) in self._final for p in bucket.params)
                if not (last or ready):
                    break  # later buckets wait for this one: the same order on every rank of the group
                self._post(bucket)
                self._next[key] += 1

    @torch.no_grad()
    def _post(self, bucket: Bucket) -> None:
        dtype = self.plan.accum_dtype
        grads = [torch.zeros_like(p, dtype=dtype) if p.grad is None else p.grad.to(dtype or p.grad.dtype)
                 for p in bucket.params]
        bucket.flat = torch.cat([g.reshape(-1) for g in grads])
        if self.plan.divisor != 1:
            bucket.flat.div_(self.plan.divisor)  # before the sum, as ZeRO-1 averages
        bucket.posted_at = self.clock()
        # a group of one rank (an expert shard no other data replica holds) only needs the division
        bucket.work = None if bucket.group is None else dist.all_reduce(bucket.flat, group=bucket.group,
                                                                         async_op=True)

    @torch.no_grad()
    def finish(self) -> ReduceTimes:
        """Wait for every bucket and write the reduced gradients back: into `param.grad_accum` when an
        accumulation dtype is set (ZeRO reads it there), else into `param.grad`."""
        missing = set(self._buckets) - self._done - {SHARED}
        if missing:  # every copy of a stage must be summed, or the copies would drift apart
            raise RuntimeError(f"the gradients of chunks {sorted(missing)} were never reported final")
        for bucket in self._buckets[SHARED][self._next[SHARED]:]:  # a chunk this rank does not run (none today)
            self._post(bucket)
        times = ReduceTimes()
        for bucket in (b for bs in self._buckets.values() for b in bs):
            seconds = 0.0
            if bucket.work is not None:
                bucket.work.wait()
                seconds = getattr(bucket.work, "seconds", 0.0)
                times.modelled_s += seconds
                times.exposed_s += getattr(bucket.work, "blocked", 0.0)
            times.buckets += 1
            if self.record:
                times.events.append((bucket.posted_at, self.clock(), f"grad reduce ({len(bucket.params)} params)",
                                     seconds))
            offset = 0
            for p in bucket.params:
                n = p.numel()
                reduced = bucket.flat[offset : offset + n].view_as(p)
                offset += n
                if self.plan.accum_dtype is not None:
                    p.grad_accum = reduced
                elif p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
        self.begin_step()
        return times
