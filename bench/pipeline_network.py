"""pipeline_network: DualPipe with its expert all-to-alls overlapped against DeepSpeed's 1F1B with the same expert
parallelism done synchronously, on the modelled interconnect, through the real trainer.

Layout: pp=2 x dp=2 with ep=2 (the EP group is a stage's two data ranks), 4 processes on this machine's cores,
so time is the virtual clock (`parallel.network.clock=virtual`: each rank's thread CPU time plus its modelled
waits; checked against the wall clock at 2 processes by `python -m bench ep_overlap`). Every rank sits on its
own modelled node (`ranks_per_node=1`), so the all-to-alls, the pipeline's p2p and ZeRO-1's reductions all cross
InfiniBand-like links.

The network: InfiniBand's bandwidth is set so that the expert all-to-alls of a step take about as long as its
compute (DeepSeek-V3's ratio for a chunk): compute = the 1F1B step on a network too fast to matter, less 1F1B's
bubble share (pp - 1) / (M + pp - 1); all-to-all bytes = the rows one rank sends per step (every MoE layer of
its stage, each microbatch, dispatch + combine and their gradients, the (ep-1)/ep share that leaves the rank;
top-k choices of mb x seq tokens, hidden wide, fp32). Both schedules then run on that network; the figure is the
median `train/net_step_time_s` (the trainer's step on the model's clock) after the first step.

`exposed_comm_ms` is the time the ranks' waits were held by the model: on the virtual clock that includes
waiting for a later participant (bubbles, skew), not only the transfers. Run: `python -m bench pipeline_network`
(about 4 minutes on 2 cores). Numbers: docs/pipeline.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import result
from bench.ep_overlap import STREAMS

ROOT = Path(__file__).resolve().parents[1]
PP, DP, EP, MICRO, SEQ, MICROBATCHES = 2, 2, 2, 2, 256, 16
STEPS = 6
TIMELINE_STEP = 3  # DualPipe's step whose ops are timed for the simulator (parallel.timeline_step)
MODEL = ["model=tiny", "model.num_hidden_layers=4", "model.first_k_dense_replace=1"]
COMMON = [
    *MODEL, "parallel.ep=2", f"train.seq_len={SEQ}", f"train.micro_batch_size={MICRO}",
    f"train.global_batch_size={MICRO * MICROBATCHES * DP}", "train.eval_interval=0", "train.eval_batches=0",
    "optim.warmup_steps=1", "checkpoint.interval=0", "checkpoint.save_final=false", "logging.wandb.mode=disabled",
    "logging.progress=false",
    "parallel.network.model=ib_nvlink", "parallel.network.ranks_per_node=1", "parallel.network.clock=virtual",
]
SCHEDULES = {"dualpipe": ["parallel=dualpipe", f"parallel.timeline_step={TIMELINE_STEP}"], "1f1b": ["parallel=1f1b"]}


def _train(tmp: Path, name: str, overrides: list[str]) -> list[dict[str, Any]]:
    """The trainer on 4 CPU ranks; its train rows after the first step (run directory: tmp / name)."""
    from parallel.spawn import free_port

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "trainer.launch", "--nproc-per-node", str(PP * DP), "--master-port",
           str(free_port()), *COMMON, f"name={name}", f"run_dir={tmp / name}", f"train.steps={STEPS}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if r["kind"] == "train"]
    return rows[1:]


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[f"train/{key}"] for r in rows)


def _runs(repeats: int) -> int:
    """Runs of each schedule: at most 2 (a run is ~35 s here; with the calibration and the unshared-links pair
    the benchmark stays under ~5 minutes)."""
    return min(max(1, repeats), 2)


def a2a_bytes_per_step() -> float:
    """Bytes one rank sends through the expert all-to-alls in a step (see the module docstring)."""
    from model.config import ModelConfig

    cfg = ModelConfig()  # the tiny preset changes FFN widths only: hidden size, layers and top-k are these
    moe_layers_per_stage = (4 - 1) / PP  # layers 1-3 are MoE, two stages
    rows = MICRO * SEQ * cfg.num_experts_per_tok * (EP - 1) / EP
    return MICROBATCHES * moe_layers_per_stage * 4 * rows * cfg.hidden_size * 4


def activation_bytes() -> int:
    """Bytes of one microbatch's activation (or its gradient) between pipeline stages."""
    from model.config import ModelConfig

    return MICRO * SEQ * ModelConfig().hidden_size * 4


def simulated_step(run_dir: Path, gbs: float, latency_us: float, shared_links: bool = True) -> dict[str, float]:
    """DualPipe's recorded step (timeline.json, virtual-clock seconds) replayed by `parallel.simulate`: every op of
    data replica 0 at its measured duration (its exposed all-to-all waits included), each pipeline send arriving
    after the modelled latency + activation bytes / InfiniBand bandwidth. Then the step's tail
    (`parallel.simulate.step_makespan`): each gradient-reduction bucket posted at the simulated time of the point
    in the op that posted it, carried by its rank's link at its modelled seconds, then the tail's compute as
    measured (the tail event less its wait for the reduction)."""
    from bench.pipeline import replayed_timeline
    from parallel.simulate import step_makespan

    trace = json.loads((run_dir / "timeline.json").read_text())
    ours = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] % DP == 0]
    ops = [e for e in ours if e["tid"] == 0]
    durations = {(e["pid"] // DP, e["name"]): e["dur"] * 1e-6 for e in ops}
    latency = latency_us * 1e-6 + activation_bytes() / (gbs * 1e9)
    sim = replayed_timeline("dualpipe", PP, MICROBATCHES, durations, comm_latency=latency)
    span = (max(e["ts"] + e["dur"] for e in ops) - min(e["ts"] for e in ops)) * 1e-6
    simulated_at = {(rank, str(s.instr)): s for rank, spans in enumerate(sim.spans) for s in spans}
    reductions: dict[int, list[tuple[float, float]]] = {}
    tail: dict[int, float] = {}
    for e in ours:
        rank = e["pid"] // DP
        if e["cat"] == "grad_reduce":
            # the op running (or last run) when the bucket was posted, and how far into it
            op = max((o for o in ops if o["pid"] == e["pid"] and o["ts"] <= e["ts"]), key=lambda o: o["ts"])
            at = simulated_at[(rank, op["name"])]
            into = (e["ts"] - op["ts"]) * 1e-6
            post = at.start + min(into, at.end - at.start) + max(0.0, into - op["dur"] * 1e-6)
            reductions.setdefault(rank, []).append((post, e["args"].get("modelled_us", 0.0) * 1e-6))
        elif e["cat"] == "step_tail":
            tail[rank] = (e["dur"] - e["args"].get("waited_us", 0.0)) * 1e-6
    return {"simulated_makespan_s": sim.makespan, "measured_pipeline_span_s": span, "p2p_s": latency,
            "simulated_step_s": step_makespan(sim, reductions, tail, shared_links),
            "tail_compute_s": max(tail.values(), default=0.0),
            "reduction_modelled_s": max((sum(t for _, t in r) for r in reductions.values()), default=0.0)}


def _measure(tmp: Path, name: str, run_name: str, overrides: list[str], gbs: float) -> dict[str, float]:
    """One run's medians over its steps; DualPipe's also its recorded step against the simulator."""
    rows = _train(tmp, run_name, overrides)
    keys = ["net_step_time_s", "net_exposed_s", "net_modelled_s", "net_inter_node_bytes", "step_time_s"]
    if name == "dualpipe":
        keys += ["net_grad_reduce_s", "net_grad_reduce_exposed_s"]
    out = {key: _median(rows, key) for key in keys}
    if name == "dualpipe":
        step = next(r for r in rows if r["step"] == TIMELINE_STEP)
        shared = "parallel.network.shared_links=false" not in overrides
        out.update(simulated_step(tmp / run_name, gbs, 5.0, shared), timeline_step_s=step["train/net_step_time_s"])
    return out


def run(repeats: int) -> dict[str, Any]:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-network-") as tmp_name:
        tmp = Path(tmp_name)
        fast = ["parallel.network.latency_us=0", "parallel.network.inter_node_gbs=1e6",
                "parallel.network.intra_node_gbs=1e6"]
        calibration = _train(tmp, "calibrate", [*SCHEDULES["1f1b"], *fast])
        compute = _median(calibration, "net_step_time_s") * MICROBATCHES / (MICROBATCHES + PP - 1)
        gbs = a2a_bytes_per_step() / compute / 1e9
        network = [f"parallel.network.inter_node_gbs={gbs}", "parallel.network.latency_us=5"]
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in SCHEDULES}
        for r in range(_runs(repeats)):
            for name, schedule in SCHEDULES.items():
                samples[name].append(_measure(tmp, name, f"{name}-{r}", [*schedule, *network], gbs))
        # once more on links a rank's transfers do not share (each alone on its link: the model's first form)
        unshared = {name: _measure(tmp, name, f"{name}-unshared", [*schedule, *network,
                                                                   "parallel.network.shared_links=false"], gbs)
                    for name, schedule in SCHEDULES.items()}
    med = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
    dual = med["dualpipe"]
    tokens = MICRO * SEQ * MICROBATCHES * DP
    ours, peer = tokens / med["dualpipe"]["net_step_time_s"], tokens / med["1f1b"]["net_step_time_s"]
    return result(
        "pipeline_network", ours, peer, "tokens/s on the modelled network (virtual clock, pp=2 x dp=2, ep=2)",
        "modelled.ratio_vs_1f1b >= 1.25, reduce_exposed_fraction <= 0.2, bubble_vs_simulator within 10%", repeats,
        modelled={
            "ratio_vs_1f1b": ours / peer,
            "unshared_links": {  # one run each, parallel.network.shared_links=false
                "ratio_vs_1f1b": unshared["1f1b"]["net_step_time_s"] / unshared["dualpipe"]["net_step_time_s"],
                "bubble_vs_simulator": unshared["dualpipe"]["timeline_step_s"]
                / unshared["dualpipe"]["simulated_step_s"],
                "step_ms": {name: 1e3 * m["net_step_time_s"] for name, m in unshared.items()},
                # not comparable: without sharing, buckets in flight together cost only the longest of them
                "reduce_exposed_over_summed_buckets": unshared["dualpipe"]["net_grad_reduce_exposed_s"]
                / max(unshared["dualpipe"]["net_grad_reduce_s"], 1e-12),
            },
            # DualPipe's gradient reduction (mirror sum and data-parallel average in one, bucket by bucket as the
            # gradients become final): the part of its modelled time the step's end still waited for
            "reduce_exposed_fraction": med["dualpipe"]["net_grad_reduce_exposed_s"] / max(
                med["dualpipe"]["net_grad_reduce_s"], 1e-12),
            "grad_reduce_ms": 1e3 * med["dualpipe"]["net_grad_reduce_s"],
            # the recorded step's time on the model's clock over the makespan the simulator predicts from that step's
            # own op durations, the modelled p2p and the modelled gradient reduction, plus the tail's compute
            # (parallel.simulate.step_makespan); the pipeline's span alone against the pipeline's simulated makespan
            "bubble_vs_simulator": dual["timeline_step_s"] / dual["simulated_step_s"],
            "step_vs_pipeline_only_simulator": dual["timeline_step_s"] / dual["simulated_makespan_s"],
            "pipeline_span_vs_simulator": dual["measured_pipeline_span_s"] / dual["simulated_makespan_s"],
            "simulated_step_ms": 1e3 * dual["simulated_step_s"],
            "simulated_makespan_ms": 1e3 * dual["simulated_makespan_s"],
            "tail_compute_ms": 1e3 * dual["tail_compute_s"],
            "reduction_modelled_ms_per_rank": 1e3 * dual["reduction_modelled_s"],
            "timeline_step_ms": 1e3 * dual["timeline_step_s"],
            "p2p_ms_per_activation": 1e3 * dual["p2p_s"],
            "step_ms": {name: 1e3 * m["net_step_time_s"] for name, m in med.items()},
            "exposed_comm_ms": {name: 1e3 * m["net_exposed_s"] for name, m in med.items()},
            "modelled_comm_ms": {name: 1e3 * m["net_modelled_s"] for name, m in med.items()},
            "sent_bytes_per_rank": {name: m["net_inter_node_bytes"] for name, m in med.items()},
            "wall_step_ms": {name: 1e3 * m["step_time_s"] for name, m in med.items()},
            "a2a_bytes_per_rank_step": a2a_bytes_per_step(), "compute_ms_estimate": 1e3 * compute,
            "network": {"model": "ib_nvlink", "latency_us": 5.0, "inter_node_gbs": gbs, "ranks_per_node": 1,
                        "shared_links": True, "streams": STREAMS},
            "clock": "virtual", "processes": PP * DP, "cores": os.cpu_count(),
            "runs_per_schedule": _runs(repeats), "steps_per_run": STEPS - 1,
        },
        shapes={"model": MODEL, "pp": PP, "dp": DP, "ep": EP, "micro_batch": MICRO, "seq": SEQ,
                "microbatches": MICROBATCHES},
        seconds=time.perf_counter() - started,
        note="a2a time set about equal to compute; 1F1B runs each MoE block's all-to-alls synchronously inside "
             "DeepSpeed's PipelineEngine; DualPipe overlaps them in its F&B pairs; ZeRO-1's reductions and the "
             "pipeline's p2p cross the same modelled links in both",
    )


if __name__ == "__main__":
    print(json.dumps(run(1), indent=1, default=float))
