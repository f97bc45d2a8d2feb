"""Measured pipeline timelines: gather them from the ranks, write a Chrome trace, draw the simulator's figure.

Events are `parallel.runtime.TimelineEvent(rank, start, end, label, kind, chunk)` with `time.perf_counter()`
seconds. On Linux that clock is CLOCK_MONOTONIC, shared by all processes of a machine, so events of different
ranks on one host line up; across hosts they are only comparable per rank. Under a network model on the virtual
clock (`parallel.network.clock=virtual`) they are that clock's seconds (`parallel.network_model.timeline_now`),
aligned across ranks at the step's start.

    events = gather_timeline(schedule.timeline())        # every rank gets all ranks' events
    if rank == 0:
        write_chrome_trace(events, "trace.json")          # open in https://ui.perfetto.dev or chrome://tracing
        draw_measured_timeline(events, "timeline.png")
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch.distributed as dist

from parallel.runtime import STEP_TAIL, TimelineEvent
from parallel.simulate import draw_timeline


def gather_timeline(events: list[TimelineEvent], group=None) -> list[TimelineEvent]:
    """All ranks' events on every rank (all_gather_object over `group`, default WORLD), sorted by start.
    Each event's rank becomes its sender's rank in `group`, so two data-parallel replicas of one pipe rank
    stay apart when gathered over the world."""
    if not (dist.is_available() and dist.is_initialized()):
        return sorted(events, key=lambda e: e.start)
    world = dist.get_world_size(group)
    parts: list[list[TimelineEvent] | None] = [None] * world
    dist.all_gather_object(parts, list(events), group=group)
    out = [dataclasses.replace(e, rank=src) for src, part in enumerate(parts) for e in part or []]
    return sorted(out, key=lambda e: e.start)


def chrome_trace(events: list[TimelineEvent]) -> dict:
    """The Chrome trace-event JSON object: one process per rank, one complete ("X") event per compute op,
    microseconds from the earliest start, category = kind (F, B, W, FB), name = the instruction's label."""
    if not events:
        return {"traceEvents": [], "displayTimeUnit": "ms"}
    t0 = min(e.start for e in events)
    out: list[dict] = []
    for rank in sorted({e.rank for e in events}):
        out.append({"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}})
        out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": 0, "args": {"name": "compute"}})
        for kind, (tid, name) in COMM_TRACKS.items():
            if any(e.rank == rank and e.kind == kind for e in events):
                out.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": name}})
    for e in sorted(events, key=lambda e: (e.rank, e.start)):
        args = {"chunk": e.chunk}
        if getattr(e, "waited", 0.0):  # compute: waited for its input; all-to-all: the exposed (blocked) part
            args["waited_us"] = round(e.waited * 1e6, 3)
        if getattr(e, "modelled", 0.0):  # a modelled transfer's seconds alone on its link
            args["modelled_us"] = round(e.modelled * 1e6, 3)
        out.append({
            "ph": "X", "pid": e.rank, "tid": COMM_TRACKS.get(e.kind, (0,))[0], "name": e.label, "cat": e.kind,
            "ts": round((e.start - t0) * 1e6, 3), "dur": round((e.end - e.start) * 1e6, 3), "args": args,
        })
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def write_chrome_trace(events: list[TimelineEvent], path: str | Path) -> None:
    Path(path).write_text(json.dumps(chrome_trace(events)) + "\n")


COMM_KIND = "all_to_all"  # expert all-to-alls (post -> end of wait), drawn on their own track
# communication kinds and their tracks (Chrome trace thread ids): expert all-to-alls; gradient-reduction buckets
# (post -> the end of the step's wait for them, parallel/grad_reduce.py); the step's tail after the pipeline
# (its wait for the reduction, the optimizer step: off the compute track, which holds the pipeline's ops)
COMM_TRACKS = {COMM_KIND: (1, "all-to-all"), "grad_reduce": (2, "gradient reduction"), STEP_TAIL: (3, "step tail")}


def exposed_communication(events: list[TimelineEvent]) -> dict[int, dict[str, float]]:
    """Per rank: all-to-all seconds from post to end of wait (`span`), blocked in the wait (`exposed`)."""
    out: dict[int, dict[str, float]] = {}
    for e in events:
        if e.kind == COMM_KIND:
            row = out.setdefault(e.rank, {"count": 0, "span": 0.0, "exposed": 0.0})
            row["count"] += 1
            row["span"] += e.end - e.start
            row["exposed"] += e.waited
    return out


_MB = re.compile(r"\d+\.(\d+)")


def _short_label(label: str) -> str:
    """'F0.3,zb' -> '3', 'FB(F0.3,B1.1,zb)' -> '3/1': the simulator's labels, which fit in the boxes."""
    mbs = _MB.findall(label)
    return "/".join(mbs) if mbs else label


def draw_measured_timeline(events: list[TimelineEvent], out_png: str | Path, title: str = "") -> None:
    """The simulator's figure (`parallel.simulate.draw_timeline`) from measured events, in milliseconds."""
    if not events:
        raise ValueError("no timeline events to draw (was the schedule built with record_timeline=True?)")
    t0 = min(e.start for e in events)
    records = [(e.rank, (e.start - t0) * 1e3, (e.end - t0) * 1e3, _short_label(e.label), e.kind, e.chunk)
               for e in events if e.kind not in COMM_TRACKS]
    draw_timeline(records, str(out_png), title or "measured timeline (ms)")
