"""Pipeline schedules as per-rank instruction lists: 1F1B, ZB1P (ZB-H1), DualPipe and DualPipeV.

`build_instructions` is pure: it turns (schedule, pp, microbatches) into one list of `Instr` per rank, using the
chunk / microbatch / communication semantics of `parallel.instructions`. The DualPipe and DualPipeV orders
follow the reference design (deepseek-ai/DualPipe): eight phases per rank, see `_dualpipe`.
`verify_schedule` checks any such lists (pairing, deadlock freedom, counts, dependencies).

Bookkeeping (per-chunk counters, the W queue, which comm ops a hop needs) lives in `_RankBuilder`, so the
schedule functions read as the order of operations only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from parallel.instructions import COMM, COMPUTE, Instr, Kind, Placement

# the instruction generators (the simulator knows zb1p too; what the trainer runs is parallel/step_schedule.py)
INSTRUCTION_SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


class ScheduleError(ValueError):
    """A schedule that cannot be built from the given arguments (user error, one line)."""


def check_args(schedule: str, pp: int, microbatches: int) -> None:
    """Raise ScheduleError with one line naming the problem and the fix."""
    if schedule not in INSTRUCTION_SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(INSTRUCTION_SCHEDULES)}")
    if pp < 1:
        raise ScheduleError(f"pp={pp}: the pipeline needs at least one rank")
    if microbatches < 1:
        raise ScheduleError(f"microbatches={microbatches}: need at least one microbatch")
    if schedule == "dualpipe":
        if pp % 2:
            raise ScheduleError(f"dualpipe needs an even pp, got pp={pp}; use an even pp or dualpipev")
        if microbatches < 2 * pp or microbatches % 2:
            raise ScheduleError(
                f"dualpipe needs an even number of microbatches >= 2*pp={2 * pp}, got {microbatches}"
            )
    if schedule == "dualpipev" and microbatches < 2 * pp:
        raise ScheduleError(f"dualpipev needs microbatches >= 2*pp={2 * pp}, got {microbatches}")


def build_instructions(schedule: str, pp: int, microbatches: int, *, defer_w: bool = True) -> list[list[Instr]]:
    """One instruction list per rank. `defer_w=False`: same order, every B a full backward, no W."""
    check_args(schedule, pp, microbatches)
    placement = Placement(schedule, pp)
    lists = []
    for rank in range(pp):
        rb = _RankBuilder(placement, rank, microbatches, defer_w)
        if schedule in ("1f1b", "zb1p"):
            _one_f_one_b(rb, pp, microbatches, zero_bubble=schedule == "zb1p")
        else:
            _dualpipe(rb, pp, microbatches, v=schedule == "dualpipev")
        assert not rb.w_queue, f"rank {rank}: weight-gradient work left over: {list(rb.w_queue)}"
        rb.out += [Instr(Kind.REDUCE_GRADS), Instr(Kind.STEP)]
        lists.append(rb.out)
    return lists


# ----------------------------------------------------------------------------------------------- orders


def _one_f_one_b(rb: _RankBuilder, pp: int, m: int, zero_bubble: bool) -> None:
    """1F1B: warm up with pp-1-r forwards, alternate F/B, drain the backwards.

    ZB-H1 (zero_bubble): the same order with B split; rank r keeps r weight-gradients queued during the
    steady state and spends them (one after each B, then the rest) in the cooldown, where 1F1B idles.
    """
    r = rb.rank
    warmup = min(pp - 1 - r, m)
    for _ in range(warmup):
        rb.forward(0)
    for _ in range(m - warmup):
        rb.forward(0)
        rb.backward(0, zb=zero_bubble)
        if len(rb.w_queue) > r:
            rb.weight()
    for _ in range(warmup):
        rb.backward(0, zb=zero_bubble)
        if rb.w_queue:
            rb.weight()
    while rb.w_queue:
        rb.weight()


def _dualpipe(rb: _RankBuilder, pp: int, m: int, v: bool) -> None:
    """DualPipe (v=False) and DualPipeV (v=True): the reference's eight phases.

    Phase 0 is the direction that enters this rank first: for DualPipe ranks in the second half that is the
    upward pipeline (local chunk 1), so phases map to chunks by `^ flip`. `n` ranks form one arm of the V
    (pp/2 for DualPipe, pp for DualPipeV) and `h` is this rank's distance from the entry end; the rank at
    the turn (h == n-1: DualPipe's two middle ranks, DualPipeV's last rank) is special in phases 2 and 4.
    """
    r = rb.rank
    n = pp if v else pp // 2
    h = r if v else min(r, pp - 1 - r)
    per_dir = m if v else m // 2  # microbatches that enter through phase 0 on this rank
    flip = 0 if v else int(r >= pp // 2)
    p0, p1 = flip, 1 - flip  # local chunk of phase 0 / phase 1
    turn = h == n - 1

    # 1. nF0: fill the arm ahead with phase-0 forwards.
    for _ in range(2 * (n - h - 1)):
        rb.forward(p0)
    # 2. nF0F1: interleave forwards of both phases; the turn rank keeps its last F1 send for phase 4.
    rb.recv_f(p0)
    for i in range(h + 1):
        rb.forward(p0, recv=False, send=turn)
        rb.recv_f(p0)
        rb.forward(p1, send=not turn or i < h)
        if not turn:
            rb.send_f(p0)
    # 3. nB1W1F1: the first phase-1 backwards, with their W right away (zero bubble).
    for _ in range(n - h - 1):
        rb.backward(p1, zb=True)
        rb.recv_f(p1)
        rb.weight()
        rb.forward(p1, recv=False)
    # 4. main loop: overlapped pairs (F0,B1) and (F1,B0); the turn rank runs its first pair unoverlapped.
    for i in range(per_dir - 2 * n + h + 1):
        if i == 0 and turn:
            rb.forward(p0, recv=False, send=False)
            rb.send_f(p1)
            rb.backward(p1, send=False)
            rb.send_f(p0)
            rb.send_b(p1)
        else:
            rb.forward_backward(p0, p1, recv_f=i > 0)
        rb.forward_backward(p1, p0)
    # 5. nB1F1B0: the last phase-1 forwards.
    for _ in range(n - h - 1):
        rb.backward(p1)
        rb.forward_backward(p1, p0)
    # 6. nB1B0: drain both directions; from the middle of the phase on, backwards defer W.
    zb = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        rb.backward(p1, zb=zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        rb.backward(p0, zb=zb)
    # 7. nWB0: each W fills the wait for the next phase-0 output-gradient.
    for _ in range(n - h - 1):
        rb.weight()
        rb.backward(p0, zb=True)
    # 8. nW: the remaining weight-gradients.
    for _ in range(h + 1):
        rb.weight()


# ----------------------------------------------------------------------------------------------- mechanics


@dataclass
class _RankBuilder:
    """Appends one rank's instructions; tracks per-chunk progress like the reference's counters."""

    placement: Placement
    rank: int
    microbatches: int
    defer_w: bool
    out: list[Instr] = field(default_factory=list)
    w_queue: deque[tuple[int, int]] = field(default_factory=deque)
    # next index per chunk for each op kind: F, B, RECV_F, SEND_F, RECV_B, SEND_B
    count: dict[Kind, list[int]] = field(default_factory=dict)

    def _next_mb(self, kind: Kind, chunk: int) -> int:
        counters = self.count.setdefault(kind, [0, 0])
        mb = mb_base(self.placement, chunk, self.microbatches) + counters[chunk]
        counters[chunk] += 1
        return mb

    def _hop_rank(self, hop: tuple[int, int] | None) -> int | None:
        """The peer rank for a hop, or None when there is nothing to communicate (no hop, or local)."""
        return None if hop is None or hop[0] == self.rank else hop[0]

    def recv_f(self, chunk: int) -> None:
        peer = self._hop_rank(self.placement.prev_hop(self.rank, chunk))
        if peer is not None:
            self.out.append(Instr(Kind.RECV_F, chunk, self._next_mb(Kind.RECV_F, chunk), peer=peer))

    def send_f(self, chunk: int) -> None:
        peer = self._hop_rank(self.placement.next_hop(self.rank, chunk))
        if peer is not None:
            self.out.append(Instr(Kind.SEND_F, chunk, self._next_mb(Kind.SEND_F, chunk), peer=peer))

    def recv_b(self, chunk: int) -> None:
        peer = self._hop_rank(self.placement.next_hop(self.rank, chunk))
        if peer is not None:
            self.out.append(Instr(Kind.RECV_B, chunk, self._next_mb(Kind.RECV_B, chunk), peer=peer))

    def send_b(self, chunk: int) -> None:
        peer = self._hop_rank(self.placement.prev_hop(self.rank, chunk))
        if peer is not None:
            self.out.append(Instr(Kind.SEND_B, chunk, self._next_mb(Kind.SEND_B, chunk), peer=peer))

    def forward(self, chunk: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_f(chunk)
        self.out.append(Instr(Kind.F, chunk, self._next_mb(Kind.F, chunk)))
        if send:
            self.send_f(chunk)

    def backward(self, chunk: int, zb: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_b(chunk)
        mb = self._next_mb(Kind.B, chunk)
        defer = zb and self.defer_w
        if defer:
            self.w_queue.append((chunk, mb))
        self.out.append(Instr(Kind.B, chunk, mb, defer_w=defer))
        if send:
            self.send_b(chunk)

    def forward_backward(self, f_chunk: int, b_chunk: int, recv_f: bool = True) -> None:
        """Overlapped pair; its backward never defers W (as in the reference)."""
        if recv_f:
            self.recv_f(f_chunk)
        self.recv_b(b_chunk)
        f_mb = self._next_mb(Kind.F, f_chunk)
        b_mb = self._next_mb(Kind.B, b_chunk)
        self.out.append(Instr(Kind.FB, f_chunk, f_mb, b_chunk=b_chunk, b_mb=b_mb))
        self.send_f(f_chunk)
        self.send_b(b_chunk)

    def weight(self) -> None:
        """Pop the oldest deferred weight-gradient; nothing to do when W is not deferred."""
        if not self.defer_w:
            return
        if not self.w_queue:
            raise RuntimeError(f"rank {self.rank}: W with an empty weight-gradient queue")
        chunk, mb = self.w_queue.popleft()
        self.out.append(Instr(Kind.W, chunk, mb))


def mb_base(placement: Placement, chunk: int, microbatches: int) -> int:
    """First global microbatch id through `chunk`: DualPipe's upward chunk carries the second half."""
    return microbatches // 2 if placement.schedule == "dualpipe" and chunk == 1 else 0


def chunk_microbatches(placement: Placement, chunk: int, microbatches: int) -> range:
    """The global microbatch ids that pass through `chunk` on every rank."""
    if placement.schedule == "dualpipe":
        base = mb_base(placement, chunk, microbatches)
        return range(base, base + microbatches // 2)
    return range(microbatches)


# ----------------------------------------------------------------------------------------------- checker


def _fwd_parts(ins: Instr) -> list[tuple[int, int]]:
    if ins.kind == Kind.F or ins.kind == Kind.FB:
        return [(ins.chunk, ins.mb)]
    return []


def _bwd_parts(ins: Instr) -> list[tuple[int, int, bool]]:
    if ins.kind == Kind.B:
        return [(ins.chunk, ins.mb, ins.defer_w)]
    if ins.kind == Kind.FB:
        return [(ins.b_chunk, ins.b_mb, ins.defer_w)]
    return []


def verify_schedule(schedule: str, pp: int, microbatches: int, lists: list[list[Instr]]) -> None:
    """Assert that per-rank lists form a correct schedule; the AssertionError message says what is wrong.

    Checks: (a) every SEND meets exactly one matching RECV on its peer and vice versa; (c) each (rank, chunk)
    runs F and B once per microbatch, W once iff its B deferred W, and W pops the rank's FIFO queue;
    (d) B follows its F, a compute op's RECV comes before it (and the local producer at a local hand-off),
    SENDs follow the compute that produced their data; the last stage receives no output-gradient;
    (b) no deadlock: ranks run to completion when sends never block and a compute op waits until the peer
    has posted the SEND of each input it needs.
    """
    pl = Placement(schedule, pp)
    assert len(lists) == pp, f"expected {pp} rank lists, got {len(lists)}"
    _check_pairing(pl, lists)
    for rank, ops in enumerate(lists):
        _check_rank(pl, rank, microbatches, ops)
    _check_deadlock_free(pl, lists)


def _check_pairing(pl: Placement, lists: list[list[Instr]]) -> None:
    sends: dict[tuple, int] = {}  # (src, dst, kind, dst_chunk, mb) -> count
    recvs: dict[tuple, int] = {}
    for rank, ops in enumerate(lists):
        for i, ins in enumerate(ops):
            if ins.kind not in COMM:
                continue
            where = f"rank {rank} op {i} {ins}"
            assert 0 <= ins.peer < pl.pp and ins.peer != rank, f"{where}: bad peer"
            # a SEND_F follows the forward hop, a SEND_B runs it backwards; name each by its receiver
            hop = {
                Kind.SEND_F: pl.next_hop, Kind.RECV_B: pl.next_hop,
                Kind.RECV_F: pl.prev_hop, Kind.SEND_B: pl.prev_hop,
            }[ins.kind](rank, ins.chunk)
            assert hop is not None and hop[0] == ins.peer, f"{where}: peer is not the chunk's hop {hop}"
            if ins.kind in (Kind.SEND_F, Kind.SEND_B):
                key = (rank, ins.peer, ins.kind.value[-1], hop[1], ins.mb)
                sends[key] = sends.get(key, 0) + 1
            else:
                key = (ins.peer, rank, ins.kind.value[-1], ins.chunk, ins.mb)
                recvs[key] = recvs.get(key, 0) + 1
    for key in sends.keys() | recvs.keys():
        src, dst, d, chunk, mb = key
        ns, nr = sends.get(key, 0), recvs.get(key, 0)
        assert ns == 1 and nr == 1, (
            f"{d}-message mb {mb} rank {src} -> rank {dst} (receiver chunk {chunk}): {ns} SEND, {nr} RECV"
        )


def _check_rank(pl: Placement, rank: int, microbatches: int, ops: list[Instr]) -> None:
    done_f: set[tuple[int, int]] = set()
    done_b: set[tuple[int, int]] = set()
    recv_f: set[tuple[int, int]] = set()
    recv_b: set[tuple[int, int]] = set()
    w_queue: deque[tuple[int, int]] = deque()
    w_done: set[tuple[int, int]] = set()
    for i, ins in enumerate(ops):
        where = f"rank {rank} op {i} {ins}"
        if ins.kind in (Kind.REDUCE_GRADS, Kind.STEP):
            continue
        if ins.kind == Kind.RECV_F:
            recv_f.add((ins.chunk, ins.mb))
        elif ins.kind == Kind.RECV_B:
            assert not pl.is_last_stage(rank, ins.chunk), f"{where}: the last stage takes its gradient from the loss"
            recv_b.add((ins.chunk, ins.mb))
        elif ins.kind == Kind.SEND_F:
            assert (ins.chunk, ins.mb) in done_f, f"{where}: sent before its forward ran"
        elif ins.kind == Kind.SEND_B:
            assert (ins.chunk, ins.mb) in done_b, f"{where}: sent before its backward ran"
        elif ins.kind == Kind.W:
            assert w_queue, f"{where}: no deferred weight-gradient to pop"
            head = w_queue.popleft()
            assert head == (ins.chunk, ins.mb), f"{where}: the FIFO queue's oldest entry is {head}"
            w_done.add(head)
        for chunk, mb in _fwd_parts(ins):
            key = (chunk, mb)
            assert mb in chunk_microbatches(pl, chunk, microbatches), f"{where}: mb not routed through chunk"
            assert key not in done_f, f"{where}: forward twice"
            prev = pl.prev_hop(rank, chunk)
            if prev is not None and prev[0] == rank:
                assert (prev[1], mb) in done_f, f"{where}: local input from chunk {prev[1]} not computed yet"
            elif prev is not None:
                assert key in recv_f, f"{where}: no RECV_F posted before the forward"
            done_f.add(key)
        for chunk, mb, defer in _bwd_parts(ins):
            key = (chunk, mb)
            assert key in done_f, f"{where}: backward before its forward"
            assert key not in done_b, f"{where}: backward twice"
            nxt = pl.next_hop(rank, chunk)
            if nxt is not None and nxt[0] == rank:
                assert (nxt[1], mb) in done_b, f"{where}: local gradient from chunk {nxt[1]} not computed yet"
            elif nxt is not None:
                assert key in recv_b, f"{where}: no RECV_B posted before the backward"
            done_b.add(key)
            if defer:
                w_queue.append(key)
    assert not w_queue, f"rank {rank}: deferred weight-gradients never run: {list(w_queue)}"
    for chunk in range(pl.chunks_per_rank):
        want = {(chunk, mb) for mb in chunk_microbatches(pl, chunk, microbatches)}
        for name, got in (("F", done_f), ("B", done_b)):
            have = {k for k in got if k[0] == chunk}
            assert have == want, f"rank {rank} chunk {chunk}: {name} missing {sorted(want - have)[:4]}"
    extra = (recv_f - done_f) | (recv_b - done_b)
    assert not extra, f"rank {rank}: RECVs for ops that never run: {sorted(extra)[:4]}"
    assert ops[-2:] == [Instr(Kind.REDUCE_GRADS), Instr(Kind.STEP)], f"rank {rank}: must end REDUCE_GRADS, STEP"


def needed_sends(pl: Placement, rank: int, ins: Instr) -> list[tuple[int, str, int, int]]:
    """The remote SENDs a compute op waits for, as (src rank, 'F'|'B', src chunk, mb)."""
    need = []
    for chunk, mb in _fwd_parts(ins):
        prev = pl.prev_hop(rank, chunk)
        if prev is not None and prev[0] != rank:
            need.append((prev[0], "F", prev[1], mb))
    for chunk, mb, _ in _bwd_parts(ins):
        nxt = pl.next_hop(rank, chunk)
        if nxt is not None and nxt[0] != rank:
            need.append((nxt[0], "B", nxt[1], mb))
    return need


def _check_deadlock_free(pl: Placement, lists: list[list[Instr]]) -> None:
    posted: set[tuple[int, str, int, int]] = set()  # SENDs executed: (src rank, 'F'|'B', src chunk, mb)
    pos = [0] * len(lists)
    progress = True
    while progress:
        progress = False
        for rank, ops in enumerate(lists):
            while pos[rank] < len(ops):
                ins = ops[pos[rank]]
                if ins.kind in COMPUTE and not all(s in posted for s in needed_sends(pl, rank, ins)):
                    break
                if ins.kind in (Kind.SEND_F, Kind.SEND_B):
                    posted.add((rank, ins.kind.value[-1], ins.chunk, ins.mb))
                pos[rank] += 1
                progress = True
    stuck = [f"rank {r} at op {pos[r]} {ops[pos[r]]}" for r, ops in enumerate(lists) if pos[r] < len(ops)]
    assert not stuck, "deadlock: " + "; ".join(stuck)


def format_schedule(lists: list[list[Instr]], compute_only: bool = False) -> str:
    """One line per rank, for docs and debugging."""
    lines = []
    for rank, ops in enumerate(lists):
        shown = [str(i) for i in ops if not compute_only or i.kind in COMPUTE]
        lines.append(f"rank {rank}: " + " ".join(shown))
    return "\n".join(lines)
