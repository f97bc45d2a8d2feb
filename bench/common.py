"""Shared plumbing for benchmarks: timing with interleaved repeats, medians, and the result JSON.

Every benchmark module `bench/NAME.py` exposes `run(repeats: int) -> dict` that returns the dict written by
`result(...)`. Ours and the peer are measured in the same process tree, interleaved, and medians are quoted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def time_call(fn: Callable[[], Any], warmup: int = 1) -> float:
    """Seconds for one call of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def result(
    name: str,
    ours: float,
    peer: float,
    unit: str,
    goal: str,
    repeats: int,
    higher_is_better: bool = True,
    path: str | Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build and write bench/results/NAME.json (or `path`); ratio > 1 always means ours is better."""
    if higher_is_better:
        ratio = ours / peer if peer else float("inf")
    else:
        ratio = peer / ours if ours else float("inf")
    out = {
        "name": name,
        "ours": ours,
        "peer": peer,
        "unit": unit,
        "ratio": ratio,
        "goal": goal,
        "repeats": repeats,
        "machine": machine(),
        **extra,
    }
    target = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2, default=float) + "\n")
    return out
