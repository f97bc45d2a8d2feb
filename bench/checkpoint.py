"""checkpoint: what a checkpoint costs the training (synchronous vs asynchronous save), and how fast a save writes.

Setup: the `small` model preset (conf/model/small.yaml) cut to 2 layers, 16 routed experts and a 4096-token
vocabulary (22.7M parameters: its layout-free state, weights + fp32 masters + Adam moments, is 363 MB, half per
rank; a synchronous save takes about 1 s on a 2-core machine), ZeRO-1 data parallel over 2 CPU ranks
(deepspeed launcher, gloo, one torch thread per rank), fp32, synthetic tokens; checkpoints go to a temporary
directory on the machine's disk. Each training step is what trainer/loop.py runs: `train_batch`, the router
bias update, and the per-step all-reduce of the stop flags with "my background checkpoint write is still
running" (a pending asynchronous save is published once no rank is writing). Every window starts and ends
with a barrier; synchronous and asynchronous windows alternate.

- `blocked_async_over_sync` (goal <= 0.2): the wall time that a save adds to N steps, asynchronous over
  synchronous. Overhead = (a save, then N steps) minus (N steps): each save window runs between two plain
  windows and is compared with their mean (the load of a shared machine drifts); medians over all rounds.
  The asynchronous overhead is all of it: the snapshot to host memory, the background writer competing with
  training for the cores, the publication and, if the write outlasts the N steps, the wait for it at the end
  of the window. On a shared machine the windows vary by more than the overheads: the quartiles are in the
  JSON, and so is `cpu_overhead_s`, the CPU time (both ranks, every thread) that a save adds, which other
  processes' load does not change: the asynchronous save does the same work, it overlaps it. And
  `thread_blocked_async_over_sync`: the time the training thread spends in the save call and in the
  publication (`async_call_s` + `async_publish_s`) over the synchronous save's: the overhead where training
  leaves a core to the writer (GPU training), without the contention of a 2-core machine.
- `ratio` (goal >= 0.8, `ours` / `peer` in MB/s): the synchronous save's bytes/s (`Checkpointer.save`: each
  rank's state file and RNG file, fsynced, sha256 hashed as written; rank 0's index, manifest, meta, rename and
  `latest`) over `torch.save` of the same tensors (each rank its own, both ranks at once) to the same disk,
  fsynced; bytes = the state tensors' bytes, the same for both.

    python -m bench checkpoint [--repeats N]      # writes bench/results/checkpoint.json
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPROC = 2
STEPS = 1  # N: steps in each window (the asynchronous write ends within it: `async_steps_to_publish`)
ROUNDS_PER_REPEAT = 3  # (sync, plain, async, plain) windows per repeat: short windows, many of them
WARMUP_STEPS = 2
OVERRIDES = ["model=small", "model.num_hidden_layers=2", "model.vocab_size=4096", "model.n_routed_experts=16",
             "parallel=dp", "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4",
             "train.eval_batches=0", "logging.wandb.mode=disabled", "logging.progress=false"]


def run(repeats: int = 5) -> dict:
    from bench.common import result
    from parallel.spawn import free_port

    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        out = Path(tmp) / "raw.json"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", "--num_gpus",
               str(NPROC), "--master_port", str(free_port()), "--module", "bench.checkpoint", "--worker",
               "--repeats", str(repeats), "--dir", tmp, "--out", str(out)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        m = json.loads(out.read_text())
    med = {k: statistics.median(v) for k, v in m["windows"].items()}
    over_sync, over_async = (statistics.median(m["overhead"][k]) for k in ("sync", "async"))
    mb = m["bytes"] / 1e6
    ours, peer = mb / statistics.median(m["save_s"]), mb / statistics.median(m["torch_save_s"])
    return result(
        "checkpoint", ours=ours, peer=peer, unit="MB/s (synchronous save vs torch.save, fsynced)", goal=">= 0.8",
        repeats=repeats,
        blocked_async_over_sync=over_async / over_sync, blocked_goal="<= 0.2",
        thread_blocked_async_over_sync=(statistics.median(m["save_async_call_s"]) + statistics.median(m["publish_s"]))
        / statistics.median(m["save_s"]),
        overhead_s={"sync": over_sync, "async": over_async},
        overhead_quartiles_s={k: statistics.quantiles(v, n=4) for k, v in m["overhead"].items()},
        cpu_overhead_s={k: statistics.median(v) for k, v in m["cpu_overhead"].items()},
        window_s={k: round(v, 4) for k, v in med.items()},
        async_call_s=statistics.median(m["save_async_call_s"]), async_finish_s=statistics.median(m["finish_s"]),
        async_publish_s=statistics.median(m["publish_s"]),
        async_steps_to_publish=statistics.median(m["steps_to_publish"]), step_s=med["base"] / STEPS,
        save_s=statistics.median(m["save_s"]), torch_save_s=statistics.median(m["torch_save_s"]),
        state_bytes=m["bytes"], params=m["params"], ranks=NPROC, steps_per_window=STEPS,
        rounds=repeats * ROUNDS_PER_REPEAT, raw=m,
        config=" ".join(OVERRIDES) + " (ZeRO-1, fp32, 1 torch thread per rank)",
    )


# ---- the worker (one per rank, started by the deepspeed launcher) ---------------------------------------


def _job_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=OVERRIDES))


def _synthetic(job, layout, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (layout.micro_batch_size, job.train.seq_len + 1 + job.model.num_nextn_predict_layers)
    while True:
        tokens = torch.randint(0, job.model.vocab_size, shape, generator=g)
        yield {"tokens": tokens, "loss_mask": torch.ones(shape, dtype=torch.float32)}


def worker(repeats: int, work_dir: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from trainer.build import build_rank
    from trainer.checkpoint import Checkpointer
    from trainer.distributed import dp_rank, init_process_group, prepare_argv, prepare_env
    from trainer.load_balance import moe_routers, update_router_biases
    from trainer.loop import _dp_mean
    from trainer.training_state import TrainingState
    from trainer.validate import validate

    prepare_argv()
    env = prepare_env()
    torch.set_num_threads(1)
    job = _job_config()
    layout = validate(job, env.world_size, env.device, check_data=False)
    init_process_group(env)
    schedule, _ = build_rank(job, layout)
    routers = moe_routers(schedule.module)
    my_dp = dp_rank(env, layout.pp)
    data = _synthetic(job, layout, seed=env.rank)
    state = TrainingState(schedule, my_dp)
    root = Path(work_dir)
    ckpt = Checkpointer(root / "ckpt", env.rank, my_dp, keep_last=1000)  # removed between windows, untimed
    published: list[float] = []  # seconds the publication of an asynchronous save took (in the loop)

    def step() -> None:  # trainer/loop.py's step, the flags reduction and the publication included
        losses = schedule.train_batch(data)
        update_router_biases(routers, group=schedule.counts_group)
        _, (writing,) = _dp_mean(losses, [ckpt.writing()], env.world_size)
        if not writing:
            t = time.perf_counter()
            if ckpt.finish_async() is not None:
                published.append(time.perf_counter() - t)

    def clean() -> None:
        dist.barrier()
        if env.rank == 0:
            for p in root.iterdir():
                if p.is_dir():
                    shutil.rmtree(p)
        dist.barrier()

    saves = 0

    def window(mode: str) -> dict[str, float]:
        nonlocal saves
        clean()
        published.clear()
        times: dict[str, float] = {}
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        if mode != "base":
            saves += 1
            save = ckpt.save_async if mode == "async" else ckpt.save
            save(state, saves, {"data": {}}, {"config.yaml": "bench\n"})
            times["call"] = time.perf_counter() - start
        for i in range(STEPS):
            step()
            if mode == "async" and published and "steps_to_publish" not in times:
                times["steps_to_publish"], times["publish"] = i + 1, published[0]
        t = time.perf_counter()
        if ckpt.finish_async() is not None:  # the write outlasted the window: wait for it here
            times["steps_to_publish"], times["publish"] = STEPS + 1, 0.0
        times["finish"] = time.perf_counter() - t
        dist.barrier()
        times["total"] = time.perf_counter() - start
        spent = torch.tensor([time.process_time() - cpu], dtype=torch.float64)  # every thread of the process
        dist.all_reduce(spent)
        times["cpu"] = float(spent.item())  # both ranks together
        return times

    def torch_save() -> float:
        """The peer: torch.save of this rank's state tensors (host copies, as the async snapshot holds them)."""
        clean()
        tensors = state.snapshot(env.rank).rank_state.tensors
        path = root / "peer" / f"rank_{env.rank:05d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        start = time.perf_counter()
        torch.save(tensors, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        dist.barrier()
        return time.perf_counter() - start

    for _ in range(WARMUP_STEPS):  # the Adam moments exist from the first step on
        step()
    mine = sum(t.numel() * t.element_size() for t in state.snapshot(env.rank, copy=False).rank_state.tensors.values())
    total = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(total)
    res: dict = {"windows": {"base": [], "sync": [], "async": []}, "overhead": {"sync": [], "async": []},
                 "cpu_overhead": {"sync": [], "async": []},
                 "save_s": [], "save_async_call_s": [], "finish_s": [], "publish_s": [], "steps_to_publish": [],
                 "torch_save_s": [],
                 "bytes": int(total.item()), "params": sum(p.numel() for p in schedule.module.parameters())}
    base = window("base")
    res["windows"]["base"].append(base["total"])
    for r in range(repeats * ROUNDS_PER_REPEAT):
        for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
            times = window(mode)
            after = window("base")  # each save window between two plain ones: slow drifts cancel
            res["windows"][mode].append(times["total"])
            res["windows"]["base"].append(after["total"])
            for key, what in (("overhead", "total"), ("cpu_overhead", "cpu")):
                res[key][mode].append(times[what] - (base[what] + after[what]) / 2)
            base = after
            if mode == "sync":
                res["save_s"].append(times["call"])
            else:
                res["save_async_call_s"].append(times["call"])
                res["finish_s"].append(times["finish"])
                res["publish_s"].append(times.get("publish", 0.0))
                res["steps_to_publish"].append(times.get("steps_to_publish", 0))
        res["torch_save_s"].append(torch_save())
        if env.rank == 0:
            o = {k: round(v[-1], 2) for k, v in res["overhead"].items()}
            print(f"checkpoint: round {r + 1}/{repeats * ROUNDS_PER_REPEAT}: overhead {o} s (plain window "
                  f"{base['total']:.2f} s), sync save {res['save_s'][-1]:.2f} s, torch.save "
                  f"{res['torch_save_s'][-1]:.2f} s", flush=True)
    clean()
    if env.rank == 0:
        Path(out).write_text(json.dumps(res))


if __name__ == "__main__":
    import argparse

    from trainer.distributed import prepare_argv

    prepare_argv()
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default="bench/results/checkpoint_raw.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.repeats, args.dir, args.out)
    else:
        print(json.dumps(run(args.repeats), indent=2, default=float))
