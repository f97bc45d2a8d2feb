"""The modelled interconnect applied at one seam: every `torch.distributed` transfer of this process.

`ModelledComm(net).install()` replaces the point-to-point and collective functions of `torch.distributed`
(the package names and the `distributed_c10d` module globals they are, plus the two that DeepSpeed's
`TorchBackend` caches at start-up), so ours (`parallel/p2p.py`, the EP all-to-alls) and DeepSpeed's own
(`deepspeed.comm` calls `torch.distributed.*` at call time: the pipeline engine's p2p, ZeRO-1's reductions) all
pass through it. Each call still does the real transfer; it is given the duration `NetworkModel` computes for
the link(s) it crosses and completes no earlier than its post time plus that duration:
- asynchronous calls (isend/irecv, `async_op=True`, `batch_isend_irecv`) return a `ModelledWork` whose wait()
  blocks for whatever is left of the duration;
- synchronous calls return once the real transfer is done and the duration has passed since the call.

Clocks: `WallClock` (valid while every rank has a core of its own) or `VirtualClock` (more processes than cores:
each rank's time is its thread's CPU time plus its modelled waits). On the virtual clock a transfer completes
at the latest post time of its participants, each on its own clock, plus its duration: every wrapped call also
sends this rank's post time (`_PostTimes`). On the wall clock, one machine's clock is every rank's, and a peer
that posts late is seen through the real transfer's wait.

Shared links (`NetworkModel.shared_links`): a rank's transfers in flight on one link type share it, and those of
one process group (one stream) run one at a time in post order (`_stream`). Approximations
(docs/expert_parallel.md): flows of different ranks through a switch do not contend; barriers are not modelled.

`stats` counts, per rank, the bytes this rank sent over each link type, the modelled seconds of its
transfers, and the seconds its waits were held by the model (the exposed modelled communication).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from parallel.network_model import Clock, ModelledWork, NetworkModel, SharedLink, WallClock, set_timeline_clock

P2P = ("isend", "irecv", "send", "recv")
ASYNC_P2P = ("isend", "irecv")
# collective -> (NetworkModel.ring_seconds kind, argument holding the full buffer)
RING = {
    "all_reduce": ("all_reduce", "tensor"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "_reduce_scatter_base": ("reduce_scatter", "input"),
    "reduce_scatter": ("reduce_scatter", "input_list"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),
    "_all_gather_base": ("all_gather", "output_tensor"),
    "all_gather": ("all_gather", "tensor_list"),
    "broadcast": ("broadcast", "tensor"),
    "reduce": ("reduce", "tensor"),
}
ALL_TO_ALL = ("all_to_all_single", "all_to_all")
WRAPPED = (*P2P, "batch_isend_irecv", *RING, *ALL_TO_ALL)
LINKS = ("intra_node", "inter_node")


def _nbytes(t: torch.Tensor | Sequence[torch.Tensor]) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(x.numel() * x.element_size() for x in t)


def _rows_bytes(t: torch.Tensor, splits: Sequence[int] | None, n: int) -> list[int]:
    """Bytes per peer of an all_to_all_single buffer: `splits` rows each, or an even split."""
    if not splits:  # None or []: an even split
        return [_nbytes(t) // n] * n
    row = t.element_size() * (t.numel() // t.shape[0] if t.shape[0] else 0)
    return [int(s) * row for s in splits]


@dataclass
class CommStats:
    sent_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINKS, 0))
    modelled_s: float = 0.0  # sum of this rank's modelled transfer durations
    blocked_s: float = 0.0  # seconds this rank's waits were held by the model
    transfers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"sent_bytes": dict(self.sent_bytes), "modelled_s": self.modelled_s, "blocked_s": self.blocked_s,
                "transfers": self.transfers}


class _PostTimes:
    """Virtual clock: a transfer completes at the latest of its participants' post times (each on its own clock)
    plus its duration, so each wrapped call also sends this rank's post time, on the real functions: a p2p
    message's on the same link with tag + STAMP_TAG, a collective's by an all-reduce (max) on its group. Returns
    a function giving that latest post time once the stamps have arrived."""

    STAMP_TAG = 1 << 20

    def __init__(self, real: dict[str, Callable]) -> None:
        self.real = real

    @staticmethod
    def _stamp(t: float) -> torch.Tensor:
        return torch.tensor([t], dtype=torch.float64)

    def op(self, op: dist.P2POp, posted: float) -> tuple[dist.P2POp, Callable[[Any], Callable[[], float]]]:
        """The stamp's P2POp for a batched op, and how to read it from that op's work."""
        stamp = self._stamp(posted)
        stamp_op = dist.P2POp(op.op, stamp, op.peer, op.group, op.tag + self.STAMP_TAG,
                              group_peer=op.group_peer if op.peer is None else None)
        if op.op.__name__ == "isend":
            return stamp_op, lambda work: _after(work, lambda: posted)
        return stamp_op, lambda work: _after(work, lambda: max(posted, stamp.item()))

    def share(self, name: str, args: dict[str, Any], posted: float, out: Any) -> float | Callable[[], float]:
        stamp = self._stamp(posted)
        group, tag = args.get("group"), args.get("tag", 0) + self.STAMP_TAG
        if name in ("isend", "send"):
            dst = {"dst": args.get("dst"), "group_dst": args.get("group_dst")}
            work = self.real[name](stamp, group=group, tag=tag, **dst)
            return _after(work, lambda: posted)
        if name in ("irecv", "recv"):
            src = {"src": args.get("src"), "group_src": args.get("group_src")}
            if name == "recv" and src["src"] is None and src["group_src"] is None:
                src = {"src": out, "group_src": None}  # from any source: the one it came from
            elif name == "irecv" and src["src"] is None and src["group_src"] is None:
                raise NotImplementedError("the virtual clock needs irecv's source rank (its post time travels from "
                                          "there); use the wall clock for receives from any source")
            work = self.real[name](stamp, group=group, tag=tag, **src)
            return _after(work, lambda: max(posted, stamp.item()))
        work = self.real["all_reduce"](stamp, op=dist.ReduceOp.MAX, group=group, async_op=True)
        return _after(work, lambda: stamp.item())


def _stream(group: Any, peer: int | None = None) -> tuple:
    """The stream a call's transfer runs on: its process group's (ProcessGroupNCCL queues a group's collectives
    on one CUDA stream, so they run in order), and for point-to-point the group's stream to that peer (global
    rank)."""
    return (group or dist.group.WORLD,) if peer is None else (group or dist.group.WORLD, "p2p", peer)


def _after(work: Any, value: Callable[[], float]) -> Callable[[], float]:
    """`value()` once `work` (a posted stamp transfer, or None for a synchronous one) is done."""
    def resolve() -> float:
        if work is not None and hasattr(work, "wait"):
            work.wait()
        return value()

    return resolve


class ModelledComm:
    """Installs the network model under torch.distributed for this process (one at a time); a context manager.
    `clock`: wall time by default (valid while each rank has a core of its own); tests inject a fake one."""

    _active: ModelledComm | None = None

    def __init__(self, net: NetworkModel, clock: Clock | None = None) -> None:
        self._timeline_clock: Callable[[], float] | None = None  # the one to restore on uninstall
        self._links: dict[str, SharedLink] = {}  # link type -> this rank's transfers in flight on it
        self.net, self.clock = net, clock or WallClock()
        self.virtual = bool(getattr(self.clock, "virtual", False))
        self.stats = CommStats()
        self._real: dict[str, Callable] = {}
        self._wrappers: dict[str, Callable] = {}
        self._stamps = _PostTimes(self._real)
        self._saved: list[tuple[Any, str, Any]] = []
        self._inside = threading.local()  # a wrapped call made by a wrapped call (batch -> isend) is not modelled

    # ---- durations -------------------------------------------------------------------------------------
    def _ranks(self, group: Any) -> list[int]:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)

    def _link(self, a: int, b: int) -> str:
        return LINKS[0] if self.net.same_node(a, b) else LINKS[1]

    def _peer(self, args: dict[str, Any], key: str) -> int | None:
        """The global rank of a p2p call's peer (`dst`/`src`, or `group_dst`/`group_src` within `group`)."""
        if args.get(key) is not None:
            return int(args[key])
        local = args.get(f"group_{key}")
        if local is None:
            return None  # recv from any source
        return dist.get_global_rank(args.get("group") or dist.group.WORLD, local)

    @staticmethod
    def _op_peer(op: dist.P2POp) -> int:
        if op.peer is not None:
            return op.peer
        return dist.get_global_rank(op.group or dist.group.WORLD, op.group_peer)

    def _p2p(self, name: str, tensor: torch.Tensor, peer: int | None) -> float:
        me, nbytes = dist.get_rank(), _nbytes(tensor)
        if peer is None:  # any source: the slower link
            return self.net.latency + nbytes / (self.net.inter_node_gbs * 1e9)
        if name in ("isend", "send") and peer != me:
            self.stats.sent_bytes[self._link(me, peer)] += nbytes
        return self.net.p2p_seconds(nbytes, me, peer)

    def seconds(self, name: str, args: dict[str, Any], result: Any = None) -> float:
        """The modelled duration of one call (its bound arguments; `result`: what the call returned), counting
        the bytes this rank sends."""
        me = dist.get_rank()
        if name in P2P:
            peer = self._peer(args, "dst" if name in ("isend", "send") else "src")
            if peer is None and name == "recv" and isinstance(result, int) and result >= 0:
                peer = result  # a receive from any source: the rank it came from
            return self._p2p(name, args["tensor"], peer)
        ranks = self._ranks(args.get("group"))
        if name in RING:
            kind, key = RING[name]
            nbytes = _nbytes(args[key])
            seconds = self.net.ring_seconds(kind, nbytes, ranks)
            if len(ranks) > 1:  # a ring member sends its share to the next member
                nxt = ranks[(ranks.index(me) + 1) % len(ranks)]
                passes = {"all_reduce": 2.0}.get(kind, 1.0) * (len(ranks) - 1) / len(ranks)
                share = 1.0 if kind in ("broadcast", "reduce") else passes
                self.stats.sent_bytes[self._link(me, nxt)] += int(share * nbytes)
            return seconds
        n = len(ranks)
        if name == "all_to_all_single":
            send = _rows_bytes(args["input"], args.get("input_split_sizes"), n)
            recv = _rows_bytes(args["output"], args.get("output_split_sizes"), n)
        else:
            send = [_nbytes(t) for t in args["input_tensor_list"]]
            recv = [_nbytes(t) for t in args["output_tensor_list"]]
        for peer, nbytes in zip(ranks, send, strict=True):
            if peer != me:
                self.stats.sent_bytes[self._link(me, peer)] += nbytes
        return self.net.all_to_all_seconds(me, ranks, send, recv)

    # ---- the wrappers ------------------------------------------------------------------------------------
    def _blocked(self, seconds: float) -> None:
        self.stats.blocked_s += seconds

    def _occupies(self, name: str, args: dict[str, Any]) -> str | None:
        """The link type this rank's side of the call sends on (None: it sends nothing, a receive). A collective
        that crosses nodes is paced by its inter-node link."""
        me = dist.get_rank()
        if name in P2P:
            if name in ("irecv", "recv"):
                return None
            peer = self._peer(args, "dst")
            return LINKS[1] if peer is None else self._link(me, peer)
        ranks = self._ranks(args.get("group"))
        if len(ranks) <= 1:
            return None
        return LINKS[1] if any(not self.net.same_node(me, r) for r in ranks) else LINKS[0]

    def _modelled(self, work: Any, seconds: float, posted: float | Callable[[], float], own_post: float,
                  link: str | None, stream: object = None) -> ModelledWork:
        """Transfers this rank has in flight on one link type share it (`SharedLink`, from its own post times):
        without that, a reduction cut into many buckets would take no longer than its largest bucket, and a
        reduction would not slow the all-to-alls beside it. Those of one `stream` go one at a time."""
        self.stats.modelled_s += seconds
        self.stats.transfers += 1
        not_before = None
        if link is not None and seconds > 0 and self.net.shared_links:
            shared = self._links.setdefault(link, SharedLink())
            flow = shared.post(own_post, seconds, stream)
            not_before = functools.partial(shared.done_at, flow)
        return ModelledWork(work, seconds, self.clock, posted=posted, on_block=self._blocked, not_before=not_before)

    def _wrap(self, name: str, real: Callable) -> Callable:
        signature = inspect.signature(real)

        @functools.wraps(real)
        def modelled(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._inside, "depth", 0):
                return real(*args, **kwargs)
            posted = self.clock.now()
            bound = signature.bind(*args, **kwargs).arguments
            stamps = self._stamps if self.virtual else None
            extra: list = []
            if name == "batch_isend_irecv" and stamps is not None:  # the post times travel in the same batch
                extra = [stamps.op(op, posted) for op in bound["p2p_op_list"]]
                args, kwargs = ([*bound["p2p_op_list"], *(e[0] for e in extra)],), {}
            self._inside.depth = 1
            try:
                out = real(*args, **kwargs)
                if name == "batch_isend_irecv":
                    ops = bound["p2p_op_list"]
                    works = list(out or [None] * (len(ops) + len(extra)))
                    return [self._modelled(work, self._p2p(op.op.__name__, op.tensor, self._op_peer(op)),
                                           extra[i][1](works[len(ops) + i]) if extra else posted, posted,
                                           self._occupies(op.op.__name__, {"dst": self._op_peer(op)}),
                                           _stream(op.group, self._op_peer(op)))
                            for i, (op, work) in enumerate(zip(ops, works[:len(ops)], strict=True))]
                seconds = self.seconds(name, bound, out)
                when = stamps.share(name, bound, posted, out) if stamps is not None else posted
            finally:
                self._inside.depth = 0
            peer = self._peer(bound, "dst" if name in ("isend", "send") else "src") if name in P2P else None
            work = self._modelled(out, seconds, when, posted, self._occupies(name, bound),
                                  _stream(bound.get("group"), peer))
            if name in ASYNC_P2P or bound.get("async_op"):
                return work
            work.work = None  # synchronous: the real transfer is done; hold the caller for the rest
            work.wait()
            return out

        return modelled

    def install(self) -> ModelledComm:
        if ModelledComm._active is not None:
            raise RuntimeError("a network model is already installed in this process")
        for name in WRAPPED:
            real = getattr(dist, name, None)
            if real is None:
                continue
            self._real[name] = real
            wrapper = self._wrappers[name] = self._wrap(name, real)
            for namespace in (dist, c10d):
                if getattr(namespace, name, None) is real:
                    self._saved.append((namespace, name, real))
                    setattr(namespace, name, wrapper)
        self._rebind_deepspeed()
        if self.virtual:
            self._timeline_clock = set_timeline_clock(self.clock.now)
        ModelledComm._active = self
        return self

    def _rebind_deepspeed(self) -> None:
        """DeepSpeed's TorchBackend keeps the all-gather / reduce-scatter functions it found at start-up."""
        try:
            from deepspeed.comm import comm as ds_comm
        except ImportError:
            return
        backend = getattr(ds_comm, "cdb", None)
        for attr in ("all_gather_function", "reduce_scatter_function"):
            real = getattr(backend, attr, None)
            name = getattr(real, "__name__", None)
            if real is not None and getattr(dist, name, real) is not real:
                self._saved.append((backend, attr, real))
                setattr(backend, attr, getattr(dist, name))

    def uninstall(self) -> None:
        for namespace, name, real in reversed(self._saved):
            setattr(namespace, name, real)
        self._saved.clear()
        # a DeepSpeed backend created while installed cached our wrappers: give it the real functions
        wrappers = {id(self._wrappers[name]): real for name, real in self._real.items()}
        try:
            from deepspeed.comm import comm as ds_comm
        except ImportError:
            ds_comm = None
        backend = getattr(ds_comm, "cdb", None)
        for attr in ("all_gather_function", "reduce_scatter_function"):
            if id(getattr(backend, attr, None)) in wrappers:
                setattr(backend, attr, wrappers[id(getattr(backend, attr))])
        if self._timeline_clock is not None:
            set_timeline_clock(self._timeline_clock)
            self._timeline_clock = None
        if ModelledComm._active is self:
            ModelledComm._active = None

    def align_clocks(self, group: Any = None) -> float:
        """Start a measured stretch together: on the virtual clock every rank's clock moves to the latest one
        (returned); on the wall clock this is a barrier and returns now."""
        latest = torch.tensor([self.clock.now()], dtype=torch.float64)
        self._real.get("all_reduce", dist.all_reduce)(latest, op=dist.ReduceOp.MAX, group=group)
        if self.virtual:
            self.clock.set(float(latest))
        return self.clock.now()

    def __enter__(self) -> ModelledComm:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


def active() -> ModelledComm | None:
    """The network model installed in this process, if any (its `stats` feed the step's metrics)."""
    return ModelledComm._active


class StepTraffic:
    """The installed model's counters per training step, as metric rows (docs/metrics.md); {} when none is
    installed. `begin_step()` and `end_step()` align the ranks' clocks (a real all-reduce: off the model), so that
    the step's time on the model's clock is the latest rank's end minus the common start."""

    def __init__(self) -> None:
        comm = active()
        self._last = comm.stats.as_dict() if comm is not None else None
        self._start: float | None = None
        self._end: float | None = None
        self._at_end: dict[str, Any] | None = None

    def begin_step(self) -> None:
        comm = active()
        self._start = comm.align_clocks() if comm is not None else None

    def end_step(self) -> None:
        comm = active()
        self._end = comm.align_clocks() if comm is not None else None
        self._at_end = comm.stats.as_dict() if comm is not None else None

    def step_metrics(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """The counters from the end of the previous step to the end of this one (rank 0's own, not totals);
        `extra`: the schedule's own figures (e.g. DualPipe's mirror-gradient sums), logged as `net_<key>`."""
        comm = active()
        if comm is None or self._at_end is None:
            return {}
        now = self._at_end
        last = self._last or CommStats().as_dict()
        self._last = now
        row = {"net_intra_node_bytes": now["sent_bytes"]["intra_node"] - last["sent_bytes"]["intra_node"],
               "net_inter_node_bytes": now["sent_bytes"]["inter_node"] - last["sent_bytes"]["inter_node"],
               "net_modelled_s": now["modelled_s"] - last["modelled_s"],
               "net_exposed_s": now["blocked_s"] - last["blocked_s"]}
        if self._start is not None and self._end is not None:
            row["net_step_time_s"] = self._end - self._start
        row.update({f"net_{key}": value for key, value in (extra or {}).items()})
        return row
