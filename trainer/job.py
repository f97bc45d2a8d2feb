"""One training job from a composed config: validate, start the process group, build, resume, train, report.

The order is the contract of docs/trainer.md: nothing distributed happens (and nothing is written) until the
config has passed validation, so a mistake costs one line and exit code 2, never a hung rendezvous. Then rank 0
takes the run directory's lock (trainer/cluster/run_lock.py) before the run writes anything into it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.cluster.run_guard import RunGuard
from trainer.cluster.run_guard import check_config as check_cluster_config
from trainer.cluster.run_lock import hold_run_dir
from trainer.config import JobConfig, config_hash, training_identity
from trainer.distributed import DistEnv, dp_rank, init_process_group, prepare_env
from trainer.ds_config import deep_merge
from trainer.errors import UserError, same_on_every_rank
from trainer.redaction import env_paths, redact, redact_override
from trainer.schema_checks import check_finite, check_known_keys
from trainer.validate import Layout, network_model, validate


@dataclass
class RunPaths:
    run_dir: Path
    ckpt_dir: Path
    run_name: str
    group: str | None


def _hydra_paths(cfg: DictConfig) -> tuple[str | None, str | None, str | None]:
    """(output dir, sweep group, job name suffix) from Hydra's runtime config, when running under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None, None, None
    if hc.mode == RunMode.MULTIRUN:
        return hc.runtime.output_dir, str(hc.sweep.dir), str(hc.job.num)
    return None, None, None  # a single run: run_dir, else runs/<name> (stable, so resume=auto finds it)


def resolve_paths(cfg: DictConfig) -> RunPaths:
    output_dir, sweep_dir, job_num = _hydra_paths(cfg)
    run_dir = cfg.run_dir or output_dir or f"runs/{cfg.name}"
    group = cfg.logging.wandb.group
    if group is None and sweep_dir is not None:
        group = sweep_dir.removeprefix("multirun/").replace("/", "-")
    name = cfg.name if job_num is None else f"{cfg.name}-{job_num}"
    ckpt_dir = cfg.checkpoint.dir or str(Path(run_dir) / "checkpoints")
    return RunPaths(Path(run_dir), Path(ckpt_dir), name, group)


def _set_threads(env: DistEnv) -> None:
    """On CPU, split the cores between the local ranks unless OMP_NUM_THREADS says otherwise."""
    if env.device != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or env.world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def prepare(cfg: DictConfig) -> tuple[JobConfig, dict[str, Any], Layout, DistEnv, RunPaths]:
    """Everything that can fail on a user mistake, before any process group: raises UserError & co."""
    env = prepare_env()
    paths = resolve_paths(cfg)
    cfg.run_dir = str(paths.run_dir)
    cfg.checkpoint.dir = str(paths.ckpt_dir)
    with same_on_every_rank():  # the config's own mistakes: rank 0 reports them for all
        check_known_keys(cfg, JobConfig)  # before to_object, which drops keys the schema lacks
        # what the run writes (config.yaml, checkpoints, wandb, meta, summary): secrets redacted
        resolved = redact(OmegaConf.to_container(cfg, resolve=True), env_paths(cfg))
        job: JobConfig = OmegaConf.to_object(cfg)  # builds ModelConfig, which validates itself
        check_finite(job)
        layout = validate(job, env.world_size, env.device)
        check_cluster_config(job.train)
    from trainer.data import check_before_training  # imports torch: only once the config is sound

    check_before_training(job, layout, layout.data_rank(env.rank))  # bad ids, too little validation data
    # checkpoint.dir must take files: found now, not at the first save after the training it was to keep
    # (last: the first check here that writes anything)
    probe = paths.ckpt_dir / f".write-probe-{os.uname().nodename}-{os.getpid()}"
    try:
        paths.ckpt_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        raise UserError("checkpoint.dir", f"cannot write to {paths.ckpt_dir} ({e.strerror or e})",
                        "set checkpoint.dir (or run_dir) to a writable directory with free space, or fix its "
                        "permissions") from None
    return job, resolved, layout, env, paths


def find_resume_point(cfg: JobConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest that verifies against its manifest (collective: every rank
    calls it, the files are hashed split over the ranks). A damaged newest one costs a warning line and the one
    before it is used; none intact is a UserError (exit 2) before anything is written."""
    from trainer.checkpoint import find_intact, resolve_intact

    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return find_intact(ckpt_dir)
    try:
        return resolve_intact(mode)
    except FileNotFoundError as e:
        raise UserError("train.resume", str(e), "pass a checkpoint directory, or train.resume=auto") from None


def check_model_shape(job: JobConfig, resume_path: Path) -> None:
    """A checkpoint loads only into a model of its shape: one line naming the keys, before anything is written."""
    from trainer.checkpoint import model_shape_changes

    changes = model_shape_changes(resume_path, job.model.to_dict())
    if changes:
        keys = ", ".join(f"model.{k}" for k, _, _ in changes)
        saved = ", ".join(f"model.{k}={old}" for k, old, _ in changes)
        now = ", ".join(f"model.{k}={new}" for k, _, new in changes)
        raise UserError(keys, f"{resume_path} holds a model with {saved}, this run has {now} (the weights do not "
                        "fit another shape)", f"set {saved} to resume, or start over with train.resume=never")


def _finished_already(job: JobConfig, env: DistEnv, paths: RunPaths, resume_path: Path,
                      meta: dict[str, Any]) -> dict[str, Any]:
    """A rerun of a job that has reached train.steps: nothing to train. Finish what a kill may have cut short:
    the HF export (redone unless its marker names this checkpoint) and summary.json (its numbers kept, missing
    ones taken from metrics.jsonl; written atomically, so the old one stays until the new one is complete)."""
    summary_file = paths.run_dir / "summary.json"
    previous = _read_summary(summary_file)
    summary = dict(previous or {})
    for key, value in _summary_from_metrics(paths, meta).items():
        if summary.get(key) is None:
            summary[key] = value
    if not env.is_main:
        return summary
    print(f"done already: {resume_path} is step {meta['step']} of train.steps={job.train.steps}", flush=True)
    if job.checkpoint.export_hf:
        from trainer.export_hf import export, export_is_complete

        hf_dir = paths.run_dir / "hf"
        if not export_is_complete(hf_dir, resume_path):
            print(f"the Hugging Face export of {resume_path.name} in {hf_dir} is missing or incomplete: exporting "
                  "it again", flush=True)
            summary["hf_dir"] = str(export(resume_path, hf_dir))
    if summary != previous:
        _write_summary(paths.run_dir, summary)
    return summary


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut by a kill before summaries were written atomically
        return None
    return data if isinstance(data, dict) else None


def _summary_from_metrics(paths: RunPaths, meta: dict[str, Any]) -> dict[str, Any]:
    """The summary's numbers as metrics.jsonl recorded them up to the checkpoint's step (last train and eval
    rows, the data row of step 0)."""
    from trainer.report.plots import read_jsonl

    rows = [r for r in read_jsonl(paths.run_dir / "metrics.jsonl") if r["step"] <= meta["step"]]

    def last(kind: str) -> dict[str, Any]:
        return next((r for r in reversed(rows) if r.get("kind") == kind), {})

    train, ev, data = last("train"), last("eval"), last("data")
    return {
        "step": meta["step"], "tokens_seen": meta.get("tokens_seen"), "train_lm_loss": train.get("train/lm_loss"),
        "val_lm_loss": ev.get("eval/lm_loss"), "val_ppl": ev.get("eval/ppl"),
        "val_mtp_acceptance": ev.get("eval/mtp_acceptance"), "unigram_entropy": data.get("data/unigram_entropy"),
        "tokens_per_s": train.get("train/tokens_per_s"), "checkpoint": str(paths.ckpt_dir / "latest"),
        "run_dir": str(paths.run_dir), "skipped_steps": train.get("train/skipped_steps"),
    }


def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, atomically (temp file, fsync, rename): a kill leaves the previous one whole."""
    from trainer.checkpoint import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return keys


def _warn_config_change(meta: dict[str, Any], resolved: dict[str, Any], log: Any) -> None:
    if meta.get("config_hash") == config_hash(resolved):
        return
    changed = changed_keys(meta.get("identity", {}), training_identity(resolved))
    log(f"warning: resuming with a config that differs from the checkpoint's in: {', '.join(changed) or '?'}")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job to the end; returns the summary (also written to <run_dir>/summary.json on rank 0).

    Exit codes other than 0 and 2 (preemption, a failed peer, a non-finite stop) come from the RunGuard.
    """
    job, resolved, layout, env, paths = prepare(cfg)
    _set_threads(env)
    init_process_group(env)
    # one job per run directory: rank 0 holds <run_dir>/run.lock from here to the end (a held one: exit 2)
    with modelled_network(job), hold_run_dir(paths.run_dir, env), RunGuard(job.train, env) as guard:
        return _run(job, resolved, layout, env, paths, guard)


@contextlib.contextmanager
def modelled_network(job: JobConfig) -> Iterator[Any]:
    """parallel.network: the modelled interconnect under torch.distributed for this job (a multirun's next job
    starts without it)."""
    net = network_model(job)
    if net is None:
        yield None
        return
    import torch

    from parallel.modelled_comm import ModelledComm
    from parallel.network_model import VirtualClock, WallClock

    clock, threads = WallClock(), torch.get_num_threads()
    if job.parallel.network.clock == "virtual":
        torch.set_num_threads(1)  # the virtual clock counts this thread's CPU time: the compute must run here
        clock = VirtualClock()
    try:
        with ModelledComm(net, clock) as comm:
            yield comm
    finally:
        torch.set_num_threads(threads)


def _run(job: JobConfig, resolved: dict[str, Any], layout: Layout, env: DistEnv, paths: RunPaths,
         guard: RunGuard) -> dict[str, Any]:
    import numpy as np

    from trainer.build import build_rank
    from trainer.checkpoint import Checkpointer, find_latest, is_layout_free, read_meta, tag_for
    from trainer.cluster.faults import FaultInjector
    from trainer.cluster.nonfinite import NonFiniteGuard
    from trainer.data import eval_batches, train_stream, unigram_entropy
    from trainer.evaluate import evaluate_schedule
    from trainer.init_from import init_point, initialise
    from trainer.loop import LoopHooks, LoopState, run_loop
    from trainer.report.run_logger import RunLogger
    from trainer.training_state import TrainingState

    random.seed(job.train.seed + env.rank)
    np.random.seed(job.train.seed + env.rank)
    my_dp_rank = dp_rank(env, layout.pp)
    resume_path = find_resume_point(job, paths.ckpt_dir)  # torn saves (.tmp-*) are never candidates
    meta = read_meta(resume_path) if resume_path is not None else {}
    if resume_path is not None and meta["step"] >= job.train.steps:
        # a requeued job (or sweep) that had already finished: keep its summary, redo an export a kill cut short
        return _finished_already(job, env, paths, resume_path, meta)
    if resume_path is not None and not is_layout_free(resume_path):
        check_same_layout(resume_path, meta, layout, job.parallel.schedule)  # a format-1 checkpoint
    if resume_path is not None:
        check_model_shape(job, resume_path)  # before config.yaml is overwritten
    init_path = init_point(job) if resume_path is None else None  # a new run from another run's checkpoint
    if env.is_main:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        (paths.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    checkpointer = Checkpointer(paths.ckpt_dir, env.rank, my_dp_rank, job.checkpoint.keep_last)
    checkpointer.clean_partial()

    logger = RunLogger(
        paths.run_dir, resolved, env.rank, wandb_mode=job.logging.wandb.mode, project=job.logging.wandb.project,
        entity=job.logging.wandb.entity, run_name=paths.run_name, group=paths.group,
        resume_id=meta.get("wandb_run_id"), total_steps=job.train.steps, show_progress=job.logging.progress,
        resume_step=(meta["step"] + 1) if meta else None,
    )
    schedule, ds_config = build_rank(job, layout)
    # DeepSpeed embeds its config in every checkpoint: the pass-through section as written, secrets redacted
    schedule.engine.config = redact(deep_merge(schedule.engine.config, resolved["deepspeed"]))
    ds_config = redact(deep_merge(ds_config, resolved["deepspeed"]))
    if env.is_main:
        (paths.run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1) + "\n")
    stream = train_stream(job, layout, layout.data_rank(env.rank))  # a replica's cp ranks read the same samples
    training_state = TrainingState(schedule, my_dp_rank)  # what checkpoints hold of the schedule
    state = LoopState()
    if resume_path is not None:
        point = checkpointer.load(training_state, resume_path)
        stream.load_state_dict(meta["data"])  # keyed on the global sample index: any dp continues the stream
        state.step, state.tokens_seen = point.step, int(meta.get("tokens_seen", 0))
        logger.write(f"resumed from {resume_path} at step {point.step}{_layout_change(meta, layout, job, point)}")
        _warn_config_change(meta, resolved, logger.write)
    elif init_path is not None:
        logger.write(initialise(init_path, training_state, job.train.init_optimizer))
    faults = FaultInjector.from_env(env.rank, state.step, layout.grad_accum)  # tests only (DSV3_FAULT_INJECT)
    faults.poison_embedding(schedule.module)
    nonfinite = NonFiniteGuard(schedule.engine, job.train.on_nonfinite, job.train.max_consecutive_skips,
                               last_checkpoint=lambda: find_latest(paths.ckpt_dir), say=logger.write)
    entropy = unigram_entropy(list(job.data.dirs), vocab_size=job.model.vocab_size) if env.is_main else math.nan

    def save(s: LoopState) -> None:
        if s.step in (checkpointer.last_saved_step, checkpointer.pending_step):
            return
        meta_out = {"tokens_seen": s.tokens_seen, "data": stream.state_dict(), "config_hash": config_hash(resolved),
                    "identity": training_identity(resolved), "wandb_run_id": logger.wandb_run_id,
                    "world_size": env.world_size, "dp": layout.dp, "pp": layout.pp, "ep": layout.ep, "cp": layout.cp,
                    "ep_ranks_per_node": job.parallel.ep_ranks_per_node,
                    "schedule": job.parallel.schedule, "run_dir": str(paths.run_dir)}
        extra = {"model_config.json": json.dumps(job.model.to_dict(), indent=1) + "\n",
                 "config.yaml": OmegaConf.to_yaml(resolved)}
        faults.break_checkpoint_write(training_state, s.step)
        # written in the background, published by the loop (`finish_save`); the last save of a run (the final
        # step, a preemption) is written now: the loop would wait for it anyway
        if job.checkpoint.async_save and not s.preempted and s.step < job.train.steps:
            checkpointer.save_async(training_state, s.step, meta_out, extra)
        else:
            checkpointer.save(training_state, s.step, meta_out, extra)

    def write_timeline(events: list) -> None:
        from parallel.trace import draw_measured_timeline, exposed_communication, gather_timeline, write_chrome_trace

        everyone = gather_timeline(events)
        if env.is_main:
            step = job.parallel.timeline_step
            write_chrome_trace(everyone, paths.run_dir / "timeline.json")
            draw_measured_timeline(everyone, paths.run_dir / "timeline.png",
                                   f"{job.parallel.schedule} pp={layout.pp}: measured step {step}")
            logger.write(f"timeline of step {step}: {paths.run_dir / 'timeline.json'} (open in Perfetto)")
            comm = exposed_communication(everyone)
            if comm:  # expert parallelism: how long the ranks sat blocked in all-to-alls (host clock: exact on
                # gloo; with NCCL a wait only orders the GPU stream, so a CUDA profile is the measure there)
                exposed = sum(r["exposed"] for r in comm.values()) / len(comm)
                logger.write(f"expert all-to-all in step {step}: {sum(r['count'] for r in comm.values())} "
                             f"transfers, {exposed * 1e3:.1f} ms exposed per rank")

    hooks = LoopHooks(
        stream=faults.wrap_stream(stream),
        log=lambda step, row, kind: logger.log(step, row, kind=kind),
        progress=logger.progress,
        evaluate=lambda: evaluate_schedule(schedule, eval_batches(job, layout, layout.data_rank(env.rank))),
        save=save,
        timeline=write_timeline,
        preempt_requested=lambda: guard.preemption.requested,
        step_done=guard.step_done,
        nonfinite=nonfinite,
        save_writing=checkpointer.writing,
        finish_save=checkpointer.finish_async,
    )
    if env.is_main and not meta:
        logger.log(0, {"unigram_entropy": entropy, "params": sum(p.numel() for p in schedule.module.parameters())},
                   kind="data")
    state = run_loop(schedule, job, layout, state, hooks)
    # DeepSpeed's own teardown (no collective): ZeRO's gradient hooks sit in the parameters' C++ autograd nodes and
    # close over the optimizer, so without it the engine and its process groups outlive the job (an error path
    # that skips this is covered by trainer.distributed.end_process)
    schedule.engine.destroy()
    if state.preempted:
        logger.finish(dict(state.expert_load) if state.expert_load else None)
        guard.exit_preempted(state.step, paths.ckpt_dir / tag_for(state.step))
    summary = {
        "step": state.step, "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds,
        "train_lm_loss": state.last_train.get("lm_loss"), "val_lm_loss": state.last_eval.get("lm_loss"),
        "val_ppl": state.last_eval.get("ppl"), "val_mtp_acceptance": state.last_eval.get("mtp_acceptance"),
        "unigram_entropy": entropy, "tokens_per_s": state.last_train.get("tokens_per_s"),
        "checkpoint": str(paths.ckpt_dir / "latest"), "run_dir": str(paths.run_dir),
        "skipped_steps": state.skipped_steps, "overrides": [redact_override(o) for o in _task_overrides()],
    }
    if job.checkpoint.export_hf and env.is_main and checkpointer.last_saved_step is not None:
        from trainer.export_hf import export

        summary["hf_dir"] = str(export(paths.ckpt_dir, paths.run_dir / "hf"))
    logger.finish(dict(state.expert_load) if state.expert_load else None)
    if env.is_main:
        _write_summary(paths.run_dir, summary)
        print(_summary_line(summary), flush=True)
    return summary


LAYOUT_KEYS = ("schedule", "pp", "dp", "ep", "ep_ranks_per_node", "cp")


def _layout_of(meta: dict[str, Any], layout: Layout | None = None, job: JobConfig | None = None) -> dict[str, Any]:
    if layout is None:
        return {k: meta.get(k) for k in LAYOUT_KEYS}
    return {"schedule": job.parallel.schedule, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep,
            "ep_ranks_per_node": job.parallel.ep_ranks_per_node, "cp": layout.cp}


def _layout_change(meta: dict[str, Any], layout: Layout, job: JobConfig, point: Any) -> str:
    """', layout pp=2 dualpipe -> dp=2 ep=2 none (...)' for the resume line, or ''."""
    old, new = _layout_of(meta), _layout_of(meta, layout, job)
    changed = [k for k in LAYOUT_KEYS if k in meta and old[k] != new[k]]
    if not changed:
        return ""
    what = ", ".join(f"{k} {old[k]} -> {new[k]}" for k in changed)
    rng = "" if point.rng_restored else "; RNG states start fresh (the world size changed)"
    return f" on a new layout ({what}){rng}"


def check_same_layout(path: Path, meta: dict[str, Any], layout: Layout, schedule: str) -> None:
    """A format-1 checkpoint (DeepSpeed's per-layout files, written before layout-free checkpoints) resumes only
    on the layout that wrote it; its next save is layout-free, after which any layout resumes it."""
    for key, now in (("pp", layout.pp), ("ep", layout.ep), ("schedule", schedule), ("dp", layout.dp),
                     ("cp", layout.cp)):
        if meta.get(key, 1 if key == "cp" else now) != now:  # format 1 predates cp: it was 1
            saved = meta.get(key, 1)
            raise UserError(f"parallel.{key}", f"{path} is an older checkpoint (DeepSpeed's per-layout files) saved "
                            f"with {key}={saved}, this run has {now}",
                            f"resume it once with parallel.{key}={saved} (its next checkpoint resumes on any "
                            f"layout), or start over with train.resume=never")


def _task_overrides() -> list[str]:
    """The job's command-line overrides (Hydra's), so a sweep summary can show what each job changed."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def _summary_line(s: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    return (f"done: step {s['step']}, train LM loss {f(s['train_lm_loss'])}, val LM loss {f(s['val_lm_loss'])} "
            f"(ppl {f(s['val_ppl'])}), unigram entropy of the data {f(s['unigram_entropy'])} nats/token; "
            f"run directory {s['run_dir']}")
