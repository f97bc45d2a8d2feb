"""Measured timelines: Chrome trace JSON (one process per rank, complete events) and the timeline figure."""

from __future__ import annotations

import json

import pytest
import torch

from parallel.runtime import TimelineEvent
from parallel.spawn import run_ranks
from parallel.trace import chrome_trace, draw_measured_timeline, gather_timeline, write_chrome_trace
from tests.conftest import tiny_config


def record_dualpipev(rank: int, world: int) -> list[TimelineEvent]:
    """One dualpipev step on a single rank (both chunks local) with the timeline on, gathered."""
    from model.gemm import defer_weight_grads
    from model.transformer import DeepseekV3
    from parallel.instructions import Placement
    from parallel.runtime import PipelineRuntime
    from parallel.schedules import build_instructions
    from parallel.stages import build_stage
    from parallel.weight_grad import WeightGradStore
    from tests.parallel.pipeline_workers import MICRO, SEQ, make_batches

    cfg = tiny_config(num_hidden_layers=2)
    model = DeepseekV3(cfg).train()
    placement, store = Placement("dualpipev", 1), WeightGradStore()
    defer_weight_grads(model, store)
    stages = {c: build_stage(model, placement.stage(rank, c), placement.num_stages) for c in range(2)}
    runtime = PipelineRuntime(placement, rank, stages, None, store, activation_shape=(MICRO, SEQ, cfg.hidden_size),
                              dtype=torch.float32, device=torch.device("cpu"), seq_len=SEQ, record_timeline=True)
    runtime.run(build_instructions("dualpipev", 1, 2)[rank], make_batches(cfg, 2), loss_scale=0.5)
    return gather_timeline(runtime.timeline)


def check_trace(trace: dict, ranks: set[int]) -> None:
    events = trace["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert complete and {e["pid"] for e in complete} == ranks
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {r: f"rank {r}" for r in ranks}  # one process per rank
    for e in complete:
        assert e["dur"] > 0 and e["ts"] >= 0 and e["cat"] in {"F", "B", "W", "FB"} and e["name"]
    assert min(e["ts"] for e in complete) == 0  # relative to the earliest start


@pytest.mark.multiprocess
def test_measured_dualpipev_trace(tmp_path):
    (events,) = run_ranks(1, record_dualpipev)
    assert {e.kind for e in events} >= {"F", "B", "W"}
    path = tmp_path / "trace.json"
    write_chrome_trace(events, path)
    check_trace(json.loads(path.read_text()), {0})
    draw_measured_timeline(events, tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 0


def test_one_process_per_rank():
    events = [TimelineEvent(r, 10.0 + 0.01 * i + r * 0.001, 10.0 + 0.01 * i + 0.005, f"F0.{i}", "F", 0)
              for r in (0, 1) for i in range(3)]
    events.append(TimelineEvent(1, 10.05, 10.06, "FB(F0.3,B1.0,zb)", "FB", 0))
    trace = chrome_trace(events)
    check_trace(trace, {0, 1})
    fb = [e for e in trace["traceEvents"] if e.get("cat") == "FB"]
    assert fb[0]["ts"] == pytest.approx(50_000) and fb[0]["dur"] == pytest.approx(10_000)
