"""Asynchronous checkpoints (checkpoint.async_save): the state is copied to host memory at the save, written by a
background thread per rank while training goes on, and published (index, manifest, meta, rename, `latest`) once
every rank's write is done.

In one process: what the background thread writes is the state at the save, not what training has made of it
since; `latest` moves only at `finish_async`; a disk-full write surfaces there as the one-line error. Through
the trainer on 2 ranks: an asynchronous run writes the same bytes as a synchronous one; a run killed (SIGKILL)
during a background write keeps `latest` on the previous checkpoint and resumes to the uninterrupted run's
losses bit for bit; a disk-full background write stops the run with the one-line error of a synchronous save.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import base_overrides, launch, losses
from trainer.checkpoint import LATEST_FILE, Checkpointer
from trainer.checkpoint_manifest import read_manifest
from trainer.cluster.exit_codes import EXIT_USER
from trainer.elastic_state import write_safetensors
from trainer.errors import UserError

# ---- one process: the Checkpointer with a small tensor state ----------------------------------------------


class _Snapshot:
    def __init__(self, tensors: dict[str, torch.Tensor], fail: BaseException | None) -> None:
        self.tensors, self.fail = tensors, fail

    def write(self, tmp: Path) -> tuple[dict[Path, dict], dict]:
        if self.fail is not None:
            raise self.fail
        path = tmp / "state" / "rank_00000.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return {path: write_safetensors(path, self.tensors, {})}, {"keys": sorted(self.tensors)}

    def publish(self, tmp: Path, everyone: list) -> list[Path]:
        (tmp / "state" / "index.json").write_text(json.dumps(everyone))
        return [tmp / "state" / "index.json"]


class _TensorState:
    """What the Checkpointer needs of a TrainingState, over a dict of tensors that 'training' keeps changing."""

    def __init__(self) -> None:
        base = torch.arange(3000, dtype=torch.float32)
        self.tensors = {"master/w/0": base[:1000], "exp_avg/w/0": base[1000:], "buffer/b": torch.ones(4).bfloat16()}
        self.fail: BaseException | None = None

    def snapshot(self, rank: int, copy: bool = True) -> _Snapshot:
        take = (lambda t: t.clone()) if copy else (lambda t: t)
        return _Snapshot({k: take(t) for k, t in self.tensors.items()}, self.fail)

    def write(self, tmp: Path, rank: int) -> tuple[dict[Path, dict], dict]:
        return self.snapshot(rank, copy=False).write(tmp)

    def publish(self, tmp: Path, everyone: list) -> list[Path]:
        return _Snapshot({}, None).publish(tmp, everyone)

    def train(self) -> None:
        for t in self.tensors.values():
            t.add_(1)


def _state_entries(ckpt: Path) -> dict[str, dict]:
    return {k: v for k, v in read_manifest(ckpt).items() if k.startswith(("state/", "rng/"))}


def test_async_save_writes_the_state_of_its_step_and_publishes_at_finish(tmp_path: Path):
    state = _TensorState()
    sync = Checkpointer(tmp_path / "sync", rank=0, dp_rank=0, keep_last=2)
    sync.save(state, 2, {"data": {}}, {"config.yaml": "x: 1\n"})
    expected = _state_entries(tmp_path / "sync" / "step00000002")

    ckpt = Checkpointer(tmp_path / "async", rank=0, dp_rank=0, keep_last=2)
    ckpt.save_async(state, 2, {"data": {}}, {"config.yaml": "x: 1\n"})
    state.train()  # training goes on while the thread writes: the checkpoint keeps the values of step 2
    assert ckpt.pending_step == 2 and not (tmp_path / "async" / LATEST_FILE).exists()
    while ckpt.writing():
        time.sleep(0.01)
    assert not (tmp_path / "async" / "step00000002").exists()  # written, not yet published
    assert ckpt.finish_async() == tmp_path / "async" / "step00000002"
    assert (tmp_path / "async" / LATEST_FILE).read_text() == "step00000002" and ckpt.pending_step is None
    assert ckpt.finish_async() is None  # nothing pending: nothing to do
    got = _state_entries(tmp_path / "async" / "step00000002")
    assert got["state/rank_00000.safetensors"] == expected["state/rank_00000.safetensors"]

    # the next save (synchronous or not) finishes a pending one first
    ckpt.save_async(state, 4, {"data": {}}, {})
    ckpt.save(state, 6, {"data": {}}, {})
    assert [p.name for p in sorted((tmp_path / "async").glob("step*"))] == ["step00000004", "step00000006"]
    assert (tmp_path / "async" / LATEST_FILE).read_text() == "step00000006"


def test_async_write_error_is_the_one_line_error_at_finish(tmp_path: Path):
    state = _TensorState()
    ckpt = Checkpointer(tmp_path / "ckpt", rank=0, dp_rank=0, keep_last=2)
    ckpt.save(state, 2, {"data": {}}, {})
    full = tmp_path / "ckpt" / ".tmp-step00000004" / "state" / "rank_00000.safetensors"
    state.fail = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))
    ckpt.save_async(state, 4, {"data": {}}, {})  # returns: the error is the background thread's
    with pytest.raises(UserError) as err:
        ckpt.finish_async()
    assert str(err.value) == (
        f"checkpoint.dir: rank 0 could not write checkpoint step00000004: No space left on device ({full}); free "
        "space on that filesystem or fix its permissions, or set checkpoint.dir to a writable directory, then "
        "resume; `latest` still names step00000002, which is intact")
    assert (tmp_path / "ckpt" / LATEST_FILE).read_text() == "step00000002"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step00000002"]
    # a failure that is not about writing files is a bug: raised at the finish with its traceback
    state.fail = ZeroDivisionError()
    ckpt.save_async(state, 6, {"data": {}}, {})
    with pytest.raises(ZeroDivisionError):
        ckpt.finish_async()


# ---- the trainer on 2 ranks (DualPipe, the default job) ---------------------------------------------------

STEPS = ["train.steps=8", "checkpoint.interval=3", "checkpoint.keep_last=3", "train.eval_interval=0",
         "train.eval_batches=0", "parallel.timeline_step=0"]
ASYNC = "checkpoint.async_save=true"


@pytest.fixture(scope="module")
def async_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("async") / "run"
    launch(base_overrides(tiny_data, run_dir, *STEPS, ASYNC), nproc=2)
    return run_dir


@pytest.mark.multiprocess
@pytest.mark.slow
def test_async_checkpoints_equal_sync_checkpoints_bitwise(async_run: Path, tiny_data: Path, tmp_path: Path):
    sync_run = tmp_path / "sync"
    launch(base_overrides(tiny_data, sync_run, *STEPS), nproc=2)
    assert losses(async_run) == losses(sync_run) and sorted(losses(sync_run)) == list(range(1, 9))
    for tag in ("step00000003", "step00000006", "step00000008"):
        a, s = _state_entries(async_run / "checkpoints" / tag), _state_entries(sync_run / "checkpoints" / tag)
        assert {"state/rank_00000.safetensors", "state/rank_00001.safetensors", "state/index.json",
                "rng/rank0.pt", "rng/rank1.pt"} <= set(a)
        assert a == s, tag
    assert (async_run / "checkpoints" / LATEST_FILE).read_text() == "step00000008"
    assert not list((async_run / "checkpoints").glob(".tmp-*"))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_killed_during_async_write_keeps_latest_and_resumes_exactly(async_run: Path, tiny_data: Path,
                                                                    tmp_path: Path):
    # every rank SIGKILLs itself from its background writer of step 6, files written but not published, while
    # the training thread has gone on
    run_dir = tmp_path / "crash"
    args = base_overrides(tiny_data, run_dir, *STEPS, ASYNC)
    crashed = launch(args, nproc=2, env={"DSV3_FAULT_INJECT": "checkpoint_save:6"}, check=False)
    assert crashed.returncode != 0
    ckpts = run_dir / "checkpoints"
    assert (ckpts / LATEST_FILE).read_text() == "step00000003"
    assert not (ckpts / "step00000006").exists()
    resumed = launch([*args, "train.resume=auto"], nproc=2)
    assert "resumed from" in resumed.stdout and "step00000003" in resumed.stdout
    assert not list(ckpts.glob(".tmp-*"))  # the torn save was removed at the start
    assert losses(run_dir) == losses(async_run)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_disk_full_in_the_background_write_is_one_line(tiny_data: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = launch(base_overrides(tiny_data, run_dir, *STEPS, ASYNC, "checkpoint.interval=2"), nproc=2,
                  check=False, env={"DSV3_FAULT_INJECT": "checkpoint_write:1:step:4"})
    assert proc.returncode == EXIT_USER, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    line = f"error: checkpoint.dir: rank 1 could not write checkpoint step00000004: No space left on device " \
           f"({ckpts / '.tmp-step00000004' / 'state' / 'rank_00001.safetensors'}); free space on that filesystem " \
           "or fix its permissions, or set checkpoint.dir to a writable directory, then resume; `latest` still " \
           "names step00000002, which is intact"
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]  # both ranks stop with it; printed once
    assert "Traceback" not in proc.stderr
    assert (ckpts / LATEST_FILE).read_text() == "step00000002"
    assert not (ckpts / ".tmp-step00000004").exists() and not (ckpts / "step00000004").exists()


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """data_prep/atomic.py (shards, manifests): fsync the file, rename it, then fsync the directory."""
    from data_prep import atomic

    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def replace(a, b) -> None:
        calls.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.atomic_write_text(tmp_path / "manifest.json", "{}\n")
    assert calls == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "manifest.json").read_text() == "{}\n" and not list(tmp_path.glob("*.tmp"))
