"""Schedule generator and checker: every valid schedule verifies, the orders follow the reference, and the
checker catches broken lists."""

from __future__ import annotations

from collections import Counter

import pytest

from parallel.instructions import COMM, Instr, Kind, Placement
from parallel.schedules import (
    ScheduleError,
    build_instructions,
    chunk_microbatches,
    verify_schedule,
)

CASES = (
    [("dualpipe", pp, m) for pp in (2, 4, 6, 8) for m in sorted({2 * pp, 2 * pp + 2, 3 * pp + (3 * pp) % 2})]
    + [("dualpipev", pp, m) for pp in (1, 2, 3, 4) for m in sorted({2 * pp, 2 * pp + 1, 3 * pp, 10})]
    + [(s, pp, m) for s in ("1f1b", "zb1p") for pp in (1, 2, 4) for m in sorted({1, pp, 2 * pp + 1})]
)


def compute_str(ops: list[Instr]) -> list[str]:
    return [str(i) for i in ops if i.kind in (Kind.F, Kind.B, Kind.W, Kind.FB)]


@pytest.mark.parametrize("defer_w", [True, False])
@pytest.mark.parametrize("schedule,pp,m", CASES)
def test_valid_schedules_verify(schedule: str, pp: int, m: int, defer_w: bool) -> None:
    lists = build_instructions(schedule, pp, m, defer_w=defer_w)
    verify_schedule(schedule, pp, m, lists)
    ops = [i for rank in lists for i in rank]
    if not defer_w:
        assert not any(i.kind == Kind.W or i.defer_w for i in ops)
    elif schedule != "1f1b" and pp > 1:
        assert any(i.kind == Kind.W for i in ops)


@pytest.mark.parametrize("schedule,pp,m", [("dualpipe", 4, 10), ("dualpipev", 3, 7), ("zb1p", 4, 9)])
def test_each_microbatch_once_per_chunk(schedule: str, pp: int, m: int) -> None:
    pl = Placement(schedule, pp)
    for ops in build_instructions(schedule, pp, m):
        for chunk in range(pl.chunks_per_rank):
            fs = Counter(i.mb for i in ops if i.kind in (Kind.F, Kind.FB) and i.chunk == chunk)
            bs = Counter(i.mb if i.kind == Kind.B else i.b_mb for i in ops
                         if (i.kind == Kind.B and i.chunk == chunk) or (i.kind == Kind.FB and i.b_chunk == chunk))
            want = Counter(chunk_microbatches(pl, chunk, m))
            assert fs == want and bs == want


@pytest.mark.parametrize("schedule,pp,m", [("dualpipe", 4, 10), ("dualpipev", 3, 7), ("zb1p", 4, 9)])
def test_defer_w_false_is_the_same_order(schedule: str, pp: int, m: int) -> None:
    deferred = build_instructions(schedule, pp, m, defer_w=True)
    full = build_instructions(schedule, pp, m, defer_w=False)
    for a, b in zip(deferred, full):
        stripped = [Instr(i.kind, i.chunk, i.mb, i.peer, i.b_chunk, i.b_mb) for i in a if i.kind != Kind.W]
        assert stripped == b


def test_dualpipe_pp4_phases_follow_reference() -> None:
    # pp=4, 8 microbatches: 0-3 go down (chunk 0), 4-7 go up (chunk 1). Rank 0: nF0 = 2, nF0F1 = 1,
    # nB1W1F1 = 1, main loop 1 iteration, nB1F1B0 = 1, nB1B0 = 1, nWB0 = 1, nW = 1.
    lists = build_instructions("dualpipe", 4, 8)
    assert compute_str(lists[0]) == [
        "F0.0", "F0.1", "F0.2", "F1.4", "B1.4,zb", "W1.4", "F1.5", "FB(F0.3,B1.5)", "FB(F1.6,B0.0)",
        "B1.6", "FB(F1.7,B0.1)", "B1.7", "B0.2,zb", "W0.2", "B0.3,zb", "W0.3",
    ]
    # rank 1 is a middle rank: nF0F1 = 2, then its first main-loop pair runs unoverlapped (F0 then B1);
    # in nB1B0 (odd half-rank) zero bubble starts with the second B1.
    assert compute_str(lists[1]) == [
        "F0.0", "F1.4", "F0.1", "F1.5", "F0.2", "B1.4", "FB(F1.6,B0.0)", "FB(F0.3,B1.5)", "FB(F1.7,B0.1)",
        "B1.6", "B0.2", "B1.7,zb", "B0.3,zb", "W1.7", "W0.3",
    ]
    # the second half mirrors the first: rank 3's phase 0 is the upward chunk 1
    assert compute_str(lists[3])[:9] == [
        "F1.4", "F1.5", "F1.6", "F0.0", "B0.0,zb", "W0.0", "F0.1", "FB(F1.7,B0.1)", "FB(F0.2,B1.4)",
    ]


def test_dualpipe_comm_placement_middle_rank() -> None:
    # rank 1 at pp=4: recvs are posted before the compute that needs them, sends right after the compute
    # that produced them, except that the middle rank holds its last nF0F1 send for the first main pair.
    ops = [str(i) for i in build_instructions("dualpipe", 4, 8)[1]]
    assert ops[:17] == [
        "RECV_F(0.0<->0)", "F0.0", "SEND_F(0.0<->2)", "RECV_F(0.1<->0)", "RECV_F(1.4<->2)", "F1.4",
        "SEND_F(1.4<->0)", "F0.1", "SEND_F(0.1<->2)", "RECV_F(0.2<->0)", "RECV_F(1.5<->2)", "F1.5",
        "F0.2", "SEND_F(1.5<->0)", "RECV_B(1.4<->0)", "B1.4", "SEND_F(0.2<->2)",
    ]
    assert ops[-2:] == ["REDUCE_GRADS", "STEP"]


def test_dualpipev_phases_and_local_turn() -> None:
    lists = build_instructions("dualpipev", 4, 8)
    # rank 0: nF0 = 2*(4-0-1) = 6 forwards of chunk 0 before its first chunk-1 forward
    assert compute_str(lists[0])[:8] == ["F0.0", "F0.1", "F0.2", "F0.3", "F0.4", "F0.5", "F0.6", "F1.0"]
    # last rank: alternate chunk 0 / chunk 1 forwards, then the unoverlapped first pair
    assert compute_str(lists[3])[:10] == [
        "F0.0", "F1.0", "F0.1", "F1.1", "F0.2", "F1.2", "F0.3", "F1.3", "F0.4", "B1.0",
    ]
    # the chunk 0 -> chunk 1 hand-off at rank pp-1 is local: no message either way
    turn = [i for i in lists[3] if i.kind in COMM]
    local = {(Kind.SEND_F, 0), (Kind.RECV_B, 0), (Kind.RECV_F, 1), (Kind.SEND_B, 1)}
    assert not [i for i in turn if (i.kind, i.chunk) in local]
    assert {i.peer for i in turn} == {2}


def test_one_f_one_b_and_zb1p_orders() -> None:
    assert compute_str(build_instructions("1f1b", 4, 6)[0]) == [
        "F0.0", "F0.1", "F0.2", "F0.3", "B0.0", "F0.4", "B0.1", "F0.5", "B0.2", "B0.3", "B0.4", "B0.5",
    ]
    # ZB-H1: the last rank keeps pp-1 = 3 weight-gradients queued, spending them at the end
    assert compute_str(build_instructions("zb1p", 4, 6)[3]) == [
        "F0.0", "B0.0,zb", "F0.1", "B0.1,zb", "F0.2", "B0.2,zb", "F0.3", "B0.3,zb", "W0.0", "F0.4", "B0.4,zb",
        "W0.1", "F0.5", "B0.5,zb", "W0.2", "W0.3", "W0.4", "W0.5",
    ]
    assert compute_str(build_instructions("1f1b", 1, 2)[0]) == ["F0.0", "B0.0", "F0.1", "B0.1"]


@pytest.mark.parametrize(
    "args,match",
    [
        (("dualpipe", 3, 12), "even pp"),
        (("dualpipe", 4, 6), "microbatches >= 2\\*pp=8"),
        (("dualpipe", 4, 9), "even number of microbatches"),
        (("dualpipev", 4, 7), "microbatches >= 2\\*pp=8"),
        (("1f1b", 0, 4), "at least one rank"),
        (("zb1p", 2, 0), "at least one microbatch"),
        (("gpipe", 4, 8), "unknown pipeline schedule 'gpipe'"),
    ],
)
def test_bad_input_one_line_error(args: tuple, match: str) -> None:
    with pytest.raises(ScheduleError, match=match) as err:
        build_instructions(*args)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


# --- the checker can fail ------------------------------------------------------------------------------


def _without(ops: list[Instr], pred) -> list[Instr]:
    i = next(k for k, ins in enumerate(ops) if pred(ins))
    return ops[:i] + ops[i + 1:]


def test_checker_catches_dropped_recv() -> None:
    lists = build_instructions("dualpipe", 4, 8)
    lists[2] = _without(lists[2], lambda i: i.kind == Kind.RECV_B)
    with pytest.raises(AssertionError, match="1 SEND, 0 RECV"):
        verify_schedule("dualpipe", 4, 8, lists)


def test_checker_catches_deadlock() -> None:
    # rank 0 waits for the gradient of mb 0 before sending mb 0's activation: a cycle with rank 1
    lists = build_instructions("1f1b", 2, 1)
    send = next(i for i in lists[0] if i.kind == Kind.SEND_F)
    ops = [i for i in lists[0] if i != send]
    ops.insert(ops.index(Instr(Kind.B, 0, 0)) + 1, send)
    lists[0] = ops
    with pytest.raises(AssertionError, match="deadlock: rank 0 at op 2 B0.0; rank 1 at op 1 F0.0"):
        verify_schedule("1f1b", 2, 1, lists)


def test_checker_catches_swapped_w_and_missing_dependency() -> None:
    lists = build_instructions("dualpipe", 4, 8)
    ops = lists[1]
    a, b = len(ops) - 4, len(ops) - 3  # the final "W1.7 W0.3"
    assert ops[a].kind == ops[b].kind == Kind.W
    ops[a], ops[b] = ops[b], ops[a]
    with pytest.raises(AssertionError, match="FIFO"):
        verify_schedule("dualpipe", 4, 8, lists)

    lists = build_instructions("zb1p", 2, 3)
    first_b = next(k for k, i in enumerate(lists[1]) if i.kind == Kind.B)
    lists[1].insert(0, lists[1].pop(first_b))  # B before its F
    with pytest.raises(AssertionError, match="backward before its forward"):
        verify_schedule("zb1p", 2, 3, lists)


def test_checker_catches_wrong_peer_and_duplicate() -> None:
    lists = build_instructions("dualpipev", 3, 6)
    k = next(k for k, i in enumerate(lists[0]) if i.kind == Kind.SEND_F)
    i = lists[0][k]
    lists[0][k] = Instr(i.kind, i.chunk, i.mb, peer=2)
    with pytest.raises(AssertionError, match="peer is not the chunk's hop"):
        verify_schedule("dualpipev", 3, 6, lists)

    lists = build_instructions("1f1b", 1, 3)
    lists[0].insert(1, Instr(Kind.F, 0, 0))
    with pytest.raises(AssertionError, match="forward twice"):
        verify_schedule("1f1b", 1, 3, lists)


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("defer_w", [True, False])
def test_a_chunks_gradients_are_final_after_its_last_backward_or_weight_instruction(pp, defer_w):
    """What the DualPipe engine keys its early mirror-gradient sums on (parallel/runtime.py): no instruction after
    the reported one adds to that chunk's gradients, and on every rank one chunk is final before the step's last
    compute instruction, so its sum overlaps the other chunk's remaining work."""
    from parallel.instructions import COMPUTE, Kind
    from parallel.runtime import last_gradient_instructions

    for instrs in build_instructions("dualpipe", pp, 2 * pp, defer_w=defer_w):
        done = last_gradient_instructions(instrs)
        chunks = sorted(c for cs in done.values() for c in cs)
        assert chunks == [0, 1]
        for index, finished in done.items():
            for later in instrs[index + 1:]:
                touched = later.b_chunk if later.kind == Kind.FB else later.chunk
                assert not (later.kind in (Kind.B, Kind.W, Kind.FB) and touched in finished), (index, later)
        last_compute = max(i for i, ins in enumerate(instrs) if ins.kind in COMPUTE)
        assert min(done) < last_compute
