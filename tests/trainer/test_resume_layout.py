"""Which layouts a checkpoint resumes on. A layout-free checkpoint (format 2) resumes on any (dp, pp, ep, schedule,
ep_ranks_per_node: tests/trainer/test_elastic_resume.py runs one across layouts); a format-1 checkpoint
(DeepSpeed's per-layout files, written before) only on the layout that wrote it: another schedule, pp, ep or dp
is one `error: parallel.<key>: ...` line that says how to resume it, before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.errors import UserError
from trainer.job import check_same_layout
from trainer.validate import Layout

SAVED = {"step": 4, "format": 1, "schedule": "dualpipe", "pp": 2, "dp": 1, "ep": 1}


def _layout(pp: int = 2, dp: int = 1, ep: int = 1) -> Layout:
    return Layout(world_size=pp * dp, pp=pp, dp=dp, ep=ep, micro_batch_size=2, grad_accum=4, global_batch_size=8,
                  dtype="fp32", device="cpu", data_vocab_size=512)


def test_format1_checkpoint_resumes_on_its_own_layout():
    check_same_layout(Path("ckpt"), SAVED, _layout(), "dualpipe")
    check_same_layout(Path("ckpt"), {"step": 4}, _layout(pp=1, dp=2), "none")  # older meta: nothing to compare


@pytest.mark.parametrize("layout, schedule, key, saved", [
    (_layout(), "dualpipev", "schedule", "dualpipe"),
    (_layout(pp=4), "dualpipe", "pp", "2"),
    (_layout(dp=2, ep=2), "dualpipe", "ep", "1"),
    (_layout(dp=2), "dualpipe", "dp", "1"),
])  # fmt: skip
def test_format1_checkpoint_on_another_layout_is_one_line(layout: Layout, schedule: str, key: str, saved: str):
    with pytest.raises(UserError) as err:
        check_same_layout(Path("ckpt"), SAVED, layout, schedule)
    assert err.value.key == f"parallel.{key}" and "\n" not in str(err.value)
    assert f"older checkpoint (DeepSpeed's per-layout files) saved with {key}={saved}" in err.value.problem
    assert f"resume it once with parallel.{key}={saved}" in err.value.fix and "train.resume=never" in err.value.fix
