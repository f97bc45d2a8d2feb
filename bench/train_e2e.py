"""train_e2e: training tokens/s of the default job vs the same model shape through transformers + DeepSpeed.

Ours: the default job's configuration (conf/config.yaml: the `tiny` model, DualPipe over the 2 ranks, seq_len 128,
micro batch 4, global batch 16, ZeRO-1, fp32 on CPU) stepped as trainer/loop.py does (train_batch, then the bias
update). Peer: transformers' `DeepseekV3ForCausalLM` with the same shape (config.json from model/hf.py; its
default grouped_mm experts and SDPA attention), trained by a plain DeepSpeedEngine with the same generated
DeepSpeed config (data parallel over the 2 ranks), on the same data stream, ranks and batch. Both run in the
same 2 processes (deepspeed launcher, gloo on CPU), alternating step by step so machine noise hits all alike;
medians are quoted.
transformers has no MTP training, so ours does strictly more work per token (the MTP module and its head:
about 1.6x the model FLOPs of the peer for `tiny`); the same trainer with MTP switched off
(model.num_nextn_predict_layers=0, the peer's work exactly) is measured alongside as `ours_no_mtp`.
Each side in its best 2-rank layout: ours also runs data parallel (`parallel=dp`, the peer's layout:
`ours_dp`, `ours_dp_no_mtp`), and data parallel with `model.compile_regions` (`ours_dp_no_mtp_compiled`; the
peer's model does not compile in fp32: torch's `_grouped_mm` meta kernel takes bf16 only). The headline (`ours`,
`ratio`) is equal work, the same loss terms on both sides: the fastest of our no-MTP contestants against the peer
(`ours_layout` says which). `profile`: three steps of each of the two data-parallel equal-work eager sides under
torch.profiler, the medians by category.
FLOP fraction, as in model_step: model FLOP/s (model.info.training_flops_per_token x tokens / step time) over
the FLOP/s of the same model's GEMMs (no MTP; each rank's share of the batch) run as plain torch.mm on both ranks
at once (`dense_mm`, a contestant of every round).

    python -m bench train_e2e            # via the bench runner (writes bench/results/train_e2e.json)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPROC = 2
STEPS_PER_ROUND = 1  # contestants alternate step by step: load changes on a shared machine hit all alike
ROUNDS_PER_REPEAT = 3
WARMUP_STEPS = 2
OVERRIDES = ["logging.wandb.mode=disabled", "logging.progress=false", "train.eval_batches=0"]


def _ensure_data() -> None:
    if (ROOT / "data" / "python_stdlib" / "manifest.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "data_prep", "corpus=python_stdlib", "out_dir=data/python_stdlib",
                    "tokenizer.vocab_size=4096"], cwd=ROOT, check=True)


def run(repeats: int = 5) -> dict:
    from bench.common import result

    _ensure_data()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train_e2e.json"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        from parallel.spawn import free_port

        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", "--num_gpus",
               str(NPROC), "--master_port", str(free_port()), "--module", "bench.train_e2e", "--worker",
               "--rounds", str(repeats * ROUNDS_PER_REPEAT), "--out", str(out)]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        measured = json.loads(out.read_text())
    equal_work = ("ours_no_mtp", "ours_dp_no_mtp", "ours_dp_no_mtp_compiled")
    contestants = ("ours", "ours_dp", *equal_work, "peer")
    med = {k: statistics.median(measured[k]) for k in contestants}
    per_round = {k: statistics.median(a / b for a, b in zip(measured[k], measured["peer"], strict=True))
                 for k in contestants if k != "peer"}
    best = max(equal_work, key=med.get)
    tokens = measured["tokens_per_step"]
    dense_flops_per_s = statistics.median(measured["dense_mm_flops_per_s"])
    flops = measured["flops"]

    def fraction(name: str) -> float:
        per_token = flops["peer"] if "no_mtp" in name or name == "peer" else flops["ours"]
        return per_token * med[name] / dense_flops_per_s

    return result(
        "train_e2e", ours=med[best], peer=med["peer"], unit="tokens/s (equal work: no MTP on either side)",
        goal=">= 1.1x at equal work, each side in its best 2-rank layout", repeats=repeats, ours_layout=best,
        tokens_per_s=med, ratio_with_mtp=med["ours"] / med["peer"],
        ratio_dualpipe_no_mtp=med["ours_no_mtp"] / med["peer"], ratio_dp_no_mtp=med["ours_dp_no_mtp"] / med["peer"],
        ratio_dp_no_mtp_compiled=med["ours_dp_no_mtp_compiled"] / med["peer"],
        median_round_ratio=per_round,
        flops_fraction={k: fraction(k) for k in contestants}, dense_mm_gflops=dense_flops_per_s / 1e9,
        model_flops_per_token={"ours": flops["ours"], "peer": flops["peer"]},
        ranks=NPROC, steps_per_round=STEPS_PER_ROUND, tokens_per_step=tokens,
        rounds={k: measured[k] for k in contestants}, peer_impl=measured["peer_impl"],
        profile=measured["profile"],
        config="conf/config.yaml defaults (model=tiny, seq_len 128, micro 4, global 16, ZeRO-1, fp32); ours "
               "and ours_no_mtp: DualPipe over the 2 ranks (the default job); ours_dp*: parallel=dp; *_compiled: "
               "model.compile_regions=true",
        clock="wall, 2 processes on 2 cores, one thread each",
    )


# ---- the worker (one per rank, started by the deepspeed launcher) ---------------------------------------


def _job_config(*extra: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[*OVERRIDES, *extra]))


def _peer_engine(job, layout):
    import deepspeed
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from model.hf import hf_config_dict
    from trainer.ds_config import build_ds_config
    from trainer.lr_schedule import make_lr_lambda
    from trainer.optim import param_groups

    torch.manual_seed(job.train.seed)
    hf_cfg = DeepseekV3Config.from_dict(hf_config_dict(job.model))
    model = DeepseekV3ForCausalLM(hf_cfg)
    lr_lambda = make_lr_lambda(job.optim, job.train.steps)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, job.optim.weight_decay),
        config=build_ds_config(job, layout),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )
    impl = {"attention": model.config._attn_implementation,
            "experts": getattr(model.config, "_experts_implementation", None)}
    return engine, impl


def _peer_step(engine, stream, seq_len: int) -> None:
    for _ in range(engine.gradient_accumulation_steps()):
        tokens = next(stream)["tokens"][:, :seq_len]
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()


def worker(rounds: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from bench.model_step import model_linear_shapes
    from bench.moe_layer import dense_reference, gemm_flops
    from model.info import training_flops_per_token
    from trainer.build import build_rank
    from trainer.data import train_stream
    from trainer.distributed import dp_rank, init_process_group, prepare_argv, prepare_env
    from trainer.load_balance import moe_routers, update_router_biases
    from trainer.validate import validate

    prepare_argv()
    env = prepare_env()
    torch.set_num_threads(1)
    # ours: the default job's configuration (DualPipe over the 2 ranks); the peer: plain DeepSpeed data
    # parallelism over the same 2 ranks with the same global batch
    no_mtp = "model.num_nextn_predict_layers=0"
    jobs = {"ours": _job_config(), "ours_no_mtp": _job_config(no_mtp), "ours_dp": _job_config("parallel=dp"),
            "ours_dp_no_mtp": _job_config("parallel=dp", no_mtp),
            "ours_dp_no_mtp_compiled": _job_config("parallel=dp", no_mtp, "model.compile_regions=true")}
    job, peer_job = jobs["ours"], _job_config("parallel=dp")
    layout = validate(job, env.world_size, env.device)
    peer_layout = validate(peer_job, env.world_size, env.device)
    init_process_group(env)

    def ours_step_fn(cfg):
        layout = validate(cfg, env.world_size, env.device)
        schedule, _ = build_rank(cfg, layout)
        routers = moe_routers(schedule.module)
        data = train_stream(cfg, layout, dp_rank(env, layout.pp))

        def step() -> None:  # what trainer/loop.py runs per step
            schedule.train_batch(data)
            update_router_biases(routers, group=schedule.counts_group)

        return step

    peer, impl = _peer_engine(peer_job, peer_layout)
    peer_data = train_stream(peer_job, peer_layout, env.rank)
    # the data-parallel ones first: once a pipeline engine has set DeepSpeed's global model-parallel state, a
    # later plain DeepSpeedEngine built without an mpu fails on it
    built = {name: ours_step_fn(jobs[name])
             for name in ("ours_dp", "ours_dp_no_mtp", "ours_dp_no_mtp_compiled", "ours", "ours_no_mtp")}
    steps = {name: built[name] for name in jobs}
    steps["peer"] = lambda: _peer_step(peer, peer_data, job.train.seq_len)
    # this rank's share of the step's GEMMs (the peer's model: no MTP) as plain torch.mm, both ranks at once
    rank_tokens = peer_layout.global_batch_size * job.train.seq_len // env.world_size
    shapes = model_linear_shapes(jobs["ours_no_mtp"].model, rank_tokens)
    steps["dense_mm"] = dense_reference(shapes)

    def timed(step, n: int) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(n):
            step()
        dist.barrier()
        return time.perf_counter() - start

    tokens = layout.global_batch_size * job.train.seq_len
    for step in steps.values():
        timed(step, WARMUP_STEPS)
    seq = job.train.seq_len
    res: dict = {k: [] for k in steps if k != "dense_mm"}
    res.update(tokens_per_step=tokens, peer_impl=impl, flops={
        "ours": training_flops_per_token(job.model, seq),
        "peer": training_flops_per_token(jobs["ours_no_mtp"].model, seq)})
    res["dense_mm_flops_per_s"] = []
    for _ in range(rounds):
        for name, step in steps.items():
            seconds = timed(step, STEPS_PER_ROUND)
            if name == "dense_mm":
                res["dense_mm_flops_per_s"].append(env.world_size * STEPS_PER_ROUND * gemm_flops(shapes) / seconds)
            else:
                res[name].append(STEPS_PER_ROUND * tokens / seconds)
        if env.rank == 0:
            print("train_e2e: " + ", ".join(f"{k} {res[k][-1]:.0f}" for k in steps if k != "dense_mm") + " tokens/s",
                  flush=True)
    # where one step's time goes, rank 0, on the two equal-work sides in the peer's layout (both ranks step)
    res["profile"] = {name: profile_step(steps[name], env.rank == 0) for name in ("ours_dp_no_mtp", "peer")}
    if env.rank == 0:
        Path(out).write_text(json.dumps(res))


# op name -> category of a step's profile (first match wins; self CPU time, so nested ops are not counted twice)
PROFILE_CATEGORIES = (
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("communication", ("gloo", "c10d::", "all_reduce", "allreduce", "broadcast", "all_gather", "allgather",
                       "reduce_scatter", "barrier")),
    ("optimizer", ("adam", "_foreach_", "lerp")),
)


PROFILED_STEPS = 3  # one profiled step is at the mercy of the machine: the medians of three are reported


def profile_step(step, record: bool) -> dict:
    """PROFILED_STEPS steps, each under torch.profiler: the medians of the step's wall seconds and of its ops' self
    CPU seconds by category (PROFILE_CATEGORIES; `other`: the rest, elementwise work and framework overhead), plus
    the 12 costliest ops of the median step."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    steps = []
    for _ in range(PROFILED_STEPS):
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
        dist.barrier()
        by_op = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        categories = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES] + ["other"], 0.0)
        for op, seconds in by_op.items():
            low = op.lower()
            name = next((c for c, keys in PROFILE_CATEGORIES if any(k in low for k in keys)), "other")
            categories[name] += seconds
        steps.append({"wall_s": wall, "self_cpu_s": sum(by_op.values()), "by_category_s": categories,
                      "top_ops_s": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])})
    if not record:
        return {}
    steps.sort(key=lambda s: s["wall_s"])
    middle = steps[len(steps) // 2]
    return {"steps": PROFILED_STEPS, "wall_s": middle["wall_s"],
            "self_cpu_s": statistics.median(s["self_cpu_s"] for s in steps),
            "by_category_s": {c: statistics.median(s["by_category_s"][c] for s in steps)
                              for c in middle["by_category_s"]},
            "top_ops_s_of_median_step": middle["top_ops_s"]}


if __name__ == "__main__":
    import argparse

    from trainer.distributed import prepare_argv

    prepare_argv()
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/train_e2e_raw.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.rounds, args.out)
    else:
        print(json.dumps(run(args.rounds), indent=2, default=float))
