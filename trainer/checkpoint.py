"""Checkpoints: DeepSpeed's save/load plus the trainer's client state, saved atomically, resumed exactly.

Layout of `checkpoint.dir` (default <run_dir>/checkpoints):

    latest                       the tag of the newest complete checkpoint (replaced atomically)
    step00000100/                one complete checkpoint
        mp_rank_00_model_states.pt                     DeepSpeed: weights (router biases included), LR scheduler
        zero_pp_rank_<r>_mp_rank_00_optim_states.pt    DeepSpeed: ZeRO-1 shard of data-parallel rank r
        rng/rank<r>.pt               torch / numpy / python RNG states of global rank r
        model_config.json            the ModelConfig (export and sampling need no Hydra)
        config.yaml                  the resolved job config
        meta.json                    step, tokens, data reader position, config hash, wandb id; written last
    .tmp-step00000200/           a save in progress, or one a crash interrupted (removed on the next start)

Atomic save: every rank writes into `.tmp-<tag>` and fsyncs its files; after a barrier rank 0 writes
meta.json, renames the directory to `<tag>` and only then replaces `latest` (write a temp file, fsync,
os.replace, fsync the directory). A crash at any point leaves `latest` on the previous complete checkpoint.
A directory counts as complete only if it has meta.json, so `resume=auto` never picks a torn one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

META_FILE = "meta.json"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 1
_TAG_RE = re.compile(r"^step(\d{8,})$")
FAULT_ENV = "DSV3_FAULT_INJECT"  # "checkpoint_save:<step>": SIGKILL inside that save (tests of atomicity)


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


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints under ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(step_of(p), p) for p in ckpt_dir.iterdir() if step_of(p) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    latest = ckpt_dir / LATEST_FILE
    if latest.is_file():
        candidate = ckpt_dir / latest.read_text().strip()
        if is_complete(candidate):
            return candidate
    found = complete_checkpoints(ckpt_dir)
    return found[-1] if found else None


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
    return json.loads((path / META_FILE).read_text())


# ---- save / load -----------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    path: Path
    step: int
    meta: dict[str, Any]


class Checkpointer:
    """Saves and loads the engine's checkpoints in `ckpt_dir` with the client state described above."""

    def __init__(self, ckpt_dir: str | Path, rank: int, dp_rank: int, keep_last: int) -> None:
        self.dir = Path(ckpt_dir)
        self.rank, self.dp_rank, self.keep_last = rank, dp_rank, keep_last
        self.last_saved_step: int | None = None

    def clean_partial(self) -> None:
        """Remove `.tmp-*` directories a crashed save left behind (rank 0; call before any save)."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
        _barrier()

    def save(self, engine: Any, step: int, meta: dict[str, Any], extra_files: dict[str, str]) -> Path:
        """Save a complete checkpoint for `step` (collective: every rank calls it).

        A write that fails on any rank (disk full, permission, read-only filesystem) fails the save on every
        rank alike, with a UserError naming the rank and the file; `latest` and the checkpoint it names are
        untouched, the torn `.tmp-<tag>` is removed. The ranks agree after each phase (one small all-gather),
        so none of them is left waiting in a barrier the failed rank never reaches.
        """
        tag = tag_for(step)
        tmp, final = self.dir / (TMP_PREFIX + tag), self.dir / tag

        def prepare() -> None:
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)

        self._agree(_attempt(prepare), tag, tmp)
        meta = {**meta, "step": step, "format": FORMAT_VERSION, "saved_at": time.time()}
        try:
            engine.save_checkpoint(str(self.dir), tag=tmp.name, client_state={"trainer": meta}, save_latest=False)
            error = None
        except (OSError, RuntimeError) as e:
            if not _is_write_error(e):
                raise
            error = e
            _barrier()  # DeepSpeed's closing barrier, where the ranks whose writes succeeded are waiting

        def own_files() -> None:
            rng_dir = tmp / "rng"
            rng_dir.mkdir(exist_ok=True)
            torch.save(rng_state(), rng_dir / f"rank{self.rank}.pt")
            from trainer.expert_files import save_expert_shard

            expert_file = save_expert_shard(engine.module, tmp)
            if expert_file is not None:
                fsync_file(expert_file)
            self._fsync_own_files(tmp)

        error = error or _attempt(own_files)
        _maybe_fault(step)
        self._agree(error, tag, tmp)

        def publish() -> None:
            if self.rank != 0:
                return
            for name, text in extra_files.items():
                (tmp / name).write_text(text)
                fsync_file(tmp / name)
            atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1, default=str) + "\n")
            fsync_dir(tmp / "rng")
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. an end-of-run save after a resume)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST_FILE, tag)
            self._prune()

        self._agree(_attempt(publish), tag, tmp)
        self.last_saved_step = step
        return final

    def _agree(self, error: BaseException | None, tag: str, tmp: Path) -> None:
        """Collective: raise the same UserError on every rank if any rank's part of the save failed."""
        mine = None if error is None else _describe(error)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
        if not failed:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, what = failed[0]
        latest = self.dir / LATEST_FILE
        kept = f"`latest` still names {latest.read_text().strip()}, which is intact" if latest.is_file() else \
            "no earlier checkpoint exists"
        from trainer.errors import UserError

        raise UserError("checkpoint.dir", f"rank {rank} could not write checkpoint {tag}: {what}",
                        f"free space on that filesystem or fix its permissions, or set checkpoint.dir to a writable "
                        f"directory, then resume; {kept}")

    def _fsync_own_files(self, tmp: Path) -> None:
        mine = [tmp / "rng" / f"rank{self.rank}.pt", *tmp.glob(f"zero_pp_rank_{self.dp_rank}_*")]
        if self.dp_rank == 0:  # data-parallel rank 0 of each pipeline rank writes that rank's weights
            mine += list(tmp.glob("mp_rank_*_model_states.pt"))
        for path in mine:
            if path.is_file():
                fsync_file(path)

    def _prune(self) -> None:
        done = complete_checkpoints(self.dir)
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, engine: Any, path: Path) -> ResumePoint:
        """Load weights, optimizer, LR scheduler (DeepSpeed) and this rank's RNG state from `path`."""
        meta = read_meta(path)
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint {path}")
        from trainer.expert_files import load_expert_shard

        load_expert_shard(engine.module, path)
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return ResumePoint(path=path, step=int(meta["step"]), meta=meta)


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


def _maybe_fault(step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"checkpoint_save:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_module_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state_dict, model config dict) of a checkpoint, without DeepSpeed or a process group."""
    ckpt = resolve_checkpoint(path)
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    # one file per pipeline rank, each with the single-process names of the stages it holds; DualPipe's
    # two copies of a stage are identical, so the union is the whole model
    module: dict[str, torch.Tensor] = {}
    for f in files:
        module.update(torch.load(f, map_location="cpu", weights_only=True)["module"])
    from trainer.expert_files import gather_expert_files  # an ep > 1 checkpoint: experts from experts/ep_rank_*.pt

    module = gather_expert_files(ckpt, module)
    model_cfg = json.loads((ckpt / "model_config.json").read_text())
    return module, model_cfg
