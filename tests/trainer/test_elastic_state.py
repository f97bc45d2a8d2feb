"""The layout-free state (trainer/elastic_state.py): written by one layout, read by another, written again: every
weight, fp32 master, Adam moment and router buffer comes back bit for bit, through a chain of layouts that
changes the schedule, pp, dp and ep at every hop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.spawn import run_ranks
from tests.conftest import tiny_config
from tests.parallel.pipeline_workers import make_batches

LAYERS, MICROBATCHES = 4, 4


def _schedule(rank: int, world: int, name: str, pp: int, ep: int, seed: int):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    from parallel.topology import PipelineTopology
    from tests.parallel.engine_workers import build_schedule, ds_config
    from trainer.optim import param_groups

    dp = world // pp
    topo = PipelineTopology(pp=pp, dp=dp, rank=rank, dualpipe=name == "dualpipe", ep=ep)
    topo.build_groups()
    cfg = tiny_config(num_hidden_layers=LAYERS)
    config = ds_config(1.0)
    if name == "none":
        config.update(gradient_accumulation_steps=MICROBATCHES, train_micro_batch_size_per_gpu=2,
                      train_batch_size=2 * MICROBATCHES * dp)
    torch.random.manual_seed(seed)
    from unittest import mock

    with mock.patch.object(torch, "manual_seed", lambda _: torch.random.manual_seed(seed)):
        sched = build_schedule(name, cfg, topo, MICROBATCHES, config, lambda m: param_groups(m, 0.1))
    return cfg, topo, sched


def _rank_model(sched):
    return getattr(sched, "model", None) or sched.module


def _write(sched, topo, name: str, rank: int, ckpt: Path) -> None:
    from trainer.elastic_state import write_index, write_rank_state

    holder = topo.dp_rank == 0 and not (name == "dualpipe" and topo.pipe_rank >= topo.pp // 2)
    entries = write_rank_state(ckpt, rank, _rank_model(sched), sched.engine.optimizer, topo.dp_rank, holder)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, entries)
    if rank == 0:
        write_index(ckpt, everyone, {"step": 2})
    dist.barrier()


def train_and_write(rank: int, world: int, name: str, pp: int, ep: int, ckpt: str) -> None:
    cfg, topo, sched = _schedule(rank, world, name, pp, ep, seed=0)
    batches = make_batches(cfg, 2 * MICROBATCHES * topo.dp)
    for step in range(2):  # two AdamW steps: masters and moments are all non-trivial
        mine = batches[step * MICROBATCHES * topo.dp:(step + 1) * MICROBATCHES * topo.dp]
        mine = mine[topo.dp_rank * MICROBATCHES:(topo.dp_rank + 1) * MICROBATCHES]
        sched.train_batch(iter([{**b, "loss_mask": torch.ones_like(b["tokens"], dtype=torch.float32)}
                                for b in mine]))
    _write(sched, topo, name, rank, Path(ckpt))


def read_and_write(rank: int, world: int, name: str, pp: int, ep: int, src: str, dst: str) -> None:
    from trainer.elastic_state import read_rank_state

    _, topo, sched = _schedule(rank, world, name, pp, ep, seed=1)  # other initial weights: loading must win
    read_rank_state(Path(src), _rank_model(sched), sched.engine.optimizer, step=2)
    _write(sched, topo, name, rank, Path(dst))


def _full(ckpt: Path) -> dict:
    from trainer.elastic_state import KINDS, read_full

    return read_full(ckpt, KINDS)


def _assert_equal(a: dict, b: dict, hop: str) -> None:
    assert a.keys() == b.keys(), hop
    for kind in a:
        assert a[kind].keys() == b[kind].keys(), (hop, kind, sorted(a[kind].keys() ^ b[kind].keys())[:5])
        for name, t in a[kind].items():
            assert t.dtype == b[kind][name].dtype and torch.equal(t, b[kind][name]), (hop, kind, name)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_state_survives_a_chain_of_layouts(tmp_path):
    chain = [("dualpipe", 2, 1), ("none", 1, 2), ("dualpipev", 2, 1), ("1f1b", 2, 1), ("none", 1, 1)]
    name, pp, ep = chain[0]
    first = tmp_path / "0"
    run_ranks(2, train_and_write, name, pp, ep, str(first))
    reference = _full(first)
    assert {"param", "master", "exp_avg", "exp_avg_sq", "buffer"} <= reference.keys()
    assert reference["exp_avg_sq"]["embed.embed_tokens.weight"].abs().sum() > 0  # two real steps happened
    src = first
    for hop, (name, pp, ep) in enumerate(chain[1:], 1):
        dst = tmp_path / str(hop)
        world = 1 if (name, pp, ep) == ("none", 1, 1) else 2
        run_ranks(world, read_and_write, name, pp, ep, str(src), str(dst))
        _assert_equal(reference, _full(dst), f"hop {hop}: {name} pp={pp} ep={ep} world={world}")
        src = dst


def test_damaged_state_names_the_file(tmp_path):
    from trainer.elastic_state import ElasticStateError, StateReader

    (tmp_path / "state").mkdir()
    with pytest.raises(ElasticStateError, match=r"index\.json: missing"):
        StateReader(tmp_path)
    (tmp_path / "state" / "index.json").write_text('{"format": 1, "tens')
    with pytest.raises(ElasticStateError, match=r"index\.json: not valid JSON"):
        StateReader(tmp_path)
