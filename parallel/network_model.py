"""A modelled interconnect: how long a transfer would take on a GPU cluster's links, and a wait that honours it.

On a CPU box gloo moves bytes only when its thread gets a core, so measured communication describes the
machine (docs/expert_parallel.md). This module gives every transfer the duration it would have on the
report's cluster instead: latency + bytes / bandwidth of the link it crosses, NVLink-like inside a node,
InfiniBand-like across nodes (which ranks share a node: `ranks_per_node` consecutive global ranks, as a
launcher places them). A transfer posted at time t is complete no earlier than t + its duration; the real
transfer still runs underneath. A wait posted long enough before costs nothing, one that comes early blocks
for the remainder; the modelled time spends no CPU (a NIC or copy engine would spend none), so the clock's
`sleep` hands the core to the other ranks.

Collectives, per rank (the slowest rank decides when all are done, which the caller's wait provides):
- point-to-point: one message over the link between the two ranks;
- all-to-all: the bytes to same-node peers go over NVLink and those to other nodes over InfiniBand at the same
  time (separate engines), so it takes latency + the longer of the two;
- ring all-reduce / reduce-scatter / all-gather over n ranks: 2(n-1)/n, (n-1)/n and (n-1)/n of the buffer
  through the ring's slowest link (InfiniBand as soon as the group spans nodes); broadcast and reduce: the
  whole buffer once through that link (a pipelined chain).

Defaults are the DeepSeek-V3 report's H800 cluster: 400 Gb/s InfiniBand per GPU (50 GB/s), 160 GB/s NVLink,
8 GPUs per node. Clocks are injected (`WallClock` here; a fake one in tests) so the timing semantics are
tested without sleeping.

The seam that applies it to every transfer (ours and DeepSpeed's, under `deepspeed.comm`) is
parallel/modelled_comm.py; the Hydra switch is `parallel.network` (trainer/config.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

GB = 1e9


class NetworkModelError(ValueError):
    """An impossible network model (non-positive bandwidth, negative latency, ...): names the key."""


@dataclass(frozen=True)
class NetworkModel:
    latency_us: float = 5.0  # per message (and per collective step), microseconds
    intra_node_gbs: float = 160.0  # NVLink, GB/s per GPU
    inter_node_gbs: float = 50.0  # InfiniBand, GB/s per GPU (400 Gb/s)
    ranks_per_node: int = 8
    # a rank's transfers in flight on one link type share its bandwidth, one process group's transfers one at a time
    # (`SharedLink`); False: each transfer gets the whole link, as if it were alone (the model's first form:
    # flatters overlapping transfers)
    shared_links: bool = True

    def __post_init__(self) -> None:
        for key in ("intra_node_gbs", "inter_node_gbs"):
            if not getattr(self, key) > 0:
                raise NetworkModelError(f"{key}: a bandwidth must be positive, got {getattr(self, key)}")
        if not self.latency_us >= 0:
            raise NetworkModelError(f"latency_us: must be >= 0, got {self.latency_us}")
        if self.ranks_per_node < 1:
            raise NetworkModelError(f"ranks_per_node: must be >= 1, got {self.ranks_per_node}")

    @property
    def latency(self) -> float:
        return self.latency_us * 1e-6

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def same_node(self, a: int, b: int) -> bool:
        return self.node_of(a) == self.node_of(b)

    def bandwidth(self, a: int, b: int) -> float:
        """Bytes per second of the link between global ranks a and b."""
        return (self.intra_node_gbs if self.same_node(a, b) else self.inter_node_gbs) * GB

    def p2p_seconds(self, nbytes: int, src: int, dst: int) -> float:
        if src == dst:
            return 0.0
        return self.latency + nbytes / self.bandwidth(src, dst)

    def all_to_all_seconds(self, rank: int, peers: Sequence[int], send_bytes: Sequence[int],
                           recv_bytes: Sequence[int]) -> float:
        """One rank's all-to-all: `peers[i]` receives send_bytes[i] from it and sends it recv_bytes[i]. A GPU's
        link bandwidth is shared by all its peers of that link type, in each direction (full duplex); NVLink
        and InfiniBand run concurrently."""
        out = {True: 0, False: 0}  # same node? -> bytes sent
        inc = {True: 0, False: 0}
        for peer, sent, received in zip(peers, send_bytes, recv_bytes, strict=True):
            if peer != rank:  # to itself: a local copy
                out[self.same_node(rank, peer)] += sent
                inc[self.same_node(rank, peer)] += received
        if all(peer == rank for peer in peers):
            return 0.0  # nothing leaves the GPU (a message of 0 bytes to a peer still pays the latency)
        intra = max(out[True], inc[True]) / (self.intra_node_gbs * GB)
        inter = max(out[False], inc[False]) / (self.inter_node_gbs * GB)
        return self.latency + max(intra, inter)

    def ring_seconds(self, kind: str, nbytes: int, ranks: Sequence[int]) -> float:
        """A ring collective over `ranks` on a buffer of `nbytes` (all_reduce | reduce_scatter | all_gather), or a
        pipelined chain (broadcast | reduce: the whole buffer crosses each link once, in n-1 hops)."""
        passes = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0}
        chains = ("broadcast", "reduce")
        if kind not in passes and kind not in chains:
            raise NetworkModelError(f"kind: unknown collective {kind!r}; one of {sorted([*passes, *chains])}")
        n = len(ranks)
        if n <= 1:
            return 0.0
        share = 1.0 if kind in chains else passes[kind] * (n - 1) / n
        steps = (2 if kind == "all_reduce" else 1) * (n - 1)
        spans_nodes = len({self.node_of(r) for r in ranks}) > 1
        bw = (self.inter_node_gbs if spans_nodes else self.intra_node_gbs) * GB
        return steps * self.latency + share * nbytes / bw


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    """Wall time; a modelled wait sleeps (the core goes to other ranks, as a NIC would leave it)."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock:
    """A rank's virtual time, for layouts with more processes than cores: the CPU time of this thread (its compute;
    a rank waiting for its core, or blocked in a real transfer, spends none) plus the modelled time its waits
    added. `sleep` adds to it and returns at once. Set torch to one thread per rank so the compute runs here."""

    virtual = True

    def __init__(self, cpu_time: Callable[[], float] = time.thread_time) -> None:
        self._cpu_time, self._idle = cpu_time, 0.0

    def now(self) -> float:
        return self._cpu_time() + self._idle

    def sleep(self, seconds: float) -> None:
        self._idle += max(0.0, seconds)

    def set(self, t: float) -> None:
        """Move the clock to `t` (the ranks start a measured step at the same virtual time)."""
        self._idle += t - self.now()


class Flow:
    """One transfer on a `SharedLink`: the seconds it takes alone, what is left of them at the link's current
    time, and when it ended (None: still in flight or queued)."""

    __slots__ = ("seconds", "left", "done")

    def __init__(self, seconds: float) -> None:
        self.seconds, self.left, self.done = seconds, seconds, None

    def copy(self) -> Flow:
        twin = Flow(self.seconds)
        twin.left = self.left
        return twin

    @property
    def finished(self) -> bool:
        return self.left <= 1e-12 * max(1.0, self.seconds)


class SharedLink:
    """A rank's sending side of one link type. Transfers of one stream (a process group: ProcessGroupNCCL runs a
    group's collectives in order on one CUDA stream) go one at a time in post order; the streams with a transfer
    in flight share the link fairly, each at 1/k of its rate with k of them (processor sharing, the fluid model of
    flows on one NIC). A transfer's end is known once nothing more can be posted before it: a rank posts nothing
    while it waits, so at its wait."""

    def __init__(self) -> None:
        self.t: float | None = None  # the time `queues` are described at
        self.queues: dict[object, list[Flow]] = {}  # stream -> its transfers not done, the first one moving

    def post(self, at: float, seconds: float, stream: object = None) -> Flow:
        """A transfer posted at `at` (posts come in time order); `stream` None: a stream of its own."""
        if self.t is None or at > self.t:
            self.t = at if self.t is None else _drain(self.queues, self.t, until=at)
        flow = Flow(seconds)
        self.queues.setdefault(flow if stream is None else stream, []).append(flow)
        return flow

    def done_at(self, flow: Flow) -> float:
        """When `flow` ends, if nothing more is posted before then."""
        if flow.done is not None:
            return flow.done
        twins = {s: [f.copy() for f in q] for s, q in self.queues.items()}
        target = next(twin for s, q in self.queues.items() for f, twin in zip(q, twins[s]) if f is flow)
        return _drain(twins, self.t, stop=target)


def _drain(queues: dict[object, list[Flow]], t: float, until: float | None = None, stop: Flow | None = None) -> float:
    """Processor sharing among the queues' first transfers from time `t`, to `until` or until `stop` has ended;
    the transfers that end get their `done` time and leave their queues (empty queues are dropped). Returns the
    time reached."""
    while True:
        heads = [q[0] for q in queues.values() if q]
        if not heads:
            return t if until is None else max(t, until)
        step = min(f.left for f in heads)
        end = t + step * len(heads)
        if until is not None and end > until:
            for f in heads:
                f.left -= (until - t) / len(heads)
            return until
        t = end
        for key, queue in list(queues.items()):  # only a queue's first transfer moves, so only it can end
            head = queue[0]
            head.left -= step
            if head.finished:
                head.done = t
                queue.pop(0)
                if not queue:
                    del queues[key]
        if stop is not None and stop.done is not None:
            return t


class ModelledWork:
    """A posted transfer (a torch.distributed Work, or None for one already done) that completes no earlier than
    post time + its modelled duration (and `not_before`). wait() waits for the real transfer, then for what is
    left of the model's. `posted`: when the transfer was posted (default: now); `on_block(seconds)` hears of each
    modelled hold."""

    def __init__(self, work: Any, seconds: float, clock: Clock, posted: float | Callable[[], float] | None = None,
                 on_block: Callable[[float], None] | None = None,
                 not_before: Callable[[], float] | None = None) -> None:
        self.work, self.clock, self.on_block, self.seconds = work, clock, on_block, seconds
        # completes no earlier than this either (its link shared with other transfers): asked at each use, as a
        # transfer posted later on the same link may still slow it down until its wait
        self.not_before = not_before
        # `posted` may be a function: the virtual clock learns the latest post time of all participants only once
        # their timestamps have arrived (parallel/modelled_comm.py)
        self._posted: float | Callable[[], float] = clock.now() if posted is None else posted
        self.blocked = 0.0  # seconds the modelled remainder held the waiter (the exposed communication)

    @property
    def ready_at(self) -> float:
        if callable(self._posted):
            self._posted = self._posted()
        done = self._posted + self.seconds
        return done if self.not_before is None else max(done, self.not_before())

    def is_completed(self) -> bool:
        real = self.work is None or self.work.is_completed()
        return real and self.clock.now() >= self.ready_at

    def wait(self, *args: Any) -> bool:
        if self.work is not None:
            self.work.wait(*args)
        remaining = self.ready_at - self.clock.now()
        if remaining > 0:
            self.clock.sleep(remaining)
            self.blocked += remaining
            if self.on_block is not None:
                self.on_block(remaining)
        return True

    def __getattr__(self, name: str) -> Any:
        """Anything else a torch Work offers (get_future, exception, ...) is the real transfer's."""
        work = self.__dict__.get("work")
        if work is None:
            raise AttributeError(name)
        return getattr(work, name)


# ---- the clock measured timelines are stamped with -------------------------------------------------------
_timeline_clock: Callable[[], float] = time.perf_counter


def timeline_now() -> float:
    """Now, on the clock the step's timeline uses: `time.perf_counter()`, or the virtual clock while a network
    model on one is installed (parallel/modelled_comm.py), so recorded ops line up with the modelled waits."""
    return _timeline_clock()


def set_timeline_clock(clock: Callable[[], float]) -> Callable[[], float]:
    """Stamp timelines with `clock` from now on; returns the previous one (to restore)."""
    global _timeline_clock
    previous, _timeline_clock = _timeline_clock, clock
    return previous

