"""pipeline: training tokens/s, measured bubble and peak memory of five pipeline implementations, pp=2 on CPU.

The same model (tiny test config scaled up: hidden 128, 8 layers, MoE + MTP, seq 64), the same weights, the
same global batch (8 microbatches of 2 sequences), fp32, 2 gloo processes, AdamW (ZeRO-1 where DeepSpeed),
no clipping:

    ours_dualpipe     our runtime, DualPipe (W split, F&B pairs)         parallel/dualpipe_engine.py
    ours_dualpipev    our runtime, DualPipeV                               parallel/dualpipe_engine.py
    ds_1f1b           DeepSpeed PipelineModule / PipelineEngine (1F1B)     parallel/deepspeed_1f1b.py
    ds_dualpipev      DeepSpeed DualPipeVModule / DualPipeVEngine          parallel/deepspeed_1f1b.py
    torch_dualpipev   torch.distributed.pipelining ScheduleDualPipeV       below

All five run our model code with the full loss (LM + MTP + balance losses); the warm-up steps' losses of
every configuration are reported against ours as a check that they train the same function. DeepSpeed's
engines carry the token ids in the activation tuple; torch.distributed.pipelining passes one tensor between
stages, so its loss stage computes head, MTP and loss in `loss_fn` from the target tokens (rank 0 also holds
the embedding, so MTP reads the same table).

Both processes build all five configurations once (peak memory = growth of the RSS high-water mark over
build + warm-up, after a throwaway build has paid the one-time costs), then run the timed steps round-robin,
one step of each configuration at a time, the order rotating every round; medians are quoted.

Bubble: every implementation's compute calls are timed (ours: the runtime's timeline minus the time its ops
spent waiting for a receive; DeepSpeed: its ForwardPass/BackwardPass instructions; torch: the stage's
forward/backward/weight calls and loss_fn). bubble fraction = 1 - (busy time of the least-loaded rank) /
makespan, makespan from the first compute start to the last compute end of the step (one monotonic clock).

Simulator (parallel.simulate, same pp=2 instruction lists): predicted vs measured bubble with three cost
models built from the measured ops: one cost per op kind (F, B = input-grad + W, W, F&B: Table 2's terms),
the median per (rank, chunk, kind), and every op at its own measured duration. Projection to PP=8 and 16
(M = 4 PP, measured per-chunk costs, i.e. stages keep their size) for 1f1b, zb1p, dualpipe and dualpipev:
bubble fraction and throughput relative to 1F1B. `runtime_overhead` compares one chunk's F/B/W through our
Stage with plain autograd in one process. See docs/pipeline_bench.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import os
import re
import statistics
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from bench.common import RESULTS_DIR, result
from parallel.instructions import Instr, Kind, Placement
from parallel.spawn import run_ranks

if TYPE_CHECKING:
    from model.config import ModelConfig

PP, MICROBATCHES, MICRO, SEQ = 2, 8, 2, 64
STEPS_PER_REPEAT = 10  # timed steps of each configuration per repeat
WARMUP_STEPS = 2  # untimed, right after building (peak memory is taken over build + warmup)
TRACKED_STEP = WARMUP_STEPS  # one more untimed step, its tensors tracked (LiveTensorPeak)
LR, WD = 1e-3, 0.1
CONFIGS = ("ours_dualpipe", "ours_dualpipev", "ds_1f1b", "ds_dualpipev", "torch_dualpipev")
OURS = ("ours_dualpipe", "ours_dualpipev")
PROJECT_PP = (8, 16)
GOAL = "tokens/s: best of ours >= 1.1x DeepSpeed 1F1B and >= 1.0x DeepSpeed DualPipeV; simulator within 10%"


def bench_config() -> ModelConfig:
    from model.config import ModelConfig

    # the tiny test config (tests/conftest.py) scaled up so that compute, not Python, dominates
    return ModelConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=256,
        num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=64, num_experts_per_tok=2,
        n_group=4, topk_group=2, num_nextn_predict_layers=1, max_position_embeddings=128, name="bench-pipeline",
    )


def ds_config() -> dict:
    from trainer.ds_config import REDUCE_BUCKET_ELEMENTS  # the staging bucket the trainer configures

    return {
        "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": WD,
                                                   "torch_adam": True}},
        "zero_optimization": {"stage": 1, "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS}, "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
    }


def param_groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    keep = [p for p in model.parameters() if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": WD}, {"params": keep, "weight_decay": 0.0}) if g["params"]]


def make_batches(cfg, steps: int) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(11)
    width = SEQ + 1 + cfg.num_nextn_predict_layers
    return [[{"tokens": torch.randint(0, cfg.vocab_size, (MICRO, width), generator=g)} for _ in range(MICROBATCHES)]
            for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- memory

def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _status_kib(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def _resident_kib() -> int:
    """The RSS in KiB once freed heap pages are given back (what is still held). Linux only; elsewhere 0."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    return _status_kib("VmRSS")


class LiveTensorPeak:
    """The peak bytes of CPU tensors created inside the context and alive at once: what a step adds on top of the
    state it starts with, counted by tensor storage as a GPU's caching allocator counts allocated bytes (the RSS
    high-water mark adds the heap's fragmentation and freed pages malloc keeps). Storages of tensors that exist
    when it starts (parameters, optimizer states) are not counted when an op returns a view of them."""

    def __init__(self) -> None:
        import gc
        import weakref

        self.live = self.peak = 0
        self._seen: set[int] = set()
        self._mode = None
        for t in gc.get_objects():
            if _strided(t):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self._seen:  # forgotten when freed: malloc may reuse the address
                    self._seen.add(storage.data_ptr())
                    weakref.finalize(storage, self._seen.discard, storage.data_ptr())

    def _track(self, t: object) -> None:
        import weakref

        if not _strided(t) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self._seen or nbytes == 0:
            return
        self._seen.add(key)
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __enter__(self) -> LiveTensorPeak:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, tuple | list) else (out,):
                    tracker._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def _strided(t: object) -> bool:
    try:
        return isinstance(t, torch.Tensor) and t.layout == torch.strided
    except Exception:  # objects gc finds half-built
        return False


def _reset_peak() -> int:
    """Give freed heap pages back (so re-used memory counts again), reset the RSS high-water mark; the current
    RSS in KiB. Linux only; elsewhere the numbers are 0."""
    resident = _resident_kib()
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return resident


# ---------------------------------------------------------------------------------------------- runners

@dataclasses.dataclass
class Runner:
    """One configuration on this rank: `step(batches)` trains one global step; `record()` before it and
    `take()` after it give that step's timeline."""

    step: Any
    record: Any
    take: Any


class Op(NamedTuple):
    """A timed compute op; `busy` excludes the time it spent waiting for a receive."""

    rank: int
    start: float
    end: float
    label: str
    kind: str
    chunk: int
    busy: float


_WAITS: list[tuple[float, float]] = []  # this process's receive waits inside our runtime's compute ops


def _record_runtime_waits() -> None:
    """Our runtime waits for a receive inside the compute instruction that consumes it, so its timeline
    counts that wait as compute; time the waits (`_Pending.wait`) to take them out of the busy time."""
    from parallel import runtime

    wait = runtime._Pending.wait

    def timed_wait(self):
        start = time.perf_counter()
        try:
            return wait(self)
        finally:
            _WAITS.append((start, time.perf_counter()))

    runtime._Pending.wait = timed_wait


def _ops(events: list, waits: dict[int, list[tuple[float, float]]]) -> list[Op]:
    out = []
    for e in events:
        waited = sum(max(0.0, min(e.end, b) - max(e.start, a)) for a, b in waits.get(e.rank, ()))
        out.append(Op(e.rank, e.start, e.end, e.label, e.kind, e.chunk, e.end - e.start - waited))
    return out


def _spec(name: str, rank: int):
    from parallel.step_schedule import PipelineSpec
    from parallel.topology import PipelineTopology

    topo = PipelineTopology(pp=PP, dp=1, rank=rank, dualpipe=name == "dualpipe")
    topo.build_groups()
    return PipelineSpec(name=name, topo=topo, microbatches=MICROBATCHES, micro_batch_size=MICRO, seq_len=SEQ,
                        ds_config=ds_config())


def _ours(name: str, cfg, rank: int) -> Runner:
    from parallel.rank_model import build_rank_model
    from parallel.registry import build_step_schedule
    from trainer.load_balance import moe_routers, update_router_biases

    spec = _spec(name, rank)
    model = build_rank_model(cfg, spec)
    spec.param_groups = param_groups(model)
    sched = build_step_schedule(model, spec)
    routers = moe_routers(sched.module)

    def step(batches):
        out = sched.train_batch(iter(batches))
        update_router_biases(routers, group=sched.counts_group)
        return float(out.loss)

    return Runner(step, sched.record_next_step, sched.take_timeline)


def _deepspeed(name: str, cfg, rank: int) -> Runner:
    from bench.deepspeed_dualpipev import DeepSpeedDualPipeVSchedule, dualpipev_rank_model
    from parallel.deepspeed_1f1b import OneFOneBSchedule
    from parallel.rank_model import build_rank_model
    from trainer.load_balance import moe_routers, update_router_biases

    spec = _spec("1f1b", rank)  # DeepSpeed builds its own groups; the spec carries sizes and config
    if name == "1f1b":
        model, cls = build_rank_model(cfg, spec), OneFOneBSchedule
    else:
        model, cls = dualpipev_rank_model(cfg, spec), DeepSpeedDualPipeVSchedule
    spec.param_groups = param_groups(model)
    sched = cls(model, spec)
    routers = moe_routers(sched.module)

    def step(batches):
        out = sched.train_batch(iter(batches))
        update_router_biases(routers, group=sched.counts_group)
        return float(out.loss)

    return Runner(step, sched.record_next_step, sched.take_timeline)


class _TorchStage(torch.nn.Module):
    """One stage for torch.distributed.pipelining: token ids (first stage) or hidden state in, hidden state out.
    Balance losses of stages other than the loss stage are seeded in backward (SeedBalanceGrad); the loss
    stage's wait for loss_fn."""

    def __init__(self, embed, blocks: list, state, loss_stage: bool, loss_modules: list | None = None) -> None:
        super().__init__()
        self.embed, self.blocks = embed, torch.nn.ModuleList(blocks)
        self.state, self.loss_stage = state, loss_stage
        # what loss_fn uses (head, and the embedding table for MTP): registered here, unused in forward, because
        # torch's split backward computes weight gradients only for the stage module's parameters
        self.loss_modules = torch.nn.ModuleList(loss_modules or [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from model.transformer import MicroBatch
        from parallel.deepspeed_1f1b import SeedBalanceGrad

        if self.embed is not None:
            x = self.embed(None, MicroBatch(tokens=x, seq_len=SEQ))
        for block in self.blocks:
            mb = MicroBatch(tokens=x, seq_len=SEQ)  # blocks read no tokens
            x = block(x, mb)
            balance = mb.balance_losses.get(block.block.layer_idx)
            if balance is not None:
                if self.loss_stage:
                    self.state.pending_balance.append(balance)
                else:
                    self.state.balance.append(balance.detach())
                    x = SeedBalanceGrad.apply(x, balance, self.state)
        # torch detaches stage outputs in place after their backward, which a view (the seed's) refuses
        return x.clone() if x._base is not None else x


def _torch_dualpipev(cfg, rank: int) -> Runner:
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

    from model.transformer import MicroBatch
    from parallel.deepspeed_1f1b import RankState
    from parallel.rank_model import RankStages, build_stage_model

    stages_total = 2 * PP
    held = [rank, stages_total - 1 - rank]
    model = build_stage_model(cfg, RankStages(tuple(held), stages_total))
    state = RankState()
    # the head lives in loss_fn, outside every stage module, so torch's scale_grads (which divides the stage
    # modules' gradients by M) would miss it: scale the loss and the balance seeds by 1/M instead
    state.grad_scale = lambda: 1.0 / MICROBATCHES
    per = cfg.num_hidden_layers // stages_total
    modules = []
    for s in held:
        blocks = [model.layers[i] for i in range(s * per, (s + 1) * per)]
        loss_stage = s == stages_total - 1
        modules.append(_TorchStage(model.embed if s == 0 else None, blocks, state, loss_stage,
                                   [model.head, model.embed] if loss_stage else None))

    def loss_fn(h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        mb = MicroBatch(tokens=tokens, seq_len=SEQ)
        loss = model.head(h, mb)
        balance = [*state.pending_balance, *(mb.balance_losses[i] for i in sorted(mb.balance_losses))]
        state.pending_balance = []
        if balance:
            loss = loss + torch.stack(balance).sum()
        state.loss.append(loss.detach())
        return loss / MICROBATCHES

    # static shapes: torch would otherwise infer them by running each stage once on uninitialised tensors,
    # which would count garbage routing into the routers' step counts and leave a balance loss pending
    hidden = torch.empty(MICRO, SEQ, cfg.hidden_size, requires_grad=True)
    tokens = torch.zeros(MICRO, SEQ + 1 + cfg.num_nextn_predict_layers, dtype=torch.long)
    stages = [
        PipelineStage(m, s, stages_total, torch.device("cpu"), input_args=tokens if s == 0 else hidden,
                      output_args=hidden, input_grads=None if s == 0 else hidden,
                      output_grads=None if s == stages_total - 1 else hidden)
        for m, s in zip(modules, held)
    ]
    schedule = ScheduleDualPipeV(stages, n_microbatches=MICROBATCHES, loss_fn=loss_fn, scale_grads=False)
    opt = torch.optim.AdamW(param_groups(model), lr=LR, betas=(0.9, 0.95), eps=1e-8)
    events = _time_torch_schedule(schedule, stages, rank)

    def step(batches):
        opt.zero_grad(set_to_none=True)
        state.reset()
        tokens = torch.cat([b["tokens"] for b in batches])
        losses: list[torch.Tensor] = []
        if rank == 0:  # rank 0 holds the first and the loss stage
            schedule.step(tokens, target=tokens, losses=losses)
        else:
            schedule.step()
        opt.step()
        model.update_router_biases()  # every router lives on one rank (dp=1)
        # loss_fn's values hold the loss stage's balance losses; add the seeded ones of the other stages
        total = sum(float(v) for v in (*state.loss, *state.balance))
        loss = torch.tensor([total / MICROBATCHES], dtype=torch.float64)
        torch.distributed.all_reduce(loss)
        return float(loss)

    def take() -> list:
        taken = list(events)
        events.clear()
        return taken

    return Runner(step, events.clear, take)


def _time_torch_schedule(schedule, stages, rank: int) -> list:
    """Time the stage compute calls and loss_fn (torch waits for receives outside them)."""
    from parallel.runtime import TimelineEvent

    events: list[TimelineEvent] = []

    def wrap(obj, attr: str, kind: str, chunk: int, mb_arg: int = 0):
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            if attr == "_maybe_compute_loss" and not args[0].is_last:  # called after every forward
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            zb = ",zb" if kind == "B" and kwargs.get("full_backward") is False else ""
            label = f"{kind}{chunk}.{args[mb_arg]}{zb}"
            events.append(TimelineEvent(rank, start, time.perf_counter(), label, kind, chunk))
            return out

        setattr(obj, attr, timed)

    for chunk, stage in enumerate(stages):
        wrap(stage, "forward_one_chunk", "F", chunk)
        wrap(stage, "backward_one_chunk", "B", chunk)
        wrap(stage, "backward_weight_one_chunk", "W", chunk)
    # loss_fn (head, MTP, loss) runs outside the stage: (stage, output, targets, mb, kwargs)
    wrap(schedule, "_maybe_compute_loss", "F", 1, mb_arg=3)
    return events


def _build(name: str, cfg, rank: int) -> Runner:
    torch.manual_seed(0)  # the model seed: every configuration starts from the same weights
    if name.startswith("ours_"):
        return _ours(name.removeprefix("ours_"), cfg, rank)
    if name.startswith("ds_"):
        return _deepspeed(name.removeprefix("ds_"), cfg, rank)
    return _torch_dualpipev(cfg, rank)


# ---------------------------------------------------------------------------------------------- worker

def _quiet_deepspeed() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed.ops

    # DeepSpeed's CPU backend would JIT-compile a shared-memory op that only inference uses
    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _worker(rank: int, world: int, repeats: int) -> dict:
    import gc

    import torch.distributed as dist

    from parallel.trace import gather_timeline

    _quiet_deepspeed()
    _record_runtime_waits()
    cfg = bench_config()
    data = make_batches(cfg, TRACKED_STEP + 1 + repeats * STEPS_PER_REPEAT)
    with contextlib.redirect_stdout(io.StringIO()):
        # a throwaway configuration first: one-time costs (lazy imports, thread pools, gloo pair buffers) would
        # otherwise land on the memory figure of whichever configuration is built first
        _build("ours_dualpipev", cfg, rank).step(data[0])
    gc.collect()
    runners: dict[str, Runner] = {}
    memory_kib: dict[str, int] = {}
    # where it goes: held after the build (parameters, optimizer buffers made at build), held after the warm-up
    # steps (+ optimizer states, gradients), and the peak (+ what a step holds while it runs: activations)
    memory_parts_kib: dict[str, dict[str, int]] = {}
    first_losses: dict[str, list[float]] = {}
    for name in CONFIGS:
        base = _reset_peak()
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its partitioning on rank 0
            runners[name] = _build(name, cfg, rank)
        built = _resident_kib() - base
        first_losses[name] = [runners[name].step(data[s]) for s in range(WARMUP_STEPS)]
        memory_kib[name] = _status_kib("VmHWM") - base
        memory_parts_kib[name] = {"after_build": built, "after_steps": _resident_kib() - base,
                                  "peak": memory_kib[name]}
    for name in CONFIGS:  # after every RSS figure: the tracking itself allocates
        with LiveTensorPeak() as tracked, contextlib.redirect_stdout(io.StringIO()):
            runners[name].step(data[TRACKED_STEP])
        memory_parts_kib[name]["step_tensors"] = tracked.peak // 1024
    step_s: dict[str, list[float]] = defaultdict(list)
    timelines: dict[str, list] = defaultdict(list)
    # round-robin one step at a time, the order rotating every round: machine noise hits all alike
    for i in range(repeats * STEPS_PER_REPEAT):
        batches = data[TRACKED_STEP + 1 + i]
        for name in CONFIGS[i % len(CONFIGS):] + CONFIGS[: i % len(CONFIGS)]:
            runner = runners[name]
            runner.record()
            _WAITS.clear()
            dist.barrier()
            start = time.perf_counter()
            runner.step(batches)
            dist.barrier()
            step_s[name].append(time.perf_counter() - start)
            events = gather_timeline(runner.take())
            waits: list = [None] * world
            dist.all_gather_object(waits, list(_WAITS))
            if rank == 0:
                timelines[name].append(_ops(events, dict(enumerate(waits))))
    return {"memory_kib": memory_kib, "memory_parts_kib": memory_parts_kib, "first_losses": first_losses,
            "step_s": dict(step_s),
            "timelines": dict(timelines)}


# ---------------------------------------------------------------------------------------------- analysis

def bubble_fraction(ops: list[Op]) -> float:
    """1 - busy time of the least-loaded rank / makespan (first compute start to last compute end)."""
    busy: dict[int, float] = defaultdict(float)
    for e in ops:
        busy[e.rank] += e.busy
    makespan = max(e.end for e in ops) - min(e.start for e in ops)
    return 1.0 - min(busy[r] for r in range(PP)) / makespan


def op_costs(events: list) -> dict:
    """Per-op costs in seconds, in the simulator's terms: f, w, b = input-grad + w (a B with `,zb` in its label
    deferred its W), fb = pair + w likewise (f + b when nothing ran as a pair). Medians: on a shared machine
    a descheduled op is an outlier, not a cost."""
    kinds: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for e in events:
        kinds[e.kind].append((e.busy, ",zb" in e.label))

    def med(values) -> float:
        values = list(values)
        return statistics.median(values) if values else 0.0

    w, f = med(d for d, _ in kinds["W"]), med(d for d, _ in kinds["F"])
    b = med(d + (w if zb else 0.0) for d, zb in kinds["B"])
    fb = med(d + (w if zb else 0.0) for d, zb in kinds["FB"]) if kinds["FB"] else f + b
    return {"f": f, "b": b, "w": w, "fb": fb}


@dataclasses.dataclass(frozen=True)
class RankedInstr(Instr):
    """An instruction that knows its rank, so a cost model can tell ranks apart (str() is the runtime's label)."""

    rank: int = -1


def _tag_ranks(lists: list[list[Instr]]) -> list[list[RankedInstr]]:
    return [[RankedInstr(**{f.name: getattr(i, f.name) for f in dataclasses.fields(Instr)}, rank=r) for i in ops]
            for r, ops in enumerate(lists)]


def _lookup_costs(lookup, fallback):
    """A simulator Costs whose duration comes from `lookup(ranked instr)` (None: unknown). A pair that was not
    measured as a pair (DeepSpeed runs them as F then B) costs its two halves; anything else `fallback`."""
    from parallel.simulate import Costs

    class _LookupCosts(Costs):
        def duration(self, ins) -> float:
            d = lookup(ins)
            if d is None and ins.kind == Kind.FB:
                halves = (RankedInstr(Kind.F, ins.chunk, ins.mb, rank=ins.rank),
                          RankedInstr(Kind.B, ins.b_chunk, ins.b_mb, defer_w=ins.defer_w, rank=ins.rank))
                f, b = (lookup(h) for h in halves)
                d = None if f is None or b is None else f + b
            return fallback.duration(ins) if d is None else d

    return _LookupCosts()


def simulated_timeline(schedule: str, pp: int, m: int, costs, defer_w: bool = True, comm_latency: float = 0.0):
    """The simulator's Timeline of `schedule` under `costs` (instructions tagged with their rank);
    `comm_latency`: seconds from a send's post to its arrival."""
    from parallel.schedules import build_instructions
    from parallel.simulate import simulate

    return simulate(_tag_ranks(build_instructions(schedule, pp, m, defer_w=defer_w)), Placement(schedule, pp), costs,
                    comm_latency=comm_latency)


def simulated(schedule: str, pp: int, m: int, costs, defer_w: bool = True, comm_latency: float = 0.0) -> dict:
    """Bubble fraction and makespan of `simulated_timeline`."""
    tl = simulated_timeline(schedule, pp, m, costs, defer_w, comm_latency)
    return {"bubble_fraction": tl.bubble / tl.makespan, "makespan": tl.makespan}


def replayed_timeline(schedule: str, pp: int, m: int, durations: dict[tuple[int, str], float],
                      comm_latency: float = 0.0, defer_w: bool = True):
    """`simulated_timeline` with every op at its own measured duration: `durations[(pipe rank, label)]` in seconds,
    the label as the runtime prints the instruction (an op missing from it costs the median of its kind)."""
    from parallel.simulate import Costs

    by_kind: dict[str, list[float]] = defaultdict(list)
    for (_, label), d in durations.items():
        by_kind[re.match(r"[A-Z]+", label).group()].append(d)
    med = {k: statistics.median(v) for k, v in by_kind.items()}
    fallback = Costs(f=med.get("F", 0.0), b=med.get("B", 0.0), w=med.get("W", 0.0), fb=med.get("FB"))
    return simulated_timeline(schedule, pp, m, _lookup_costs(lambda i: durations.get((i.rank, str(i))), fallback),
                              defer_w, comm_latency)


def predictions(name: str, timelines: list[list[Op]]) -> dict:
    """Measured vs simulated bubble fraction of one pp=2 run (DeepSpeed's: full backwards, no pairs), with
    three cost models: one cost per op kind (the simulator's `Costs`, what the brief's F/B/W/F&B are), the
    median per (rank, chunk, kind) (captures the heavier embedding/head chunks), and every op of the step at
    its own measured duration (leaves only what the simulator does not model: latency, gaps between ops)."""
    from parallel.simulate import Costs

    schedule = {"ours_dualpipe": "dualpipe", "ours_dualpipev": "dualpipev", "ds_1f1b": "1f1b",
                "ds_dualpipev": "dualpipev"}[name]
    defer_w = name in OURS
    ops = [e for tl in timelines for e in tl]
    uniform = Costs(**op_costs(ops))
    samples: dict[tuple, list[float]] = defaultdict(list)
    for e in ops:
        samples[(e.rank, e.chunk, e.kind, ",zb" in e.label)].append(e.busy)
    per_rank = {k: statistics.median(v) for k, v in samples.items()}
    by_rank = _lookup_costs(lambda i: per_rank.get((i.rank, i.chunk, i.kind.value, i.defer_w)), uniform)
    replays = []
    for tl in timelines:
        table = {(e.rank, e.label): e.busy for e in tl}
        replays.append(simulated(schedule, PP, MICROBATCHES, _lookup_costs(lambda i, t=table: t.get((i.rank, str(i))),
                                                                             uniform), defer_w))
    measured = statistics.median(bubble_fraction(tl) for tl in timelines)
    predicted = {
        "op_kind_costs": simulated(schedule, PP, MICROBATCHES, uniform, defer_w)["bubble_fraction"],
        "rank_chunk_costs": simulated(schedule, PP, MICROBATCHES, by_rank, defer_w)["bubble_fraction"],
        "per_op_replay": statistics.median(r["bubble_fraction"] for r in replays),
    }
    return {
        "costs_ms": {"f": uniform.f * 1e3, "b": uniform.b * 1e3, "w": uniform.w * 1e3, "fb": uniform.pair * 1e3},
        "measured_bubble_fraction": measured,
        "predicted_bubble_fraction": predicted,
        "relative_error": {k: abs(v - measured) / measured for k, v in predicted.items()},
        "measured_makespan_ms": 1e3 * statistics.median(max(e.end for e in t) - min(e.start for e in t)
                                                        for t in timelines),
        "per_op_replay_makespan_ms": 1e3 * statistics.median(r["makespan"] for r in replays),
    }


def projections(costs: dict) -> dict:
    """PP=8 and 16 from the measured dualpipev per-chunk costs (a dualpipe / 1F1B stage = two chunks)."""
    from parallel.simulate import Costs

    c = costs
    chunk = Costs(c["f"], c["b"], c["w"], c["fb"])
    stage = Costs(2 * c["f"], 2 * c["b"], 2 * c["w"], 2 * c["fb"])
    out = {}
    for pp in PROJECT_PP:
        m = 4 * pp
        runs = {
            "1f1b": simulated("1f1b", pp, m, stage, defer_w=False),
            "zb1p": simulated("zb1p", pp, m, stage),
            "dualpipe": simulated("dualpipe", pp, m, stage),
            "dualpipev": simulated("dualpipev", pp, m, chunk),
        }
        base = runs["1f1b"]["makespan"]
        out[f"pp{pp}_m{m}"] = {k: {"bubble_fraction": round(v["bubble_fraction"], 4),
                                   "throughput_vs_1f1b": round(base / v["makespan"], 4)} for k, v in runs.items()}
    return out


def runtime_overhead(repeats: int) -> dict:
    """Single process, one chunk of the bench model (two MoE blocks), one microbatch: milliseconds of a plain
    autograd forward + backward vs our Stage (piece-by-piece forward with detached boundaries, backward piece
    by piece with the weight-gradient GEMMs deferred to W), medians of interleaved repeats. The difference is
    what our runtime pays per op, schedule aside."""
    from model.gemm import DEFAULT_BACKEND, defer_weight_grads, set_gemm_backend
    from model.transformer import DeepseekV3, MicroBatch
    from parallel.stages import Stage
    from parallel.weight_grad import WeightGradStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each bench rank runs
    try:
        cfg = bench_config()
        torch.manual_seed(0)
        model = DeepseekV3(cfg).train()
        num_stages = 2 * PP
        per = cfg.num_hidden_layers // num_stages
        pieces = list(model.layers[per:2 * per])  # stage 1: a middle stage, blocks only
        stage = Stage(pieces, 1, num_stages)
        store = WeightGradStore()
        g = torch.Generator().manual_seed(3)
        x = torch.randn(MICRO, SEQ, cfg.hidden_size, generator=g)
        grad = torch.randn(MICRO, SEQ, cfg.hidden_size, generator=g)
        tokens = torch.zeros(MICRO, SEQ + 2, dtype=torch.long)
        samples: dict[str, list[float]] = defaultdict(list)

        def plain() -> None:
            set_gemm_backend(model, DEFAULT_BACKEND)
            mb = MicroBatch(tokens=tokens, seq_len=SEQ)
            t0 = time.perf_counter()
            h = x.detach().requires_grad_()
            out = h
            for piece in pieces:
                out = piece(out, mb)
            t1 = time.perf_counter()
            balance = list(mb.balance_losses.values())
            torch.autograd.backward([out, *balance], [grad, *(torch.ones_like(b) for b in balance)])
            t2 = time.perf_counter()
            samples["plain_f"].append(t1 - t0)
            samples["plain_b"].append(t2 - t1)

        def ours() -> None:
            defer_weight_grads(model, store)
            mb = MicroBatch(tokens=tokens, seq_len=SEQ)
            t0 = time.perf_counter()
            stage.forward(x.detach().requires_grad_(), mb, 0)
            t1 = time.perf_counter()
            with store.capture(0):
                stage.backward(grad, 0, 1.0)
            t2 = time.perf_counter()
            store.pop()
            t3 = time.perf_counter()
            samples["ours_f"].append(t1 - t0)
            samples["ours_b_input"].append(t2 - t1)
            samples["ours_w"].append(t3 - t2)

        for i in range(repeats + 2):
            for fn in (plain, ours) if i % 2 else (ours, plain):
                model.zero_grad(set_to_none=True)
                fn()
        ms = {k: round(1e3 * statistics.median(v[2:]), 3) for k, v in samples.items()}  # 2 warm-ups
        ms["plain_fb"] = round(ms["plain_f"] + ms["plain_b"], 3)
        ms["ours_fbw"] = round(ms["ours_f"] + ms["ours_b_input"] + ms["ours_w"], 3)
        ms["ours_over_plain"] = round(ms["ours_fbw"] / ms["plain_fb"], 4)
        return ms
    finally:
        torch.set_num_threads(threads)


def _write_traces(timelines: dict[str, list[list[Op]]]) -> str:
    """The last timed step of every configuration as a Chrome trace (open in https://ui.perfetto.dev); a
    subfolder, since bench/__main__.py reads every results/*.json as a result."""
    from parallel.runtime import TimelineEvent
    from parallel.trace import write_chrome_trace

    out = RESULTS_DIR / "pipeline_traces"
    out.mkdir(parents=True, exist_ok=True)
    for name, steps in timelines.items():
        write_chrome_trace([TimelineEvent(*op[:6]) for op in steps[-1]], out / f"{name}.json")
    return str(out.relative_to(RESULTS_DIR.parent.parent))


def run(repeats: int) -> dict:
    reports = run_ranks(PP, _worker, repeats, timeout=600.0, join_timeout=30.0)
    overhead = runtime_overhead(max(60, 30 * repeats))
    rank0 = reports[0]
    cfg = bench_config()
    tokens = MICROBATCHES * MICRO * SEQ  # per global step (dp = 1)
    configs: dict[str, dict] = {}
    for name in CONFIGS:
        step = statistics.median(rank0["step_s"][name])
        configs[name] = {
            "tokens_per_s": tokens / step,
            "step_s": step,
            "step_s_min": min(rank0["step_s"][name]),
            "measured_bubble_fraction": statistics.median(bubble_fraction(t) for t in rank0["timelines"][name]),
            "peak_memory_mib_per_rank": [round(r["memory_kib"][name] / 1024, 1) for r in reports],
            # RSS growth per rank held after the build, held after the warm-up steps, and at the peak; then the
            # peak of the tensors one later step creates (LiveTensorPeak)
            "memory_mib_per_rank": {part: [round(r["memory_parts_kib"][name][part] / 1024, 1) for r in reports]
                                    for part in ("after_build", "after_steps", "peak", "step_tensors")},
            "first_losses": rank0["first_losses"][name],
        }
    sims = {name: predictions(name, rank0["timelines"][name]) for name in (*OURS, "ds_1f1b", "ds_dualpipev")}
    traces = _write_traces(rank0["timelines"])
    v_costs = op_costs([e for tl in rank0["timelines"]["ours_dualpipev"] for e in tl])
    best = max(OURS, key=lambda n: configs[n]["tokens_per_s"])
    ours, peer = configs[best]["tokens_per_s"], configs["ds_1f1b"]["tokens_per_s"]
    # the warm-up steps' losses of every configuration against ours_dualpipev: the same function is trained
    ref = configs["ours_dualpipev"]["first_losses"]
    loss_spread = max(abs(a - b) / abs(b) for c in configs.values() for a, b in zip(c["first_losses"], ref))
    return result(
        "pipeline", ours, peer, "tokens/s", GOAL, repeats,
        best_ours=best,
        ratio_vs_ds_dualpipev=ours / configs["ds_dualpipev"]["tokens_per_s"],
        ratio_vs_torch_dualpipev=ours / configs["torch_dualpipev"]["tokens_per_s"],
        setup={"pp": PP, "dp": 1, "microbatches": MICROBATCHES, "micro_batch_size": MICRO, "seq_len": SEQ,
               "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts,
               "mtp": cfg.num_nextn_predict_layers, "dtype": "fp32",
               "timed_steps_per_config": repeats * STEPS_PER_REPEAT},
        warmup_loss_max_relative_spread=loss_spread,
        configs=configs,
        simulator=sims,
        projections=projections(v_costs),
        runtime_overhead_ms=overhead,
        traces=traces,
    )
