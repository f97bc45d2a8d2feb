"""Sweep summary: one table of a Hydra multirun's jobs and their final metrics.

Every job writes `<sweep dir>/<job number>/summary.json` (trainer/job.py: final step, losses, perplexity, MTP
acceptance, tokens/s, its command-line overrides). `summarize(sweep_dir)` reads them all and writes
`<sweep dir>/sweep_summary.md` (a Markdown table: the overrides that differ between jobs, then the metrics)
and `sweep_summary.json`; a job without a summary shows its state (`preempted` with the checkpointed step,
`failed / running` otherwise).

It runs by itself at the end of every sweep: `SweepSummary` is a Hydra callback (conf/config.yaml,
hydra.callbacks) whose `on_multirun_end` runs in the process that ran the sweep (every rank under the basic
launcher: rank 0 writes; the submitting process under hydra/launcher=slurm, after submitit has collected the
jobs). By hand, e.g. after requeued jobs finished: `python -m trainer.sweep multirun/<name>/<launch id>`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

SUMMARY_MD, SUMMARY_JSON = "sweep_summary.md", "sweep_summary.json"
METRICS = (  # (summary.json key, column title, format)
    ("step", "step", "{:d}"),
    ("train_lm_loss", "train LM loss", "{:.4f}"),
    ("val_lm_loss", "val LM loss", "{:.4f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("val_mtp_acceptance", "MTP acceptance", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _state(job_dir: Path) -> tuple[str, dict[str, Any]]:
    summary = job_dir / "summary.json"
    if summary.is_file():
        return "done", json.loads(summary.read_text())
    latest = job_dir / "checkpoints" / "latest"
    if latest.is_file():
        return f"stopped at {latest.read_text().strip()}", {}
    return "failed / running", {}


def _override_map(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides if "=" in o)


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job: {"job", "state", "overrides": {key: value}, metric keys...}."""
    rows = []
    for job_dir in _job_dirs(Path(sweep_dir)):
        state, summary = _state(job_dir)
        row = {"job": int(job_dir.name), "state": state, "run_dir": str(job_dir),
               "overrides": _override_map(summary.get("overrides", []))}  # unknown until the job has finished
        row.update({k: summary.get(k) for k, _, _ in METRICS})
        rows.append(row)
    return rows


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(int(value) if fmt == "{:d}" else value)
    except (ValueError, TypeError):
        return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: job, the overrides that differ between jobs, state, final metrics."""
    known = [r for r in rows if r["overrides"]]  # jobs that finished (and so reported their overrides)
    keys = sorted({k for r in known for k in r["overrides"]})
    varying = [k for k in keys if len({r["overrides"].get(k) for r in known}) > 1] or keys
    head = ["job", *varying, "state", *[title for _, title, _ in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["job"]), *[r["overrides"].get(k, "") for k in varying], r["state"],
                 *[_fmt(r.get(key), fmt) for key, _, fmt in METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(sweep_dir: str | Path, echo: bool = True) -> str:
    """Write sweep_summary.md / .json into the sweep directory; returns (and prints) the table."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    text = table(rows)
    (sweep_dir / SUMMARY_MD).write_text(f"# Sweep {sweep_dir}\n\n{text}")
    (sweep_dir / SUMMARY_JSON).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    if echo:
        print(f"sweep summary ({sweep_dir / SUMMARY_MD}):\n{text}", end="", flush=True)
    return text


class SweepSummary(Callback):
    """Hydra callback: the sweep's summary table once all its jobs have run (one writer: rank 0 / the submitter)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            summarize(sweep_dir)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m trainer.sweep SWEEP_DIR   (e.g. multirun/<name>/<launch id>)", file=sys.stderr)
        return 2
    summarize(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
