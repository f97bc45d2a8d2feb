"""Simulator: Table-2 bubbles where the formulas are exact, documented values where they are not, the CLI and
the timeline drawing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from parallel.instructions import Instr, Kind, Placement
from parallel.schedules import build_instructions
from parallel.simulate import Costs, draw_timeline, formula_bubble, main, simulate, step_makespan

PAPER = Costs(f=1, b=2, w=1, fb=3)


def sim(schedule: str, pp: int, m: int, costs: Costs = PAPER, latency: float = 0.0, defer_w: bool = True):
    return simulate(build_instructions(schedule, pp, m, defer_w=defer_w), Placement(schedule, pp), costs, latency)


@pytest.mark.parametrize(
    "schedule,pp,m,bubble",
    [("1f1b", 8, 20, 21), ("zb1p", 8, 20, 7), ("dualpipe", 8, 20, 6), ("dualpipev", 4, 20, 6),
     ("dualpipev", 4, 10, 6)],
)
def test_paper_bubbles(schedule: str, pp: int, m: int, bubble: float) -> None:
    tl = sim(schedule, pp, m)
    assert tl.bubble == bubble == formula_bubble(schedule, pp, 1, 2, 1, 3)
    assert tl.busy == [m * 3 * (2 if schedule == "dualpipev" else 1)] * pp  # every rank: m x (F + B) work


@pytest.mark.parametrize("schedule,pps", [("1f1b", (1, 2, 4, 8)), ("zb1p", (1, 2, 4, 8)),
                                          ("dualpipe", (2, 4, 6, 8)), ("dualpipev", (1, 2, 3, 4, 8))])
def test_formula_across_sizes(schedule: str, pps: tuple[int, ...]) -> None:
    for pp in pps:
        for m in (2 * pp, 2 * pp + 2, 40):
            assert sim(schedule, pp, m).bubble == formula_bubble(schedule, pp, 1, 2, 1, 3), (pp, m)


# Cost points where DESIGN's conditions hold (ZB1P: W <= F, 2W <= B; DualPipe: B-W = F, W <= F).
EXACT = [Costs(1, 2, 1, 2.5), Costs(2, 3, 1, 4), Costs(1.5, 2, 0.5, 3), Costs(2, 4, 2, 5), Costs(1, 1.5, 0.5, 2)]


@pytest.mark.parametrize("costs", EXACT)
def test_formula_exact_under_conditions(costs: Costs) -> None:
    for schedule, pp in (("1f1b", 8), ("zb1p", 8), ("dualpipe", 8), ("dualpipev", 4)):
        want = formula_bubble(schedule, pp, costs.f, costs.b, costs.w, costs.pair)
        assert sim(schedule, pp, 20, costs).bubble == pytest.approx(want), schedule


# Outside the conditions the reference order gives another, still computable bubble (docs table).
@pytest.mark.parametrize(
    "schedule,pp,costs,simulated,formula",
    [
        ("zb1p", 8, Costs(1, 3, 1.5, 4), 10.5, 7),  # W > F: W cannot hide under F
        ("zb1p", 8, Costs(1, 4, 2, 5), 14, 7),
        ("dualpipe", 8, Costs(1, 2, 0.5, 3), 9.5, 10.5),  # B-W > F: the formula overestimates
        ("dualpipe", 8, Costs(2, 2, 1, 4), 12, 9),  # B-W < F
        ("dualpipe", 8, Costs(1, 2, 1.5, 3), 6, 1.5),  # W > F
        ("dualpipev", 4, Costs(1, 2, 0.5, 3), 9.5, 10.5),
        ("dualpipev", 4, Costs(2, 2, 1, 4), 12, 9),
    ],
)
def test_off_condition_points(schedule: str, pp: int, costs: Costs, simulated: float, formula: float) -> None:
    assert sim(schedule, pp, 20, costs).bubble == simulated
    assert formula_bubble(schedule, pp, costs.f, costs.b, costs.w, costs.pair) == formula


def test_defer_w_matters_and_w_zero_is_1f1b() -> None:
    assert sim("zb1p", 4, 8, defer_w=False).bubble == sim("1f1b", 4, 8).bubble == 9
    assert sim("dualpipe", 8, 20, defer_w=False).bubble == 14
    assert sim("zb1p", 8, 20, Costs(1, 2, 0, 3)).bubble == 21


def test_durations_and_latency() -> None:
    c = Costs(f=1, b=3, w=1)
    assert c.pair == 4
    assert c.duration(Instr(Kind.B, 0, 0, defer_w=True)) == 2
    assert c.duration(Instr(Kind.FB, 0, 0, b_chunk=1, b_mb=0, defer_w=True)) == 3
    # pp=2, one microbatch: F, hop, F, B, hop, B
    tl = sim("1f1b", 2, 1, Costs(1, 2, 1), latency=0.5)
    assert tl.makespan == 7 and tl.bubble == 4
    assert [(s.start, s.end, str(s.instr)) for s in tl.spans[0]] == [(0, 1, "F0.0"), (5, 7, "B0.0")]
    assert sim("dualpipe", 8, 20, latency=0.25).bubble > 6


def test_step_makespan_adds_the_reduction_and_the_tail() -> None:
    tl = sim("1f1b", 2, 1, Costs(1, 2, 1), latency=0.5)  # rank 0 ends at 7, rank 1 at 4.5 (F 1.5-2.5, B -4.5)
    assert [spans[-1].end for spans in tl.spans] == [7, 4.5]
    assert step_makespan(tl, {}, {}) == tl.makespan == 7
    # rank 1: transfers posted at 2 and 2.5 (2 s each) share its link one after the other: done at 6; tail 1.5
    assert step_makespan(tl, {1: [(2.5, 2.0), (2.0, 2.0)]}, {1: 1.5}) == 7.5
    # a transfer done before the rank's last op costs nothing; the tail always follows
    assert step_makespan(tl, {0: [(1.0, 3.0)]}, {0: 0.25}) == 7.25
    # a transfer posted after the link went idle starts at its post
    assert step_makespan(tl, {1: [(1.0, 0.5), (5.0, 1.0)]}, {}) == 7
    # unshared links: each transfer from its own post (2.5 + 2 = 4.5, then the tail)
    assert step_makespan(tl, {1: [(2.5, 2.0), (2.0, 2.0)]}, {1: 3.0}, shared_links=False) == 7.5


def test_peak_activations_match_table_2() -> None:
    assert sim("1f1b", 8, 20).peak_activations == [8, 7, 6, 5, 4, 3, 2, 1]
    assert sim("zb1p", 8, 20).peak_activations == [8, 7, 6, 5, 4, 3, 2, 1]
    assert sim("dualpipe", 8, 20).peak_activations == [9] * 8  # PP + 1
    assert sim("dualpipev", 4, 20).peak_activations == [9] * 4  # PP + 1 with PP = 2 x 4 stages


def test_large_pipeline_is_fast() -> None:
    t = time.perf_counter()
    tl = sim("dualpipev", 16, 128)
    tl2 = sim("dualpipe", 16, 128)
    assert time.perf_counter() - t < 1.0
    assert tl.bubble == formula_bubble("dualpipev", 16, 1, 2, 1, 3) == 30
    assert tl2.bubble == formula_bubble("dualpipe", 16, 1, 2, 1, 3) == 14


def test_deadlocked_lists_raise() -> None:
    lists = build_instructions("1f1b", 2, 1)
    lists[0] = [i for i in lists[0] if i.kind != Kind.SEND_F]
    with pytest.raises(RuntimeError, match="deadlocks: rank 0 at B0.0; rank 1 at F0.0"):
        simulate(lists, Placement("1f1b", 2), PAPER)


def test_cli_prints_bubble_and_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "timeline.png"
    rc = main(["schedule=dualpipe", "pp=8", "microbatches=20", "f=1", "b=2", "w=1", "fb=3", f"out={out}"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "bubble: 6\n" in text and "formula bubble (Table 2): 6\n" in text and "makespan: 66\n" in text
    assert "peak in-flight activations per rank: 9 9 9 9 9 9 9 9" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv,msg",
    [(["schedule=dualpipe", "pp=3", "microbatches=12"], "even pp"),
     (["schedule=dualpipev", "pp=4", "microbatches=6"], "microbatches >= 2*pp=8"),
     (["pp=four"], "invalid literal"),
     (["stages=4"], "bad argument")],
)
def test_cli_errors(argv: list[str], msg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_draw_timeline_places_one_box_per_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain (rank, start, end, label, kind, chunk) records, as the runtime measures them: every record is one
    box on its rank's row spanning [start, end] (an FB pair two half-height boxes: the forward's chunk on top,
    the backward's, the other chunk, below), one colour per (kind, chunk), each label at its box's centre."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    records = [(0, 0.0, 1.2, "0", "F", 0), (1, 1.3, 2.1, "0", "F", 0), (1, 2.1, 4.0, "0", "B", 0),
               (0, 4.2, 5.0, "0", "B", 0), (0, 5.0, 5.5, "0", "W", 0), (0, 5.5, 6.5, "2", "F", 1),
               (1, 5.0, 8.0, "1/2", "FB", 1), (2, 0.5, 3.0, "1", "B", 1)]
    figures: list[Figure] = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k)))
    out = tmp_path / "measured.png"
    draw_timeline(records, str(out), "measured")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = figures[0].axes

    def r(x: float) -> float:
        return round(x, 6)

    # (rank row, x0, x1, top or bottom half or whole) -> face colour; y grows downwards (rank 0 on top)
    drawn = {}
    for box in ax.patches:
        assert isinstance(box, Rectangle)
        y_mid = box.get_y() + box.get_height() / 2
        rank = round(y_mid)
        half = "whole" if box.get_height() > 0.5 else ("top" if y_mid < rank else "bottom")
        drawn[(rank, r(box.get_x()), r(box.get_x() + box.get_width()), half)] = box.get_facecolor()
    expected = {}
    for rank, start, end, _label, kind, chunk in records:
        if kind == "FB":
            expected[(rank, r(start), r(end), "top")] = ("F", chunk)
            expected[(rank, r(start), r(end), "bottom")] = ("B", 1 - chunk)
        else:
            expected[(rank, r(start), r(end), "whole")] = (kind, chunk)
    assert len(ax.patches) == len(expected) == len(records) + 1
    assert drawn.keys() == expected.keys()
    colour = {}  # one colour per (kind, chunk), distinct ones for distinct keys
    for where, key in expected.items():
        assert colour.setdefault(key, drawn[where]) == drawn[where], key
    assert len(set(colour.values())) == len(colour) == 5
    assert ax.get_ylim() == (2.5, -0.5) and ax.get_xlim() == (0.0, 8.0)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0", "rank 1", "rank 2"]
    # boxes of at least half a time unit on an 8-unit axis are wide enough for their label
    labels = sorted((r(t.get_position()[0]), t.get_position()[1], t.get_text()) for t in ax.texts)
    assert labels == sorted((r((s + e) / 2), rank, lab) for rank, s, e, lab, _k, _c in records)
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "B chunk 0", "B chunk 1", "F chunk 0", "F chunk 1", "W chunk 0"]
