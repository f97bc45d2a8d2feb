"""Time pipeline instruction lists from per-op costs: bubble, makespan, in-flight activations, a timeline PNG.

Model (ideal, one compute stream per rank):
- a rank runs its list in order; communication instructions take no time and sends never block;
- a compute op starts when the rank is free and each remote input has arrived: the input is available at
  the time its SEND was posted on the peer (the end of the compute before it there) plus `comm_latency`;
  a local hand-off (DualPipeV's turn at rank pp-1) is ready when the producing op ends;
- durations: F = f, B = b (b - w when it defers W), W = w, FB = fb (fb - w when its B defers W);
- bubble = makespan - the busy time of the least-loaded rank (DualPipe paper, Table 2);
- peak activations = the most (chunk, microbatch) pairs on a rank whose F has run and whose B has not, in
  units of one chunk's activations for one microbatch; an FB pair counts its forward before its backward
  frees anything.

`step_makespan` continues a timeline past the pipeline: each rank's gradient-reduction transfers (post time,
modelled seconds) on its link, then its tail's compute (optimizer step and the like).

CLI: python -m parallel.simulate schedule=dualpipe pp=8 microbatches=20 f=1 b=2 w=1 fb=3 [out=timeline.png]
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from parallel.instructions import COMPUTE, Instr, Kind, Placement
from parallel.schedules import ScheduleError, build_instructions, check_args, needed_sends


@dataclass(frozen=True)
class Costs:
    """Per-op durations: F, full B, its W part, and an overlapped F&B pair (default f + b: no overlap gain)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None

    @property
    def pair(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def duration(self, ins: Instr) -> float:
        saved = self.w if ins.defer_w else 0.0
        return {Kind.F: self.f, Kind.B: self.b - saved, Kind.W: self.w, Kind.FB: self.pair - saved}[ins.kind]


class Span(NamedTuple):
    start: float
    end: float
    instr: Instr


class Interval(NamedTuple):
    """A plain timeline record, simulated or measured: what `draw_timeline` takes."""

    rank: int
    start: float
    end: float
    label: str  # e.g. the microbatch number, "3/12" for an F&B pair
    kind: str  # "F", "B", "W" or "FB"
    chunk: int  # for FB: the forward's chunk (the backward half runs the other chunk)


@dataclass
class Timeline:
    spans: list[list[Span]]  # per rank, compute ops only, in execution order
    makespan: float
    busy: list[float]
    peak_activations: list[int]

    @property
    def bubble(self) -> float:
        return self.makespan - min(self.busy)

    def records(self) -> list[Interval]:
        out = []
        for rank, spans in enumerate(self.spans):
            for s in spans:
                ins = s.instr
                label = f"{ins.mb}/{ins.b_mb}" if ins.kind == Kind.FB else str(ins.mb)
                out.append(Interval(rank, s.start, s.end, label, ins.kind.value, ins.chunk))
        return out


def simulate(
    lists: list[list[Instr]], placement: Placement, costs: Costs, comm_latency: float = 0.0
) -> Timeline:
    """Time the lists under the model in the module docstring. Raises RuntimeError when ranks deadlock."""
    pp = len(lists)
    sent: dict[tuple[int, str, int, int], float] = {}  # (src rank, 'F'|'B', src chunk, mb) -> post time
    pos, clock, live, peak = [0] * pp, [0.0] * pp, [0] * pp, [0] * pp
    spans: list[list[Span]] = [[] for _ in range(pp)]
    busy = [0.0] * pp
    progress = True
    # Sweep the ranks, each as far as its inputs allow; a send only depends on its own rank's past.
    while progress:
        progress = False
        for rank, ops in enumerate(lists):
            while pos[rank] < len(ops):
                ins = ops[pos[rank]]
                if ins.kind in COMPUTE:
                    need = needed_sends(placement, rank, ins)
                    if not all(k in sent for k in need):
                        break
                    start = max([clock[rank]] + [sent[k] + comm_latency for k in need])
                    end = start + costs.duration(ins)
                    spans[rank].append(Span(start, end, ins))
                    busy[rank] += end - start
                    clock[rank] = end
                    if ins.kind in (Kind.F, Kind.FB):
                        live[rank] += 1
                        peak[rank] = max(peak[rank], live[rank])
                    if ins.kind in (Kind.B, Kind.FB):
                        live[rank] -= 1
                elif ins.kind in (Kind.SEND_F, Kind.SEND_B):
                    sent[(rank, ins.kind.value[-1], ins.chunk, ins.mb)] = clock[rank]
                pos[rank] += 1
                progress = True
    stuck = [f"rank {r} at {lists[r][pos[r]]}" for r in range(pp) if pos[r] < len(lists[r])]
    if stuck:
        raise RuntimeError("schedule deadlocks: " + "; ".join(stuck))
    return Timeline(spans, max(clock), busy, peak)


def step_makespan(timeline: Timeline, reductions: dict[int, list[tuple[float, float]]],
                  tail: dict[int, float], shared_links: bool = True) -> float:
    """The whole step's makespan: the pipeline's `timeline`, then on each rank its tail. `reductions[rank]`: the
    gradient-reduction transfers it posts, (post time on the timeline's clock, modelled seconds alone on the
    link); a shared link carries them one after another in post order (which ends the last one when sharing the
    rate would too), an unshared one each from its post. `tail[rank]`: the compute after the pipeline and the
    transfers (hand-off, optimizer step, loss reduction). A rank ends at max(its last op, its last transfer) +
    its tail."""
    end = 0.0
    for rank, spans in enumerate(timeline.spans):
        link = 0.0
        for post, seconds in sorted(reductions.get(rank, [])):
            link = max(link, post) + seconds if shared_links else max(link, post + seconds)
        last_op = spans[-1].end if spans else 0.0
        end = max(end, max(last_op, link) + tail.get(rank, 0.0))
    return end


def formula_bubble(schedule: str, pp: int, f: float, b: float, w: float, fb: float | None = None) -> float:
    """DualPipe paper Table 2. For dualpipev `pp` is the number of ranks (the formula's PP/2)."""
    fb = f + b if fb is None else fb
    if schedule == "1f1b":
        return (pp - 1) * (f + b)
    if schedule == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if schedule == "dualpipe":
        return (pp / 2 - 1) * (fb + b - 3 * w)
    if schedule == "dualpipev":
        return (pp - 1) * (fb + b - 3 * w)
    raise ScheduleError(f"unknown pipeline schedule {schedule!r}")


def formula_activations(schedule: str, pp: int) -> int:
    """Table 2's activation memory per device, in microbatch-chunks (dualpipev: pp ranks = PP/2)."""
    return {"1f1b": pp, "zb1p": pp, "dualpipe": pp + 1, "dualpipev": 2 * pp + 1}[schedule]


# ------------------------------------------------------------------------------------------------ drawing

# Forward warm, backward green, W blue; the second direction (chunk 1) a darker shade of each.
_COLORS = {
    ("F", 0): "#f9cb9c", ("F", 1): "#e69138",
    ("B", 0): "#b6d7a8", ("B", 1): "#6aa84f",
    ("W", 0): "#9fc5e8", ("W", 1): "#3d85c6",
}


def draw_timeline(records: Timeline | Iterable[tuple], out_png: str, title: str = "") -> None:
    """Draw (rank, start, end, label, kind, chunk) records, one row per rank, like DualPipe's figure 5.

    `records` may be measured intervals (kind "F", "B", "W" or "FB") or a simulated `Timeline`.

    FB boxes are split: the upper half has the forward's colour, the lower half the backward's (the other
    chunk, as in every DualPipe pair). Labels are drawn while boxes are wide enough to hold them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    recs = [Interval(*r) for r in (records.records() if isinstance(records, Timeline) else records)]
    ranks = 1 + max((r.rank for r in recs), default=0)
    t0 = min((r.start for r in recs), default=0.0)
    t1 = max((r.end for r in recs), default=1.0)
    span = max(t1 - t0, 1e-9)
    width_in = min(48.0, max(8.0, 3.0 + 0.18 * len(recs) / ranks))  # room for the legend on small runs
    fig, ax = plt.subplots(figsize=(width_in, 0.45 * ranks + 1.6))
    # one vectorised barh call per colour keeps 10k boxes fast
    bars: dict[str, tuple[list[float], list[float], list[float], list[float]]] = {}  # left, width, y, h
    used: set[tuple[str, int]] = set()
    for r in recs:
        parts = [(("F", r.chunk), -0.2, 0.4), (("B", 1 - r.chunk), 0.2, 0.4)] if r.kind == "FB" else [
            ((r.kind, r.chunk), 0.0, 0.8)]
        for key, dy, h in parts:
            used.add(key)
            cols = bars.setdefault(_COLORS.get(key, "#cccccc"), ([], [], [], []))
            for col, v in zip(cols, (r.start, r.end - r.start, r.rank + dy, h)):
                col.append(v)
    for color, (left, width, y, h) in bars.items():
        ax.barh(y, width, height=h, left=left, color=color, edgecolor="black", linewidth=0.4)
    ax.set_ylim(ranks - 0.5, -0.5)
    ax.set_xlim(t0, t1)
    ax.set_yticks(range(ranks), [f"rank {i}" for i in range(ranks)])
    ax.set_xlabel("time")
    ax.set_title(title)
    legend = [Patch(facecolor=c, edgecolor="black", label=f"{k} chunk {ch}")
              for (k, ch), c in _COLORS.items() if (k, ch) in used]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / ranks),
              ncol=min(6, max(1, len(legend))), fontsize=7, frameon=False)
    fig.tight_layout()
    # label a box when its text fits (in points: a digit is ~0.55 em)
    fontsize = 7.0
    pt_per_unit = ax.get_position().width * width_in * 72 / span
    for r in recs:
        if (r.end - r.start) * pt_per_unit >= 0.55 * fontsize * len(r.label) + 0.5:
            ax.text((r.start + r.end) / 2, r.rank, r.label, ha="center", va="center", fontsize=fontsize)
    fig.savefig(out_png, dpi=120, bbox_inches="tight")  # keeps the legend below the axes in the image
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI

_USAGE = (
    "usage: python -m parallel.simulate schedule=1f1b|zb1p|dualpipe|dualpipev pp=N microbatches=M "
    "[f=1 b=2 w=1 fb=3 latency=0 defer_w=true out=timeline.png]"
)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    kv: dict[str, str] = {}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq or key not in ("schedule", "pp", "microbatches", "f", "b", "w", "fb", "latency", "defer_w", "out"):
            print(f"error: bad argument {a!r}; {_USAGE}", file=sys.stderr)
            return 2
        kv[key] = value
    try:
        schedule = kv.get("schedule", "dualpipe")
        pp, m = int(kv.get("pp", 8)), int(kv.get("microbatches", 20))
        costs = Costs(float(kv.get("f", 1)), float(kv.get("b", 2)), float(kv.get("w", 1)),
                      float(kv["fb"]) if "fb" in kv else None)
        latency = float(kv.get("latency", 0))
        defer_w = kv.get("defer_w", "true").lower() in ("1", "true", "yes")
    except ValueError as e:
        print(f"error: {e}; {_USAGE}", file=sys.stderr)
        return 2
    try:
        check_args(schedule, pp, m)
    except ScheduleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lists = build_instructions(schedule, pp, m, defer_w=defer_w)
    tl = simulate(lists, Placement(schedule, pp), costs, comm_latency=latency)
    formula = formula_bubble(schedule, pp, costs.f, costs.b, costs.w, costs.pair)
    print(f"schedule: {schedule} pp={pp} microbatches={m} f={_fmt(costs.f)} b={_fmt(costs.b)} "
          f"w={_fmt(costs.w)} fb={_fmt(costs.pair)} latency={_fmt(latency)} defer_w={defer_w}")
    print(f"bubble: {_fmt(tl.bubble)}")
    print(f"formula bubble (Table 2): {_fmt(formula)}")
    print(f"makespan: {_fmt(tl.makespan)}")
    print(f"busy per rank: {' '.join(_fmt(b) for b in tl.busy)}")
    print(f"peak in-flight activations per rank: {' '.join(map(str, tl.peak_activations))} "
          f"(Table 2: {formula_activations(schedule, pp)})")
    if "out" in kv:
        title = f"{schedule} pp={pp} microbatches={m}: bubble {_fmt(tl.bubble)}, makespan {_fmt(tl.makespan)}"
        draw_timeline(tl, kv["out"], title)
        print(f"timeline: {kv['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
