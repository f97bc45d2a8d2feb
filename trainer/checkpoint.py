"""Checkpoints: the training state of any layout, saved atomically, resumed exactly, on any layout.

Layout of `checkpoint.dir` (default <run_dir>/checkpoints):

    latest                       the tag of the newest complete checkpoint (replaced atomically)
    step00000100/                one complete checkpoint
        state/index.json             every tensor by single-process name: shape, dtypes, where its pieces lie
        state/rank_<r>.safetensors   the pieces rank r owns (weights, fp32 masters, Adam moments, buffers)
        rng/rank<r>.pt               torch / numpy / python RNG states of global rank r
        model_config.json            the ModelConfig (export and sampling need no Hydra)
        config.yaml                  the resolved job config
        manifest.json                every other file with its size and sha256 (trainer/checkpoint_manifest.py)
        meta.json                    step, tokens, data reader position, layout, config hash, wandb id; written last
    .tmp-step00000200/           a save in progress, or one a crash interrupted (removed on the next start)

The content (`state/`) is trainer/training_state.py's and trainer/elastic_state.py's (docs/checkpoints.md);
this module does the files. Atomic save: every rank writes into `.tmp-<tag>`, fsyncs and hashes its files;
after the ranks agree rank 0 writes the index, manifest.json, then meta.json, renames the directory to `<tag>`
and only then replaces `latest` (write a temp file, fsync, os.replace, fsync the directory). A crash at any
point leaves `latest` on the previous complete checkpoint. A directory counts as complete only if it has
meta.json, so `resume=auto` never picks a torn one. Checkpoints of format 1 (DeepSpeed's per-layout files,
written before the layout-free state) still load, on the layout that wrote them.

Resume takes the newest checkpoint that verifies (`find_intact`: meta.json readable, every file of the
manifest with its size and sha256); a damaged one is reported in one line and the one before it is used.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from trainer.checkpoint_manifest import (
    MANIFEST_FILE,
    DamagedFile,
    hash_files,
    list_files,
    load_torch,
    relative,
    verify,
    write_manifest,
)
from trainer.errors import UserError

META_FILE = "meta.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 2  # 2: the layout-free state (trainer/elastic_state.py); 1: DeepSpeed's per-layout files
_TAG_RE = re.compile(r"^step(\d{8,})$")
FAULT_ENV = "DSV3_FAULT_INJECT"  # "checkpoint_save:<step>": SIGKILL inside that save, once the rank's files are
# written (with async_save: on the background writer, while training goes on); tests of atomicity


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fsync_file(path)
    except OSError:  # some filesystems refuse to fsync directories; the rename is still atomic there
        pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---- RNG states ------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every generator the run may draw from, as tensors / tuples, loadable with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- discovery -------------------------------------------------------------------------------------------


def step_of(path: Path) -> int | None:
    m = _TAG_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def meta_problem(path: Path) -> str | None:
    """Why meta.json does not make `path` a usable checkpoint (missing, cut, corrupt), or None."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return f"no {META_FILE}"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{META_FILE}: unreadable ({_short(e)})"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return f"{META_FILE}: no step in it"
    return None


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(step_of(p), p) for p in ckpt_dir.iterdir() if step_of(p) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints with a meta.json (readable or not), the one `latest` names first, then newest first."""
    found = complete_checkpoints(ckpt_dir)[::-1]
    try:
        named = ckpt_dir / (ckpt_dir / LATEST_FILE).read_text().strip()
    except (OSError, ValueError):  # no `latest` (or a damaged one): newest first
        named = None
    if named in found:
        found.remove(named)
        found.insert(0, named)
    return found


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None.

    Cheap (no hashing; a meta.json that does not parse makes a checkpoint incomplete): for export, sampling
    and messages. Resume uses `find_intact`, which also checks the files against the manifest."""
    return next((c for c in candidates(ckpt_dir) if meta_problem(c) is None), None)


def checkpoint_problem(path: Path) -> str | None:
    """Collective (every rank calls it): None if the checkpoint is intact, else 'incomplete (<why>)' or
    'damaged (<file>: <why>)', the same on every rank."""
    meta = _on_rank0(lambda: meta_problem(path))
    if meta is not None:
        return f"incomplete ({meta})"
    found = verify(path, exclude=(META_FILE,))
    if found is None:  # every file as written: does the index fit the rank files?
        found = _on_rank0(lambda: state_problem(path))
    return None if found is None else f"damaged ({found})"


def state_problem(path: Path) -> str | None:
    """What makes a layout-free state unreadable although every file matches the manifest (an index that names
    a piece its rank file lacks, or a shorter one; a malformed index): '<file>: <why>' (the file relative to the
    checkpoint), or None. Reads the index, the rank files' headers and the last element of every piece: cheap,
    and before a resume writes anything."""
    if not is_layout_free(path):
        return None
    from trainer.elastic_state import INDEX_FILE, STATE_DIR, ElasticStateError, StateReader

    try:
        reader = StateReader(path)
        for name, info in reader.index["tensors"].items():
            for kind, pieces in info["pieces"].items():
                last = torch.empty(1, dtype=getattr(torch, info["dtype"][kind]))
                for _, end, _, _ in pieces:
                    reader.read(name, kind, end - 1, end, last)
        for name in reader.index["buffers"]:
            reader.buffer(name)
    except ElasticStateError as e:
        where, _, why = str(e).partition(": ")
        try:
            return f"{Path(where).relative_to(path).as_posix()}: {why}"
        except ValueError:
            return f"{STATE_DIR}/{INDEX_FILE}: {_short(e)}"
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"{STATE_DIR}/{INDEX_FILE}: malformed ({type(e).__name__}: {_short(e)})"
    return None


def find_intact(ckpt_dir: Path, say: Any = None) -> Path | None:
    """Collective: the newest checkpoint under ckpt_dir that verifies (see `candidates`), None if there is none
    at all. Each damaged or incomplete one skipped costs one warning line (rank 0); when every one is damaged,
    a UserError says which and how to start over."""
    say = say or _say_rank0
    skipped: list[tuple[Path, str]] = []
    for path in _on_rank0(lambda: candidates(ckpt_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in skipped:
                say(f"warning: {bad} is {why}; resuming from {path.name}")
            return path
        skipped.append((path, problem))
    if not skipped:
        return None
    listing = "; ".join(f"{bad.name} is {why}" for bad, why in skipped)
    raise UserError("train.resume", f"no intact checkpoint in {ckpt_dir}: {listing}",
                    "restore the damaged files, or start over with train.resume=never (it overwrites the run)")


def resolve_intact(path: str | Path, say: Any = None) -> Path:
    """Collective: like `resolve_checkpoint`, for resume: a checkpoint directory must verify; a run or checkpoints
    directory gives its newest intact checkpoint (`find_intact`). FileNotFoundError if there is none."""
    p = Path(path)
    if is_complete(p):
        problem = checkpoint_problem(p)
        if problem is not None:
            earlier = _earlier(p)
            raise UserError("train.resume", f"{p} is {problem}",
                            f"pass an earlier checkpoint{f' ({earlier})' if earlier else ''}, or start over with "
                            "train.resume=never")
        return p
    for base in (p, p / "checkpoints"):
        if base.is_dir() and complete_checkpoints(base):
            found = find_intact(base, say)
            if found is not None:
                return found
    return resolve_checkpoint(p)  # raises the FileNotFoundError that says where it looked


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from: a tag directory, a checkpoints directory (its latest) or a run directory."""
    p = Path(path)
    if is_complete(p):
        return p
    for base in (p, p / "checkpoints"):
        found = find_latest(base) if base.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(
        f"{path}: no complete checkpoint (a directory with {META_FILE}) here, in its 'latest' or in "
        f"{p / 'checkpoints'}"
    )


def read_meta(path: Path) -> dict[str, Any]:
    problem = meta_problem(path)
    if problem is not None:
        why = problem.removeprefix(META_FILE + ": ")
        raise UserError(str(path / META_FILE), f"the checkpoint is incomplete ({why})", _fix_for(path))
    return json.loads((path / META_FILE).read_text())


# model settings that change a tensor's shape: a checkpoint loads only into the same values
SHAPE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_nextn_predict_layers",
)  # fmt: skip


def model_shape_changes(path: Path, model: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every shape-defining model setting that differs from the
    checkpoint's model_config.json (none if the checkpoint has no such file)."""
    f = path / "model_config.json"
    if not f.is_file():
        return []
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(str(f), f"unreadable, the file is cut or corrupt ({_short(e)})", _fix_for(path)) from None
    return [(k, saved[k], model.get(k)) for k in SHAPE_KEYS if k in saved and saved[k] != model.get(k)]


def load_file(path: Path, fix: str | None = None, **kwargs: Any) -> Any:
    """torch.load that names the file when it cannot be read (truncated, corrupt): a UserError, no traceback."""
    try:
        return load_torch(path, **kwargs)
    except DamagedFile as e:
        raise damaged_file(e.path, e.problem, fix) from None


def damaged_file(path: Path, problem: str, fix: str | None = None) -> UserError:
    ckpt = next((p for p in Path(path).parents if (p / META_FILE).is_file() or step_of(p) is not None), None)
    return UserError(str(path), problem, fix or (_fix_for(ckpt) if ckpt is not None else "restore the file"))


def _earlier(path: Path) -> Path | None:
    """The newest complete checkpoint before `path` in its directory, if any."""
    step = step_of(path)
    if step is None:
        return None
    older = [c for c in complete_checkpoints(path.parent) if (step_of(c) or 0) < step and meta_problem(c) is None]
    return older[-1] if older else None


def _fix_for(path: Path) -> str:
    earlier = _earlier(path)
    use = f"use the checkpoint before it ({earlier})" if earlier else "restore the file from a copy"
    return f"the checkpoint {path.name} is damaged: {use}, or start over with train.resume=never"


# ---- save / load -----------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    path: Path
    step: int
    meta: dict[str, Any]
    rng_restored: bool = True


def is_layout_free(path: Path) -> bool:
    """A checkpoint any layout resumes (format 2), rather than DeepSpeed's per-layout files (format 1)."""
    from trainer.elastic_state import INDEX_FILE, STATE_DIR

    return (path / STATE_DIR / INDEX_FILE).is_file()


@dataclass
class _Save:
    """One save between its start and its publication: what was frozen at its step, what its write produced."""

    step: int
    tag: str
    tmp: Path
    meta: dict[str, Any]
    extra_files: dict[str, str]
    content: Any  # write(tmp) -> (files, payload) on every rank; publish(tmp, payloads) -> files on rank 0
    rng: dict[str, Any]
    thread: threading.Thread | None = None  # the background writer of an asynchronous save
    error: BaseException | None = None  # a write error (disk full, ...): the ranks agree on it
    crash: BaseException | None = None  # anything else: a bug
    hashed: dict[str, Any] = field(default_factory=dict)  # this rank's manifest entries
    payload: Any = None  # this rank's index entries


class _Live:
    """A state written as it is, on the training thread (`save`): `write(tmp, rank)`, `publish(tmp, everyone)`."""

    def __init__(self, state: Any, rank: int) -> None:
        self.state, self.rank = state, rank

    def write(self, tmp: Path) -> Any:
        return self.state.write(tmp, self.rank)

    def publish(self, tmp: Path, everyone: list[Any]) -> Any:
        return self.state.publish(tmp, everyone)


class Checkpointer:
    """Saves and loads the checkpoints in `ckpt_dir` with the client state described above.

    `save` writes on the training thread; `save_async` (checkpoint.async_save) snapshots the state to host
    memory, writes on a background thread while training goes on, and `finish_async` publishes it once every
    rank's write is done (see "Asynchronous save" in docs/checkpoints.md)."""

    def __init__(self, ckpt_dir: str | Path, rank: int, dp_rank: int, keep_last: int) -> None:
        self.dir = Path(ckpt_dir)
        self.rank, self.dp_rank, self.keep_last = rank, dp_rank, keep_last
        self.last_saved_step: int | None = None
        self._pending: _Save | None = None  # an asynchronous save not yet published

    def clean_partial(self) -> None:
        """Remove `.tmp-*` directories a crashed save left behind (rank 0; call before any save)."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
        _barrier()

    def save(self, state: Any, step: int, meta: dict[str, Any], extra_files: dict[str, str]) -> Path:
        """Save a complete checkpoint for `step` (collective: every rank calls it). `state` writes the content
        (trainer/training_state.py: `write(tmp, rank) -> (files, payload)` on every rank, then
        `publish(tmp, payloads) -> files` on rank 0; `files` is a list of paths, or {path: manifest entry}
        when the writer hashed them itself). A pending asynchronous save is finished first.

        A write that fails on any rank (disk full, permission, read-only filesystem) fails the save on every
        rank alike, with a UserError naming the rank and the file; `latest` and the checkpoint it names are
        untouched, the torn `.tmp-<tag>` is removed. The ranks agree after each phase (one small all-gather),
        so none of them is left waiting in a barrier the failed rank never reaches.
        """
        self.finish_async()
        job = self._begin(lambda: _Live(state, self.rank), step, meta, extra_files)
        self._write(job)
        return self._complete(job)

    def save_async(self, state: Any, step: int, meta: dict[str, Any], extra_files: dict[str, str]) -> None:
        """Start saving `step` and return (collective). `state.snapshot(rank)` copies this rank's content to
        host memory now (and the RNG states, the meta of this step); a background thread writes, fsyncs and
        hashes this rank's files. Nothing is published until `finish_async`: a crash before it leaves `latest`
        on the previous checkpoint. A pending save is finished first."""
        self.finish_async()
        job = self._begin(lambda: state.snapshot(self.rank), step, meta, extra_files)
        job.thread = threading.Thread(target=self._write_behind, args=(job,), name=f"checkpoint-{job.tag}",
                                      daemon=True)
        job.thread.start()
        self._pending = job

    @property
    def pending_step(self) -> int | None:
        """The step of the asynchronous save not yet published, if any."""
        return None if self._pending is None else self._pending.step

    def writing(self) -> bool:
        """This rank's background write is still running (local: the loop reduces it over the ranks)."""
        return self._pending is not None and self._pending.thread is not None and self._pending.thread.is_alive()

    def finish_async(self) -> Path | None:
        """Collective: publish the pending asynchronous save (waiting for this rank's write if it still runs):
        the ranks agree on errors (a write that failed on any rank is the one-line UserError of `save`, on every
        rank), rank 0 gathers every rank's index entries and hashes, writes index.json, manifest.json and
        meta.json, renames the directory and moves `latest`. Returns the checkpoint, None if none was pending.
        Call it at the same point on every rank (the loop does, once no rank is writing)."""
        job, self._pending = self._pending, None
        if job is None:
            return None
        if job.thread is not None:
            job.thread.join()
        return self._complete(job)

    def _begin(self, content: Any, step: int, meta: dict[str, Any], extra_files: dict[str, str]) -> _Save:
        """Collective: an empty `.tmp-<tag>`, then what the save writes, frozen now (`content()`, RNG, meta)."""
        tag = tag_for(step)
        tmp = self.dir / (TMP_PREFIX + tag)

        def prepare() -> None:
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)

        self._agree(_attempt(prepare), tag, tmp)
        meta = {**meta, "step": step, "format": FORMAT_VERSION, "saved_at": time.time()}
        return _Save(step, tag, tmp, meta, dict(extra_files), content(), rng_state())

    def _write_behind(self, job: _Save) -> None:
        """The background writer: `_write` at a lower CPU priority, so that where training keeps every core busy
        (CPU training) the writer takes what it leaves rather than slowing its steps."""
        _lower_thread_priority(BACKGROUND_NICE)
        self._write(job)

    def _write(self, job: _Save) -> None:
        """This rank's files of `job`: written, fsynced and hashed (on the training thread, or on the background
        thread of an asynchronous save). Errors are kept in `job` for `_complete`, nothing raises here."""
        tmp = job.tmp

        def own_files() -> None:
            rng_file = tmp / "rng" / f"rank{self.rank}.pt"
            rng_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(job.rng, rng_file)
            files, job.payload = job.content.write(tmp)
            fsync_file(rng_file)
            hashed = hash_files(tmp, [rng_file])  # read back while the page cache still holds it
            if isinstance(files, dict):  # the writer hashed its files as it wrote them (and fsynced them)
                hashed.update({relative(tmp, Path(p)): entry for p, entry in files.items()})
            else:
                for path in files:
                    fsync_file(path)
                hashed.update(hash_files(tmp, files))
            job.hashed = hashed

        try:
            job.error = _attempt(own_files)
        except BaseException as e:  # not a write error: a bug, raised by `_complete` with its traceback
            job.crash = e
        _maybe_fault(job.step)

    def _complete(self, job: _Save) -> Path:
        """Collective: agree on every rank's write, then rank 0 publishes the checkpoint and moves `latest`."""
        if job.crash is not None:
            raise job.crash
        tag, tmp, final = job.tag, job.tmp, self.dir / job.tag
        entries = self._agree(job.error, tag, tmp, (job.hashed, job.payload))

        def publish() -> None:
            if self.rank != 0:
                return
            for name, text in job.extra_files.items():
                (tmp / name).write_text(text)
                fsync_file(tmp / name)
            for path in job.content.publish(tmp, [payload for _, payload in entries]):
                fsync_file(path)
            manifest = {k: v for rank_entries, _ in entries for k, v in (rank_entries or {}).items()}
            # rank 0's extra files, and any file no rank claimed (a layout this code does not know)
            unclaimed = [tmp / rel for rel in list_files(tmp, (META_FILE, MANIFEST_FILE)) if rel not in manifest]
            manifest.update(hash_files(tmp, unclaimed))
            write_manifest(tmp, manifest)
            atomic_write_text(tmp / META_FILE, json.dumps(job.meta, indent=1, default=str) + "\n")
            for d in sorted({(tmp / rel).parent for rel in manifest}, reverse=True):
                fsync_dir(d)  # rng/, state/, ...: the directory entries of every rank's files
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. an end-of-run save after a resume)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST_FILE, tag)
            self._prune(job.step)

        self._agree(_attempt(publish), tag, tmp)
        self.last_saved_step = job.step
        return final

    def _agree(self, error: BaseException | None, tag: str, tmp: Path, payload: Any = None) -> list[Any]:
        """Collective: raise the same UserError on every rank if any rank's part of the save failed; else
        every rank's `payload` (the same round carries the manifest entries each rank hashed)."""
        mine = (None if error is None else _describe(error), payload)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        failed = [(r, m) for r, (m, _) in enumerate(everyone) if m is not None]
        if not failed:
            return [p for _, p in everyone]
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, what = failed[0]
        latest = self.dir / LATEST_FILE
        kept = f"`latest` still names {latest.read_text().strip()}, which is intact" if latest.is_file() else \
            "no earlier checkpoint exists"
        raise UserError("checkpoint.dir", f"rank {rank} could not write checkpoint {tag}: {what}",
                        f"free space on that filesystem or fix its permissions, or set checkpoint.dir to a writable "
                        f"directory, then resume; {kept}")

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last` checkpoints up to `step`; newer ones (left by a run that resumed from an
        earlier checkpoint because they were damaged) are replaced when the run reaches their step."""
        done = [c for c in complete_checkpoints(self.dir) if (step_of(c) or 0) <= step]
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, state: Any, path: Path) -> ResumePoint:
        """Load weights, optimizer, LR position, counters and (same world size) this rank's RNG state from `path`.
        A layout-free checkpoint loads into any layout; a format-1 checkpoint (DeepSpeed's files) only into the
        layout that wrote it (the caller checks), and its next save is layout-free."""
        meta = read_meta(path)
        step = int(meta["step"])
        if is_layout_free(path):
            state.restore_counters(state.load(path, step), step)
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rng_file = path / "rng" / f"rank{self.rank}.pt"
            same_world = meta.get("world_size", world) == world
            if same_world and rng_file.is_file():
                set_rng_state(load_file(rng_file, weights_only=True))
            return ResumePoint(path=path, step=step, meta=meta, rng_restored=same_world)
        engine = state.engine
        try:
            load_path, _ = engine.load_checkpoint(
                str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except Exception:
            # DeepSpeed's message rarely names the file: find it (a checkpoint without a manifest is checked
            # only by `find_intact`'s zip test, which a file damaged inside passes)
            found = verify(path, exclude=(META_FILE,), only=[rel for rel in list_files(path) if rel.endswith(".pt")])
            if found is None:
                raise
            name, _, why = found.partition(": ")
            raise damaged_file(path / name, why) from None
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint {path}")
        from trainer.expert_files import load_expert_shard

        try:
            load_expert_shard(engine.module, path)
        except DamagedFile as e:
            raise damaged_file(e.path, e.problem) from None
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(load_file(rng_file, weights_only=True))
        return ResumePoint(path=path, step=int(meta["step"]), meta=meta)


BACKGROUND_NICE = 10  # added to the background writer thread's nice value (Linux; its hashing thread inherits it)


def _lower_thread_priority(nice: int) -> None:
    """Raise the calling thread's nice value (Linux: per thread; elsewhere setpriority would renice the whole
    process, so nothing happens). Threads it starts inherit it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass


def _attempt(fn: Any) -> BaseException | None:
    """Run fn; a file-system write error is returned (for the ranks to agree on), anything else raises."""
    try:
        fn()
    except (OSError, RuntimeError) as e:
        if not _is_write_error(e):
            raise
        return e
    return None


def _is_write_error(e: BaseException) -> bool:
    """OSError (ENOSPC, EACCES, EROFS, ...), or torch.save's C++ writer failing (it raises RuntimeError)."""
    return isinstance(e, OSError) or "PytorchStreamWriter" in str(e) or "file write failed" in str(e)


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return " ".join(str(e).split())[:300]


def _short(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:160]


def _say_rank0(line: str) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(line, flush=True)


def _on_rank0(fn: Any) -> Any:
    """fn() on rank 0, its result on every rank (the ranks decide on the same view of the filesystem)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _maybe_fault(step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"checkpoint_save:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_module_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state_dict, model config dict) of a checkpoint, without DeepSpeed or a process group."""
    ckpt = resolve_checkpoint(path)
    if is_layout_free(ckpt):
        return _layout_free_module_state(ckpt), _model_config(ckpt)
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    # the files read here against the manifest (size and sha256): a flipped bit loads silently otherwise
    reads = [f.name for f in files] + ["model_config.json"]
    reads += [f"experts/{f.name}" for f in (ckpt / "experts").glob("*.pt")]
    found = verify(ckpt, exclude=(META_FILE,), only=reads)
    if found is not None:
        name, _, why = found.partition(": ")
        raise damaged_file(ckpt / name, why, _export_fix(ckpt))
    # one file per pipeline rank, each with the single-process names of the stages it holds; DualPipe's
    # two copies of a stage are identical, so the union is the whole model
    module: dict[str, torch.Tensor] = {}
    for f in files:
        module.update(load_file(f, _export_fix(ckpt), map_location="cpu", weights_only=True)["module"])
    from trainer.expert_files import gather_expert_files  # an ep > 1 checkpoint: experts from experts/ep_rank_*.pt

    try:
        module = gather_expert_files(ckpt, module)
    except DamagedFile as e:
        raise damaged_file(e.path, e.problem, _export_fix(ckpt)) from None
    return module, _model_config(ckpt)


def _model_config(ckpt: Path) -> dict[str, Any]:
    cfg_file = ckpt / "model_config.json"
    try:
        return json.loads(cfg_file.read_text())
    except ValueError as e:
        why = f"unreadable, the file is cut or corrupt ({_short(e)})"
        raise damaged_file(cfg_file, why, _export_fix(ckpt)) from None


def _layout_free_module_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The single-process state dict (weights and buffers) from the layout-free state: every rank's slices,
    checked against the manifest first (a flipped bit loads silently otherwise)."""
    from trainer.elastic_state import INDEX_FILE, STATE_DIR, ElasticStateError, read_full

    state_files = [f"{STATE_DIR}/{p.name}" for p in sorted((ckpt / STATE_DIR).iterdir())]
    found = verify(ckpt, exclude=(META_FILE,), only=[*state_files, "model_config.json"])
    if found is not None:
        name, _, why = found.partition(": ")
        raise damaged_file(ckpt / name, why, _export_fix(ckpt))
    try:
        full = read_full(ckpt, ("param",))
    except ElasticStateError as e:  # "<the file at fault>: <what is wrong>": a rank file or the index
        where, _, why = str(e).partition(": ")
        named = Path(where) if why and Path(where).is_relative_to(ckpt) else ckpt / STATE_DIR / INDEX_FILE
        raise damaged_file(named, why or str(e), _export_fix(ckpt)) from None
    return {**full.get("param", {}), **full.get("buffer", {})}


def _export_fix(ckpt: Path) -> str:
    earlier = _earlier(ckpt)
    return f"the checkpoint {ckpt.name} is damaged: " + (f"pass the one before it ({earlier})" if earlier else
                                                        "restore the file from a copy")
