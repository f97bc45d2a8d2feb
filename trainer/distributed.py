"""The distributed environment: launcher arguments, rank variables, the process group.

Order matters and is fixed by `trainer/train.py`: `prepare_argv` (before Hydra parses argv) ->
`prepare_env` (rank variables; before validation, which needs the world size) -> `init_process_group`
(after validation, so a config mistake never leaves half a job waiting on a rendezvous) -> ... ->
`end_process` (the last thing a rank does, on every way out).

Why `end_process`: a process group that is never destroyed outlives the interpreter. Gloo's worker threads
(ProcessGroupGloo::runLoop) drop their reference to a finished collective a moment after the main thread has
its result; if that last reference goes while Python is finalizing, freeing the work's tensors needs the GIL,
CPython ends the thread (pthread_exit), the forced unwind crosses the work's noexcept destructor and the
process dies in std::terminate ("terminate called without an active exception", exit -6, which the deepspeed
launcher turns into 250 and a kill of the other ranks). A daemon thread (the watchdog) inside a TCPStore call
at that moment dies the same way. So a rank ends in this order: the watchdog stopped and its thread joined
(RunGuard), the logger finished, then `end_process`: a barrier on the rendezvous store (bounded: a dead or
stuck peer costs `END_TIMEOUT`, never a hang; only where every rank ends together), `destroy_process_group`
plus the group handles DeepSpeed keeps, and a garbage collection, which joins every gloo thread while the
interpreter is still whole (bounded by `DESTROY_TIMEOUT`: a collective still in flight on an error path ends
the process with os._exit instead of a hang). `init_process_group` registers the same end (no barrier) with
atexit for processes that do not end through `trainer.train.main` (a submitit job, a benchmark, a traceback).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallel.spawn import free_port

MULTIRUN_FLAGS = ("-m", "--multirun")


def prepare_argv(argv: list[str] | None = None) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N` (appended by the deepspeed launcher; Hydra rejects it) and
    move `-m`/`--multirun` in front of the overrides (argparse rejects overrides on both sides of a flag,
    as in `scripts/train.sh`'s `checkpoint.export_hf=true -m a=1,2`).

    The value goes to LOCAL_RANK if that is not set already. Edits sys.argv in place unless argv is given.
    """
    args = sys.argv if argv is None else argv
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(args):
            os.environ.setdefault("LOCAL_RANK", args[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    flags = [a for a in out[1:] if a in MULTIRUN_FLAGS]
    args[:] = out[:1] + flags + [a for a in out[1:] if a not in MULTIRUN_FLAGS]
    return args


def map_slurm_env() -> None:
    """srun (one task per GPU) sets SLURM_* but not the torch rank variables; map them when RANK is missing.

    The mapping (RANK, WORLD_SIZE, LOCAL_RANK, NODE_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR from the node list,
    MASTER_PORT from the job id) is `trainer.cluster.slurm.slurm_rank_env`; see docs/cluster.md.
    """
    if "RANK" in os.environ:
        return
    from trainer.cluster.slurm import slurm_rank_env

    os.environ.update(slurm_rank_env(os.environ))


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cpu" | "cuda"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_env() -> DistEnv:
    """Rank variables for any launch: deepspeed/torchrun (already set), srun (mapped) or a plain `python`."""
    map_slurm_env()
    if "RANK" not in os.environ:  # a single process started by hand
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-rank launch; launch the ranks with "
                               "`python -m trainer.launch --nproc-per-node N`")
        os.environ["MASTER_PORT"] = str(free_port())
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # Tell DeepSpeed before it probes for accelerators (it would warn and guess CPU anyway).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DistEnv(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), device)


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on start-up (minutes on a small
    machine, and it needs a compiler). Only DeepSpeed's inference all-reduce uses it, so mark it unavailable:
    training collectives go through torch.distributed (gloo) either way."""
    import deepspeed.ops

    compatible = deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
    compatible["deepspeed_shm_comm"] = False


def init_process_group(env: DistEnv) -> None:
    """deepspeed.init_distributed on gloo (CPU) or nccl (GPU); a no-op when already initialised (multirun)."""
    import warnings

    import torch
    import torch.distributed as dist

    # DeepSpeed's ZeRO all-gather calls a torch API that warns on every step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if env.device == "cuda":
        torch.cuda.set_device(env.local_rank)
    if dist.is_available() and dist.is_initialized():
        return
    import deepspeed

    if env.device == "cpu":
        _skip_shm_comm_build()
    # torch.distributed.nn.functional takes `group=group.WORLD` as default arguments, evaluated at import: imported
    # once the group exists (DeepSpeed does, building an engine), its functions would hold the default group, and
    # its gloo threads, until the interpreter's end (see end_process); imported now, those defaults are None
    import torch.distributed.nn.functional  # noqa: F401
    deepspeed.init_distributed(dist_backend="gloo" if env.device == "cpu" else "nccl", verbose=False)
    global _ended
    _ended = False
    if not _state.get("atexit"):
        atexit.register(_end_at_exit)  # the way out of processes that do not end through trainer.train.main
        _state["atexit"] = True


def dp_rank(env: DistEnv, pp: int) -> int:
    """This rank's data-parallel index. Ranks are pipe-major (rank = pipe * dp + data, DeepSpeed's grid), so
    every pipeline rank of one replica reads the same data; plain data parallel (pp=1): the global rank."""
    return env.rank % (env.world_size // pp)


# ---- the end of a rank ------------------------------------------------------------------------------------------
END_TIMEOUT = 120.0  # s a rank waits at the end for the others (rank 0 may still export / finish wandb)
DESTROY_TIMEOUT = 60.0  # s destroying the process group may take before the process ends without teardown
END_KEY = "dsv3/end"
TEST_ENV = "DSV3_TEARDOWN_TEST"  # tests only, comma-separated: skip (no end_process: the old behaviour),
# late-release (force the order that used to std::terminate), report (print the threads left at the end)
_ended = False
_state: dict[str, Any] = {}
_destroyed = threading.Event()


def exit_status(code: Any) -> int:
    """The process exit status sys.exit(code) gives."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def end_process(code: Any = 0, together: bool = True) -> None:
    """The last thing a rank does (see the module docstring): wait for the other ranks at the rendezvous store
    when every rank ends here together (bounded by END_TIMEOUT), destroy the process group and the group handles
    DeepSpeed keeps, collect garbage (which joins every gloo thread while the interpreter is whole). Idempotent.
    `code` is the exit code the process is about to end with: if the groups cannot be destroyed within
    DESTROY_TIMEOUT (a collective still in flight after an error), or a thread that may sit in a C++ call is
    still alive, the process ends here with os._exit(code) rather than risk std::terminate in the teardown."""
    global _ended
    if _ended:
        return
    _ended = True
    flags = set(filter(None, os.environ.get(TEST_ENV, "").split(",")))
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if "late-release" in flags and together:
        _force_late_release()
    if "skip" in flags:
        return
    if together and dist.get_world_size() > 1:
        _wait_for_peers(END_TIMEOUT)
    # in a helper thread, so that a group whose collective never completes cannot hang the exit
    helper = threading.Thread(target=_destroy_groups, name="dsv3-end-process", daemon=True)
    helper.start()
    helper.join(DESTROY_TIMEOUT)
    ok = not helper.is_alive()
    if ok:
        _destroyed.set()
        if "late-release" in flags:  # the forced race has nothing left to race
            atexit.unregister(sum)
            atexit.unregister(_late_release_at_exit)
    if "report" in flags:
        print(f"end_process: rank {os.environ.get('RANK')}: threads left: {_thread_names()} (Python: "
              f"{sorted(t.name for t in threading.enumerate())})", file=sys.stderr, flush=True)
    stuck = [t.name for t in threading.enumerate() if t.name in ("dsv3-watchdog", "dsv3-end-process")]
    if not ok or stuck:
        print(f"error: rank {os.environ.get('RANK', '?')}: "
              + ("the process group could not be destroyed within "
                 f"{DESTROY_TIMEOUT:g} s (a collective still in flight)" if not ok else f"{stuck} still running")
              + f"; exiting with code {exit_status(code)} without interpreter teardown", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_status(code))


def _end_at_exit() -> None:
    """atexit: the end of a process that did not call end_process (no barrier: the ranks may not end together).
    A traceback printed before this keeps its frames (and the engine's groups) in sys.last_*: drop them."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    end_process(1, together=False)


def _wait_for_peers(timeout: float) -> bool:
    """A barrier on the rendezvous store, not on the process group: it cannot be confused with a collective
    still in flight, and it gives up after `timeout` s or when the store's host (rank 0) is gone."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_store

    world, rank = dist.get_world_size(), dist.get_rank()
    deadline = time.monotonic() + timeout
    try:
        store = _get_default_store()
        store.add(END_KEY, 1)
        while store.add(END_KEY, 0) < world:
            if time.monotonic() > deadline:
                print(f"warning: rank {rank}: not every rank reached the end within {timeout:g} s; leaving anyway",
                      file=sys.stderr, flush=True)
                return False
            time.sleep(0.05)
        store.add(END_KEY + "/seen", 1)
        if rank == 0:  # the store's host leaves last, so that no rank asks a store that is gone
            while store.add(END_KEY + "/seen", 0) < world and time.monotonic() < deadline:
                time.sleep(0.02)
    except Exception:  # the store is gone: its host, rank 0, died
        return False
    return True


def _destroy_groups() -> None:
    """Destroy every process group and drop the handles DeepSpeed keeps (its group caches); the last reference
    to a gloo group joins its threads (gc: the engine's reference cycles).

    A DeepSpeed engine nobody destroyed (a job that ended by an error) is destroyed here first: its ZeRO gradient
    hooks sit in C++ autograd nodes of the parameters and close over the optimizer, a cycle through C++ that the
    garbage collector cannot see, so the engine, the model (each parameter keeps its `_dp_group`) and their
    process groups would otherwise live, with their gloo threads, until the interpreter's end."""
    import gc

    import torch.distributed as dist

    gc.collect()
    _destroy_engines()
    dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) or name in ("mpu", "mesh_device"):
                setattr(groups, name, {} if isinstance(value, dict) else None)
    gc.collect()


def _force_late_release() -> None:
    """Test only (DSV3_TEARDOWN_TEST=late-release, two ranks): force the exit order that used to std::terminate.

    The race, in torch 2.13: gloo's worker thread drops its reference to a finished collective's tensors after the
    main thread has the result. Dropping a C++ reference to a tensor Python also holds decrefs its PyObject
    (torch/csrc/PyInterpreter.cpp: `if (!Py_IsInitialized()) return; gil_scoped_acquire gil; Py_DECREF(...)`).
    If the worker passes that check while the main thread, holding the GIL, is on its way out of the interpreter,
    it gets the GIL only after Python has started finalizing; CPython then ends the thread (pthread_exit), the
    forced unwind crosses a noexcept destructor (~AsyncWork) and std::terminate aborts the process.

    Forced: rank 1 leaves an all-reduce of a tensor Python holds in flight and makes its last exit function (run
    after every other one) tell rank 0 to join it, hold the GIL in C code while gloo's worker completes the work
    and waits for the GIL, and leave output for the interpreter to flush while finalizing (the write releases
    the GIL to the waiting worker). Without end_process rank 1 aborts every time; with it, the group (and its
    worker) is gone before the exit functions run. Rank 0 joins when told to, or as soon as rank 1 ends in order
    (it reached end_process's barrier). Only on the ways out every rank takes together (not the atexit path)."""
    import datetime

    import torch
    import torch.distributed as dist
    from torch.distributed import TCPStore
    from torch.distributed.distributed_c10d import _get_default_store

    assert dist.get_world_size() == 2, "late-release is a two-rank test hook"
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    if dist.get_rank() == 1:
        _state["late_tensor"] = tensor = torch.ones(256)  # held by Python, as the model's tensors are
        dist.all_reduce(tensor, async_op=True)  # the handle is dropped at once: gloo's worker owns the work
        atexit._run_exitfuncs()  # the exit functions registered so far run now: ours are then the last ones
        # called from C, last: holds the GIL with no bytecode (no GIL hand-over) until Python finalizes, while
        # gloo's worker completes the work and waits for the GIL
        atexit.register(sum, range(60_000_000))
        atexit.register(_late_release_at_exit, store)  # runs just before it
        return
    deadline, go = time.monotonic() + 30, "dsv3/test/late-release-go"
    while not store.check([go]) and _get_default_store().add(END_KEY, 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    dist.all_reduce(torch.ones(256))


def _late_release_at_exit(store: Any) -> None:
    """Test only: the last Python exit function of rank 1 under late-release (see _force_late_release)."""
    # output the interpreter flushes while finalizing: the write releases the GIL to the waiting worker
    print(f"rank {os.environ.get('RANK')}: late-release: exit functions done, the interpreter finalizes next")
    store.set("dsv3/test/late-release-go", "1")  # rank 0 joins the collective (unless the group is gone)


def _destroy_engines() -> None:
    """engine.destroy() (idempotent, no collective) on every DeepSpeed engine still alive."""
    import gc

    engine_type = getattr(sys.modules.get("deepspeed.runtime.engine"), "DeepSpeedEngine", None)
    if engine_type is None:
        return
    for engine in [o for o in gc.get_objects() if issubclass(type(o), engine_type)]:
        try:
            engine.destroy()
        except Exception as err:  # the teardown goes on: at worst this engine's groups live to the end
            print(f"warning: destroying a DeepSpeed engine failed ({type(err).__name__}: {err})", file=sys.stderr,
                  flush=True)


def _thread_names() -> list[str]:
    """The names of this process's OS threads (Linux; gloo's are pt_gloo_runloop and gloo_tcp_loop)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # a thread that just ended
            pass
    return sorted(names)
