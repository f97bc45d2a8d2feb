"""The process harness itself: results come back in rank order through plain pickle, and a failing rank
surfaces as an error carrying its traceback instead of a hang (its peer, stuck in a collective, is killed)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from parallel.spawn import run_ranks

pytestmark = pytest.mark.multiprocess


def _report(rank: int, world: int, scale: float) -> dict:
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)  # the group is up
    return {"rank": rank, "env": (os.environ["RANK"], os.environ["LOCAL_WORLD_SIZE"]), "sum": t * scale,
            "threads": torch.get_num_threads()}


def _fail_on_one(rank: int, world: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("planted failure")
    dist.barrier()  # never completes: rank 1 is gone


def test_results_in_rank_order() -> None:
    out = run_ranks(2, _report, 2.0)
    assert [o["rank"] for o in out] == [0, 1]
    assert [o["env"] for o in out] == [("0", "2"), ("1", "2")]
    assert all(torch.equal(o["sum"], torch.tensor([2.0])) and o["threads"] == 1 for o in out)


def test_rank_error_is_raised_and_stragglers_killed() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed:.*ValueError: planted failure"):
        run_ranks(2, _fail_on_one, timeout=60.0, join_timeout=2.0)
    assert time.monotonic() - start < 50.0
