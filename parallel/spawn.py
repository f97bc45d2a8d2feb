"""Start N gloo processes on this machine running one function; collect each rank's result or its error.

The one harness for CPU multi-process tests and benchmarks (bench/ may not import tests/, so it lives here),
and the one free-port helper for anything that needs a rendezvous port.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it; a race with another process is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    import torch
    import torch.distributed as dist

    # the variables a launcher sets, so code under test reads its rank the way it does in a real job
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # N ranks share a few cores; more threads per rank only oversubscribe them
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # plain pickle: a torch multiprocessing queue would share tensors through file descriptors that vanish
        # when this process exits before the parent has read them
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 240.0, join_timeout: float = 10.0) -> list:
    """fn(rank, world, *args) on `world` fresh spawned processes joined in one gloo group; their results in
    rank order. `fn` and its results must pickle. The first rank error is raised as RuntimeError carrying that
    rank's traceback; `timeout` bounds the wait for each result, `join_timeout` each rank's exit (a benchmark
    tearing down big engines may need more) before a straggler is killed."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork would copy the parent's torch threads and any initialised state
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        # a rank blocked in a collective on a failed peer never exits on its own
        for p in procs:
            p.join(timeout=join_timeout)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world)]
