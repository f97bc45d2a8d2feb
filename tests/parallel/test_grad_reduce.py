"""The tail gradient reduction (parallel/grad_reduce.py): when the runtime says gradients are final they are, and
buckets are posted in one order, as soon as their parameters are final, divided and written back."""

from __future__ import annotations

import pytest
import torch

from model.gemm import WeightGradWork, defer_weight_grads
from model.transformer import DeepseekV3
from parallel.grad_reduce import GradientReducer, ReducePlan, buckets_of
from parallel.instructions import Kind, Placement
from parallel.runtime import PipelineRuntime, last_gradient_instructions
from parallel.schedules import build_instructions
from parallel.stages import build_stage, written_parameters
from parallel.weight_grad import WeightGradStore
from tests.conftest import tiny_config
from tests.parallel.pipeline_workers import MICRO, SEQ, make_batches


class Recorder:
    """GradientHooks that snapshot every gradient at the moment the last chunk writing it reports it final."""

    def __init__(self, stages) -> None:
        self.stages, self.calls, self.snapshots = stages, [], {}
        self.writers: dict[int, set[int]] = {}
        for chunk, stage in stages.items():
            for p in written_parameters(stage):
                self.writers.setdefault(id(p), set()).add(chunk)
        self.reported: dict[int, set[int]] = {}
        self.chunk = None

    def _report(self, p, chunk) -> None:
        done = self.reported.setdefault(id(p), set())
        assert chunk not in done, "reported final twice"
        done.add(chunk)
        if done == self.writers[id(p)]:
            self.snapshots[id(p)] = (p, None if p.grad is None else p.grad.clone())

    def final_pass_begins(self, chunk, pending):
        self.calls.append(("begin", chunk, len(pending)))
        self.chunk = chunk
        waiting = {id(w) for w in pending}
        for p in {id(p): p for p in written_parameters(self.stages[chunk])}.values():
            if id(p) not in waiting:
                self._report(p, chunk)

    def weight_final(self, weight):
        self.calls.append(("weight", None, 0))
        self._report(weight, self.chunk)

    def chunk_done(self, chunk):
        self.calls.append(("done", chunk, 0))


def test_gradients_reported_final_do_not_change():
    """DualPipeV on one rank (two chunks, deferred W): every parameter's gradient when its chunk's last W begins
    (the ones it does not write) or when its last GEMM there ran, or, in a last B computing its weight-gradients
    inline, when its piece's backward is done, equals the gradient at the step's end; the embedding, which both
    chunks write, once both have reported it."""
    cfg = tiny_config(num_hidden_layers=2, first_k_dense_replace=1)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    placement = Placement("dualpipev", 1)
    store = WeightGradStore()
    defer_weight_grads(model, store)
    stages = {c: build_stage(model, placement.stage(0, c), placement.num_stages) for c in range(2)}
    hooks = Recorder(stages)
    runtime = PipelineRuntime(placement, 0, stages, None, store, activation_shape=(MICRO, SEQ, cfg.hidden_size),
                              dtype=torch.float32, device=torch.device("cpu"), seq_len=SEQ, gradient_hooks=hooks)
    instrs = build_instructions("dualpipev", 1, 4, defer_w=True)[0]
    last = last_gradient_instructions(instrs)
    ends_in = {c: instrs[i] for i, chunks in last.items() for c in chunks}
    # chunk 0 ends with a W (reported weight by weight), chunk 1 with a B computing its W inline (piece by piece)
    assert ends_in[0].kind == Kind.W and ends_in[1].kind == Kind.B and not ends_in[1].defer_w
    runtime.run(instrs, make_batches(cfg, 4), loss_scale=0.25)

    assert [c for kind, c, _ in hooks.calls if kind == "begin"] == [1, 0]
    assert [c for kind, c, _ in hooks.calls if kind == "done"] == [1, 0]
    for chunk in (1, 0):
        begin = hooks.calls.index(next(call for call in hooks.calls if call[:2] == ("begin", chunk)))
        pending = hooks.calls[begin][2]
        assert pending > 0  # that instruction writes weights, each reported before the chunk is done
        assert hooks.calls[begin + 1 : begin + 1 + pending] == [("weight", None, 0)] * pending
        assert hooks.calls[begin + 1 + pending] == ("done", chunk, 0)
    # the B's parameters all pending at its start: every trainable one of the chunk, and the embedding its MTP
    # reads (reported final once both chunks writing it are)
    written = {id(p) for p in written_parameters(stages[1]) if p.requires_grad}
    assert hooks.calls[0][2] == len(written) > sum(p.requires_grad for p in stages[1].parameters())
    assert {id(p) for c in (0, 1) for p in stages[c].parameters()} <= set(hooks.snapshots)
    changed = [p.shape for p, g in hooks.snapshots.values() if g is not None and not torch.equal(g, p.grad)]
    assert not changed, changed
    assert any(p.grad is not None for p, _ in hooks.snapshots.values())


def _params(*shapes):
    return [torch.nn.Parameter(torch.zeros(s)) for s in shapes]


def test_buckets_cut_by_size_and_group():
    a, b, c, d = _params(4, 4, 4, 4)  # 16 bytes each
    g1, g2 = object(), object()
    buckets = buckets_of([(a, g1), (b, g1), (c, g1), (d, g2)], bucket_bytes=32)
    assert [[id(p) for p in bk.params] for bk in buckets] == [[id(a), id(b)], [id(c)], [id(d)]]
    assert [bk.group for bk in buckets] == [g1, g1, g2]


def test_buckets_post_in_order_as_their_parameters_become_final():
    """Local buckets (group None: division only) on a fake clock: a bucket waits for the ones before it."""
    a, b, c = _params(3, 3, 3)
    ticks = iter(range(100))
    reducer = GradientReducer(ReducePlan({0: [(a, None), (b, None), (c, None)]}, divisor=2, bucket_bytes=1),
                              clock=lambda: float(next(ticks)))
    for p, value in zip((a, b, c), (2.0, 4.0, 6.0)):
        p.grad = torch.full((3,), value)
    reducer.final_pass_begins(0, [a, b])  # c is final now, but waits for a and b
    assert [bk.work for bk in reducer._buckets[0]] == [None] * 3 and reducer._next[0] == 0
    reducer.weight_final(b)
    assert reducer._next[0] == 0
    reducer.weight_final(a)
    assert reducer._next[0] == 3
    assert [bk.posted_at for bk in reducer._buckets[0]] == [0.0, 1.0, 2.0]
    reducer.chunk_done(0)
    times = reducer.finish()
    assert times.buckets == 3 and times.modelled_s == 0.0
    assert [float(p.grad[0]) for p in (a, b, c)] == [1.0, 2.0, 3.0]  # divided by the data-parallel size


def test_shared_parameters_wait_for_every_chunk_writing_them():
    """A tied embedding written by chunks 0 and 1: posted once chunk 1 is done and chunk 0's last W has begun
    without writing it, before chunk 0 is done."""
    own0, own1, tied = _params(2, 2, 2)
    reducer = GradientReducer(ReducePlan({0: [(own0, None)], 1: [(own1, None)]},
                                         shared=[(tied, None, frozenset({0, 1}))], bucket_bytes=1))
    shared = reducer._buckets["shared"][0]
    reducer.final_pass_begins(0, [own0])
    assert shared.posted_at == 0.0 and reducer._next["shared"] == 0  # chunk 1 may still write it
    reducer.chunk_done(1)
    assert reducer._next["shared"] == 1 and reducer._next[0] == 0  # chunk 0's own bucket waits for its W
    reducer.weight_final(own0)
    reducer.chunk_done(0)
    assert reducer.finish().buckets == 3


def test_finish_refuses_an_unreported_chunk_and_writes_the_accumulation_dtype():
    a, b = _params(2, 2)
    reducer = GradientReducer(ReducePlan({0: [(a, None)], 1: [(b, None)]}, accum_dtype=torch.float64))
    a.grad, b.grad = torch.ones(2), None
    reducer.chunk_done(0)
    with pytest.raises(RuntimeError, match=r"chunks \[1\]"):
        reducer.finish()
    reducer.begin_step()
    reducer.chunk_done(0)
    reducer.chunk_done(1)
    with pytest.raises(RuntimeError, match="twice"):
        reducer.chunk_done(1)
    reducer.finish()
    assert a.grad_accum.dtype == torch.float64 and torch.equal(a.grad_accum, torch.ones(2, dtype=torch.float64))
    assert torch.equal(b.grad_accum, torch.zeros(2, dtype=torch.float64))  # no gradient: zeros, as ZeRO fills


def test_store_reports_each_weight_after_its_last_gemm():
    w1, w2 = _params(2, 2)
    store, order = WeightGradStore(), []
    with store.capture("g"):
        for w in (w1, w2, w1):
            store.defer_or_run(WeightGradWork(w, lambda: torch.ones(2)))
    assert [id(w) for w in store.peek_weights()] == [id(w1), id(w2)]
    store.pop(on_final=lambda w: order.append((id(w), float(w.grad[0]))))
    assert order == [(id(w2), 1.0), (id(w1), 2.0)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_autograd_finishes_each_parameter_once_per_backward(checkpointing):
    """What `schedule=none`'s overlapped reduction rests on (parallel/data_parallel.py): autograd accumulates each
    parameter's gradient once per backward, after every use (the embedding and head the MTP module shares
    included, and under activation checkpointing), so its gradient is final at that hook."""
    cfg = tiny_config(activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    fired: dict[int, int] = {}
    snapshots = {}

    def final(p):
        fired[id(p)] = fired.get(id(p), 0) + 1
        snapshots[id(p)] = p.grad.clone()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(final)
    batch = make_batches(cfg, 1)[0]
    from tests.parallel.pipeline_workers import forward

    forward(model, batch).loss.backward()
    assert set(fired.values()) == {1}
    used = [p for p in model.parameters() if p.grad is not None]
    assert len(fired) == len(used) > 0
    assert all(torch.equal(snapshots[id(p)], p.grad) for p in used)
