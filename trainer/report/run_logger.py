"""RunLogger: the one place a run's metrics leave the process: metrics.jsonl, wandb, a tqdm bar, final plots.

Only global rank 0 logs; on every other rank each method returns at once, so the training loop can call the
logger unconditionally. wandb is initialised here (not by DeepSpeed), offline by default: nothing needs a
network or an API key, and `wandb sync <run_dir>/wandb/offline-run-*` uploads later.

metrics.jsonl holds one JSON object per `log` call: {"step", "time" (unix s), "kind", "<kind>/<name>": value}.
Non-finite values are written as null so every line is strict JSON. Resume keeps the file one row per
(step, kind): rows at or after the first step the resumed run logs are dropped before anything is appended
(see `RunLogger.__init__` and docs/metrics.md).

wandb never stands between the training loop and its checkpoint: its service process is a child of rank 0, in
the job, and a cluster's preemption signal (Slurm signals every process of the job step; DeepSpeed's launch.py
terminates whole process trees) ends it with the ranks. A wandb call that fails after `wandb.init` (log, the
final images, finish) costs one warning line and turns wandb off for the rest of the run; metrics.jsonl keeps
every row.
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.report.plots import plot_expert_load, plot_loss_curve, read_jsonl

# A config key whose name contains one of these (case-insensitive) is dropped before the config reaches wandb.
SECRET_WORDS = ("key", "token", "secret", "password")
WANDB_MODES = ("offline", "online", "disabled")
_OPEN: weakref.WeakSet[RunLogger] = weakref.WeakSet()  # enabled loggers not finished yet (finish_open)


def is_secret_name(name: Any) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in SECRET_WORDS)


def redact_secrets(config: Any) -> Any:
    """A copy of `config` without any key that looks like a credential, at any depth (dicts inside lists too).

    Deliberately broad: it also drops harmless names such as `bos_token_id` or `tokenizer`; only what is
    sent to wandb is filtered, the resolved config the trainer saves in the run directory keeps everything.
    """
    if isinstance(config, Mapping):
        return {k: redact_secrets(v) for k, v in config.items() if not is_secret_name(k)}
    if isinstance(config, Sequence) and not isinstance(config, str | bytes):  # lists, OmegaConf ListConfig
        return [redact_secrets(v) for v in config]
    return config


def _number(value: Any) -> Any:
    """Python scalar from a float / int / numpy scalar / one-element tensor; other values unchanged."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if hasattr(value, "numel") and value.numel() == 1:  # torch.Tensor, without importing torch
        return value.item()
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.size == 1):
        return value.item()
    return value


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _fmt(value: Any) -> str:
    value = _number(value)
    if isinstance(value, float | int) and not isinstance(value, bool):
        if value != value:  # NaN
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


class RunLogger:
    """Rank-0 metrics sink: metrics.jsonl + wandb + tqdm bar + end-of-run plots (a no-op on other ranks).

    Args:
        run_dir: the run directory (metrics.jsonl, plots and the wandb folder go here).
        config: the resolved run config; sent to wandb with credential-like keys removed.
        rank: global rank of this process; only rank 0 does anything.
        wandb_mode: "offline" (default, no network), "online", or "disabled" (no wandb at all).
        resume_id: the wandb run id saved in the checkpoint; the same run is continued (`resume="allow"`).
        total_steps: the last step of the run, for the progress bar's ETA (0: unknown).
        resume_step: first step the resumed run will log; rows with step >= it are dropped at once. Without
            it the same cut happens at the first `log` call, using that call's step.
    """

    def __init__(
        self,
        run_dir: Path | str,
        config: Mapping[str, Any],
        rank: int,
        wandb_mode: str = "offline",
        project: str = "dsv3-trainer",
        entity: str | None = None,
        run_name: str | None = None,
        group: str | None = None,
        resume_id: str | None = None,
        total_steps: int = 0,
        show_progress: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.rank = rank
        self.enabled = rank == 0
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.run_name = run_name or self.run_dir.name
        self.total_steps = total_steps
        self.show_progress = show_progress
        self.wandb_run_id: str | None = None
        self._run: Any = None
        self._bar: Any = None
        self._fh: Any = None
        self._cut_pending = True  # the first log() trims rows a crashed run wrote past the resume point
        self._step_metric_kinds: set[str] = set()
        self._finished = False
        if not self.enabled:
            return
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._drop_rows_from(resume_step)
            self._cut_pending = False
        if wandb_mode != "disabled":
            self._init_wandb(config, wandb_mode, project, entity, group, resume_id)
        _OPEN.add(self)

    # ---- setup -------------------------------------------------------------------------------------
    def _init_wandb(self, config: Mapping[str, Any], mode: str, project: str, entity: str | None,
                    group: str | None, resume_id: str | None) -> None:
        # Environment first: wandb reads some of these at import time, and its service process inherits them.
        os.environ["WANDB_SILENT"] = "true"
        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"
            os.environ["WANDB_ERROR_REPORTING"] = "false"  # no Sentry reports either
        import wandb

        try:
            self._run = wandb.init(
                project=project,
                entity=entity,
                name=self.run_name,
                group=group,
                id=resume_id,
                resume="allow",
                config=redact_secrets(dict(config)),
                dir=str(self.run_dir),
                mode=mode,
                settings=wandb.Settings(silent=True),
            )
        except Exception as err:  # no network / no login in online mode: one line, and the way out
            raise RuntimeError(
                f"wandb.init failed in {mode} mode ({type(err).__name__}: {err}); use wandb mode 'offline' "
                "(upload later with `wandb sync`) or 'disabled'"
            ) from err
        self.wandb_run_id = self._run.id
        self._run.define_metric("step")

    # ---- JSONL -------------------------------------------------------------------------------------
    def _drop_rows_from(self, step: int) -> None:
        """Keep only rows with step < `step` (and no torn lines); rewrite atomically if anything goes."""
        if not self.jsonl_path.is_file():
            return
        text = self.jsonl_path.read_text()
        lines = text.splitlines()
        rows = map(_parse, lines)
        keep = [line for line, row in zip(lines, rows) if row is not None and row["step"] < step]
        if len(keep) == len(lines) and (not text or text.endswith("\n")):
            return
        tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.jsonl_path)

    @staticmethod
    def _key(kind: str, name: str) -> str:
        return name if name.startswith(kind + "/") else f"{kind}/{name}"

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        """Append one row to metrics.jsonl (flushed) and log the same values to wandb, keys under `kind/`."""
        if not self.enabled or self._finished:
            return
        if self._cut_pending:
            self._drop_rows_from(step)
            self._cut_pending = False
        if self._fh is None:
            self._fh = self.jsonl_path.open("a")
        values = {self._key(kind, k): _number(v) for k, v in metrics.items()}
        row = {"step": int(step), "time": round(time.time(), 3), "kind": kind}
        row.update({k: _json_safe(v) for k, v in values.items()})
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._run is not None:
            try:
                if kind not in self._step_metric_kinds:
                    # Plot against our step, not wandb's internal counter (which cannot go back after a resume).
                    self._run.define_metric(f"{kind}/*", step_metric="step")
                    self._step_metric_kinds.add(kind)
                self._run.log({"step": int(step), **values})
            except Exception as err:
                self._wandb_failed(err, f"log at step {step}")

    # ---- console -----------------------------------------------------------------------------------
    def progress(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
        """Move the bar to `step` (steps done) and show `postfix` (e.g. loss, tok/s); ETA comes from tqdm."""
        if not self.enabled or not self.show_progress or self._finished:
            return
        if self._bar is None:
            from tqdm import tqdm

            # Start at the first reported step so a resumed run's ETA uses only its own rate.
            self._bar = tqdm(total=self.total_steps or None, initial=step, unit="step", dynamic_ncols=True,
                             desc=self.run_name, mininterval=1.0)
        else:
            self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """Print a line on rank 0 without tearing the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    # ---- end of run --------------------------------------------------------------------------------
    def finish(self, expert_load_history: Mapping[int, Any] | np.ndarray | None = None,
               exit_code: int | None = None) -> None:
        """Write loss_curve.png (and expert_load.png from the counts given), log them, close bar and wandb.

        `expert_load_history`: {layer: counts [experts]} or {layer: [steps, experts]} (summed), or an array
        [moe_layers, experts] / [steps, moe_layers, experts]; final-step or accumulated counts both work.
        `exit_code`: the process's, when it ends otherwise than by success (wandb marks the run failed).
        """
        if not self.enabled or self._finished:
            return
        self._finished = True
        _OPEN.discard(self)
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        images: dict[str, Path] = {}
        try:
            images["plots/loss_curve"] = plot_loss_curve(self.jsonl_path, self.run_dir / "loss_curve.png",
                                                         title=f"{self.run_name}: loss")
            if expert_load_history is not None and len(expert_load_history) > 0:
                images["plots/expert_load"] = plot_expert_load(
                    expert_load_history, self.run_dir / "expert_load.png", title=self.run_name
                )
        except Exception as err:  # a plot must not lose the wandb run at the very end of training
            print(f"warning: end-of-run plots failed ({type(err).__name__}: {err}); metrics.jsonl is intact",
                  flush=True)
        if self._run is not None:
            import wandb

            try:
                if images:
                    self._run.log({k: wandb.Image(str(p)) for k, p in images.items()})
                self._run.finish(exit_code=exit_code)
                self._run = None
                # finish() can return before wandb's service process has written everything; teardown waits
                # for it, so the offline run directory is complete when the trainer exits (or a test reads it)
                wandb.teardown()
            except Exception as err:
                self._wandb_failed(err, "finish")

    def _wandb_failed(self, err: Exception, where: str) -> None:
        """A wandb call raised (its service process is gone, typically signalled with the job): one warning line,
        wandb off for the rest of this run. Ending the run and the session (each may raise again, quietly) stops
        wandb's console capture, which would otherwise keep writing to the dead service, and lets a later job of
        the same process (a multirun) start a fresh service."""
        import wandb

        run, self._run = self._run, None
        self.write(f"warning: wandb failed in {where} ({type(err).__name__}: {err}); wandb is off for the rest of this "
                   "run (its service process was probably signalled with the job), metrics.jsonl keeps every row")
        for end in (lambda: run.finish(exit_code=1), wandb.teardown):
            try:
                end()
            except Exception:
                pass

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl written so far (rank 0; [] elsewhere)."""
        return read_jsonl(self.jsonl_path) if self.enabled else []


def finish_open(exit_code: int | None = None) -> None:
    """Finish every logger of this process not finished yet (a run that ends by an error or a stop): its plots,
    the bar, wandb (marked failed with `exit_code`), before the process group goes. A plot or wandb failure
    costs a warning line, never the exit code the run is ending with."""
    for logger in list(_OPEN):
        try:
            logger.finish(exit_code=exit_code)
        except Exception as err:
            print(f"warning: finishing the run logger failed ({type(err).__name__}: {err})", flush=True)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None
