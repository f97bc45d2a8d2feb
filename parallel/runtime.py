"""Executes one rank's instruction list (parallel/instructions.py) with real tensors.

The runtime owns the mechanics the schedule leaves out: which tensor a RECV fills, when a posted receive is
waited for (by the compute that consumes it), the local hand-off between the two chunks of a DualPipeV rank,
the weight-gradient queue, loss scaling, and the per-rank timeline. It knows nothing of DeepSpeed: the
engine gives it the stages and handles REDUCE_GRADS / STEP through callbacks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from model.transformer import MicroBatch
from parallel.instructions import COMM, Instr, Kind, Placement
from parallel.network_model import timeline_now
from parallel.p2p import P2P, message_tag
from parallel.stages import Stage, run_pair, run_to_end
from parallel.weight_grad import WeightGradStore


@dataclass
class TimelineEvent:
    rank: int
    start: float
    end: float
    label: str
    kind: str
    chunk: int
    waited: float = 0.0  # seconds of this op spent blocked on incoming point-to-point data
    modelled: float = 0.0  # a modelled transfer (network model): its seconds alone on its link


# the timeline kind of what follows a pipeline step's last instruction on a rank: waiting for the gradient
# reduction, handing the gradients to the optimizer, its step and the loss reduction (`waited`: the wait)
STEP_TAIL = "step_tail"


@dataclass
class StepResult:
    """Per-microbatch losses seen on this rank (only ranks holding a last stage see LM/MTP losses)."""

    loss: dict[int, float] = field(default_factory=dict)  # lm + (lambda / D) * sum(mtp)
    lm_loss: dict[int, float] = field(default_factory=dict)
    mtp_losses: dict[int, list[float]] = field(default_factory=dict)
    balance_loss: dict[int, float] = field(default_factory=dict)  # this rank's blocks only


PrecisionContext = Callable[[int, int], contextlib.AbstractContextManager]


def no_context(chunk: int, mb: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class _Pending:
    buffer: torch.Tensor
    slot: list

    def wait(self) -> torch.Tensor:
        self.slot[0].wait()
        return self.buffer


def last_gradient_instructions(instrs: list[Instr]) -> dict[int, list[int]]:
    """{instruction index: chunks whose gradients are final after it}: a chunk's last B, W or the backward half
    of an FB (a deferred W comes after its B, so the last of them all is the one)."""
    last: dict[int, int] = {}
    for index, ins in enumerate(instrs):
        if ins.kind in (Kind.B, Kind.W):
            last[ins.chunk] = index
        elif ins.kind == Kind.FB:
            last[ins.b_chunk] = index
    out: dict[int, list[int]] = {}
    for chunk, index in sorted(last.items()):
        out.setdefault(index, []).append(chunk)
    return out


class GradientHooks(Protocol):
    """What the runtime tells a gradient reduction (parallel/grad_reduce.py) about a chunk's gradients."""

    def final_pass_begins(self, chunk: int, pending: list[torch.Tensor]) -> None:
        """The chunk's last gradient instruction is about to run: a W, or a B computing its weight-gradients
        inline. Every parameter of the chunk but `pending` (the weights it writes) has its final gradient now."""

    def weight_final(self, weight: torch.Tensor) -> None:
        """During that instruction: `weight`'s last gradient contribution of the step has been added (its last
        weight-gradient GEMM in a W; its piece's backward in a B)."""

    def chunk_done(self, chunk: int) -> None:
        """No later instruction of the step adds to the chunk's gradients."""


class PipelineRuntime:
    def __init__(
        self,
        placement: Placement,
        rank: int,
        stages: dict[int, Stage],
        p2p: P2P | None,
        store: WeightGradStore,
        activation_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        seq_len: int,
        precision_context: PrecisionContext = no_context,
        on_reduce_grads: Callable[[], None] | None = None,
        on_step: Callable[[], None] | None = None,
        record_timeline: bool = False,
        gradient_hooks: GradientHooks | None = None,
    ) -> None:
        self.placement, self.rank, self.stages, self.p2p, self.store = placement, rank, stages, p2p, store
        self.activation_shape, self.dtype, self.device, self.seq_len = activation_shape, dtype, device, seq_len
        self.precision_context = precision_context
        self.on_reduce_grads, self.on_step = on_reduce_grads, on_step
        # told when each chunk's gradients become final, so their reduction can start while the rank computes on
        self.gradient_hooks = gradient_hooks
        self.record_timeline = record_timeline
        self.timeline: list[TimelineEvent] = []

    # ---- step ----------------------------------------------------------------------------------------
    def run(self, instrs: list[Instr], batches: list[dict[str, torch.Tensor]], loss_scale: float) -> StepResult:
        """Run one training step's instructions; `batches[mb]` holds tokens (and loss_mask) of microbatch mb."""
        self._begin(batches, compute_loss=True)
        self.on_last_stage = None
        self.deferred = {(i.b_chunk, i.b_mb) if i.kind == Kind.FB else (i.chunk, i.mb)
                         for i in instrs if i.kind in (Kind.B, Kind.FB) and i.defer_w}
        self.loss_scale = loss_scale
        last_grads = last_gradient_instructions(instrs)
        for index, ins in enumerate(instrs):
            if ins.kind in COMM:
                self._post(ins)
                continue
            self._flush()
            if ins.kind == Kind.F:
                self._timed(ins, lambda ins=ins: run_to_end(self._forward(ins.chunk, ins.mb)))
            elif ins.kind == Kind.B:
                ends_chunk = ins.chunk in last_grads.get(index, ())
                self._timed(ins, lambda ins=ins, ends_chunk=ends_chunk: run_to_end(
                    self._backward(ins.chunk, ins.mb, ins.defer_w, ends_chunk)))
            elif ins.kind == Kind.FB:
                ends_chunk = ins.b_chunk in last_grads.get(index, ())
                self._timed(ins, lambda ins=ins, ends_chunk=ends_chunk: self._forward_backward(ins, ends_chunk))
            elif ins.kind == Kind.W:
                ends_chunk = ins.chunk in last_grads.get(index, ())
                self._timed(ins, lambda ins=ins, ends_chunk=ends_chunk: self._weight(ins, ends_chunk))
            elif ins.kind == Kind.REDUCE_GRADS:
                self._finish_comm()
                if self.on_reduce_grads is not None:
                    self.on_reduce_grads()
            elif ins.kind == Kind.STEP:
                if self.on_step is not None:
                    self.on_step()
            if self.gradient_hooks is not None:
                for chunk in last_grads.get(index, ()):
                    self.gradient_hooks.chunk_done(chunk)
        self._finish_comm()
        if len(self.store):
            raise RuntimeError(f"rank {self.rank}: {len(self.store)} weight-gradient groups were never run")
        return self.result

    def run_forward_only(
        self, instrs: list[Instr], batches: list[dict[str, torch.Tensor]],
        on_last_stage: Callable[[int, MicroBatch], None] | None = None,
    ) -> StepResult:
        """Evaluation: the forward and forward-communication part of a schedule, no graph kept.
        `on_last_stage(mb, ctx)` is called with each microbatch whose loss this rank computes (logits kept)."""
        self._begin(batches, compute_loss=True, keep_logits=on_last_stage is not None)
        self.on_last_stage = on_last_stage
        with torch.no_grad():
            for ins in instrs:
                if ins.kind in (Kind.RECV_F, Kind.SEND_F):
                    self._post(ins)
                elif ins.kind in (Kind.F, Kind.FB):
                    self._flush()
                    run_to_end(self._forward(ins.chunk, ins.mb))
                    self.stages[ins.chunk].drop(ins.mb)
        self._finish_comm()
        return self.result

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def _begin(self, batches: list[dict[str, torch.Tensor]], compute_loss: bool, keep_logits: bool = False) -> None:
        self.batches = batches
        self.mbs: dict[int, MicroBatch] = {}
        self.inputs: dict[tuple[int, int], torch.Tensor | _Pending] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.out_grads: dict[tuple[int, int], torch.Tensor | _Pending] = {}
        self.in_grads: dict[tuple[int, int], torch.Tensor] = {}
        self.compute_loss, self.keep_logits = compute_loss, keep_logits
        self.deferred: set[tuple[int, int]] = set()
        self._waited = 0.0
        self.result = StepResult()

    def _microbatch(self, mb: int) -> MicroBatch:
        if mb not in self.mbs:
            batch = self.batches[mb]
            self.mbs[mb] = MicroBatch.from_batch(batch, self.seq_len, self.device, compute_loss=self.compute_loss,
                                                 keep_logits=self.keep_logits)
        return self.mbs[mb]

    def _timed(self, ins: Instr, fn: Callable[[], None]) -> None:
        if not self.record_timeline:
            fn()
            return
        self._waited = 0.0
        start = timeline_now()
        fn()
        self.timeline.append(TimelineEvent(self.rank, start, timeline_now(), str(ins), ins.kind.value,
                                           ins.chunk, self._waited))

    def _wait(self, pending: _Pending) -> torch.Tensor:
        if not self.record_timeline:
            return pending.wait()
        start = timeline_now()
        out = pending.wait()
        self._waited += timeline_now() - start
        return out

    # ---- communication ---------------------------------------------------------------------------------
    def _post(self, ins: Instr) -> None:
        assert self.p2p is not None, "communication instruction on a single-rank pipeline"
        key = (ins.chunk, ins.mb)
        if ins.kind == Kind.RECV_F:
            buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
            self.inputs[key] = _Pending(buf, self.p2p.post_recv(buf, ins.peer, message_tag("F", ins.chunk, ins.mb)))
        elif ins.kind == Kind.RECV_B:
            buf = torch.empty(self.activation_shape, dtype=self.dtype, device=self.device)
            self.out_grads[key] = _Pending(buf, self.p2p.post_recv(buf, ins.peer, message_tag("B", ins.chunk, ins.mb)))
        elif ins.kind == Kind.SEND_F:
            _, consumer_chunk = self.placement.next_hop(self.rank, ins.chunk)
            out = self.outputs.pop(key).detach().contiguous()
            self.p2p.post_send(out, ins.peer, message_tag("F", consumer_chunk, ins.mb))
        elif ins.kind == Kind.SEND_B:
            _, producer_chunk = self.placement.prev_hop(self.rank, ins.chunk)
            grad = self.in_grads.pop(key).contiguous()
            self.p2p.post_send(grad, ins.peer, message_tag("B", producer_chunk, ins.mb))

    def _flush(self) -> None:
        if self.p2p is not None:
            self.p2p.flush()

    def _finish_comm(self) -> None:
        if self.p2p is not None:
            self.p2p.flush()
            self.p2p.wait_sends()

    # ---- compute ---------------------------------------------------------------------------------------
    def _stage_input(self, chunk: int, mb: int) -> torch.Tensor | None:
        prev = self.placement.prev_hop(self.rank, chunk)
        if prev is None:
            return None
        if prev[0] == self.rank:  # DualPipeV turn at the last rank: chunk 0 feeds chunk 1 locally
            return self.outputs.pop((prev[1], mb))
        x = self.inputs.pop((chunk, mb))
        return self._wait(x) if isinstance(x, _Pending) else x

    def _output_grad(self, chunk: int, mb: int) -> torch.Tensor | None:
        nxt = self.placement.next_hop(self.rank, chunk)
        if nxt is None:
            return None
        if nxt[0] == self.rank:
            return self.in_grads.pop((nxt[1], mb))
        g = self.out_grads.pop((chunk, mb))
        return self._wait(g) if isinstance(g, _Pending) else g

    def _forward(self, chunk: int, mb: int):
        """Generator: one step per piece of the stage; stores the output for a send or the loss."""
        stage, ctx = self.stages[chunk], self._microbatch(mb)
        x = self._stage_input(chunk, mb)
        before = set(ctx.balance_losses)
        steps = stage.forward_steps(x, ctx, mb)
        may_defer = (chunk, mb) in self.deferred
        while True:
            with self.precision_context(chunk, mb):
                self.store.forward_may_defer = may_defer
                try:
                    next(steps)
                except StopIteration as done:
                    out = done.value
                    break
                finally:
                    self.store.forward_may_defer = False
            yield
        own_balance = [ctx.balance_losses[i] for i in sorted(set(ctx.balance_losses) - before)]
        if own_balance:
            balance = float(sum(b.detach() for b in own_balance))
            self.result.balance_loss[mb] = self.result.balance_loss.get(mb, 0.0) + balance
        if stage.is_last:
            if out is not None:
                self.result.loss[mb] = float(out.detach())
                self.result.lm_loss[mb] = float(ctx.lm_loss.detach())
                self.result.mtp_losses[mb] = [float(m.detach()) for m in ctx.mtp_losses]
            if self.on_last_stage is not None:
                self.on_last_stage(mb, ctx)
        else:
            self.outputs[(chunk, mb)] = out

    def _backward(self, chunk: int, mb: int, defer_w: bool, ends_chunk: bool = False):
        """Generator: backward of (chunk, mb) piece by piece; input-gradient kept for a send or hand-off.
        `ends_chunk`: the chunk's last gradient work; with its weight-gradients inline (not deferred), each
        piece's parameters are reported final as soon as its backward is done."""
        grad = self._output_grad(chunk, mb)
        hooks = self.gradient_hooks if ends_chunk and not defer_w else None
        piece_done = None
        if hooks is not None:
            stage = self.stages[chunk]
            final_after = stage.final_after_piece()
            hooks.final_pass_begins(chunk, [p for ps in final_after.values() for p in ps])

            def piece_done(index: int) -> None:
                for p in final_after.get(index, ()):
                    hooks.weight_final(p)

        steps = self.stages[chunk].backward_steps(grad, mb, self.loss_scale, piece_done)
        # capture weight-gradients only while this backward's own steps run, not while the paired forward runs
        # between them (that forward must see the store as it would alone)
        group = self.store.open_group((chunk, mb)) if defer_w else None
        while True:
            with self.store.capturing_into(group) if group is not None else contextlib.nullcontext():
                try:
                    next(steps)
                except StopIteration as done:
                    in_grad = done.value
                    break
            yield
        if group is not None:
            self.store.close_group(group)
        if in_grad is not None:
            self.in_grads[(chunk, mb)] = in_grad

    def _forward_backward(self, ins: Instr, ends_chunk: bool = False) -> None:
        """The overlapped pair: the forward pieces of one microbatch alternate with the backward pieces of
        another (backward first), so communication posted by one (expert all-to-all) can hide behind the
        other's compute."""
        run_pair(self._backward(ins.b_chunk, ins.b_mb, ins.defer_w, ends_chunk), self._forward(ins.chunk, ins.mb))

    def _weight(self, ins: Instr, ends_chunk: bool = False) -> None:
        """Run the oldest W group; `ends_chunk`: the chunk's last gradient work, reported weight by weight."""
        hooks = self.gradient_hooks if ends_chunk else None
        if hooks is not None:
            hooks.final_pass_begins(ins.chunk, self.store.peek_weights())
        key = self.store.pop(on_final=hooks.weight_final if hooks is not None else None)
        if key != (ins.chunk, ins.mb):
            raise RuntimeError(f"rank {self.rank}: W expected {(ins.chunk, ins.mb)} but the queue held {key}")
