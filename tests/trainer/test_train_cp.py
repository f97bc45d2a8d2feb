"""parallel.cp through the trainer: 2 ranks splitting each sequence (Ulysses attention) train the same steps as
one rank holding whole sequences, with packed documents and MTP (the model-level equality, gradients included:
tests/parallel/test_context_parallel.py), and a cp=2 checkpoint resumes on one rank without cp.

Runs: A, cp=2 on 2 ranks, 4 steps (checkpoints at 2 and 4); O, the same on one rank; B, A's step-2 checkpoint
resumed on one rank for steps 3-4; E, two steps of cp=2 with ep=2 on the same 2 ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.test_context_parallel import GRAD_RTOL, LOSS_RTOL
from tests.trainer.conftest import base_overrides, launch, rows
from trainer.checkpoint import tag_for

pytestmark = pytest.mark.multiprocess

RUN = ["parallel=dp", "train.steps=4", "train.eval_interval=4", "checkpoint.interval=2", "data.document_mask=true",
       "optim.grad_clip=0"]  # no clipping: the grad norm does not feed back


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cp")
    a, o, b, e = base / "a", base / "o", base / "b", base / "e"
    launch(base_overrides(tiny_data, a, *RUN, "parallel.cp=2"), nproc=2)
    launch(base_overrides(tiny_data, e, *RUN, "parallel.cp=2", "parallel.ep=2", "train.steps=2",
                          "checkpoint.interval=0", "checkpoint.save_final=false"), nproc=2)
    launch(base_overrides(tiny_data, o, *RUN), nproc=1)
    out = launch(base_overrides(tiny_data, b, *RUN, f"train.resume={a / 'checkpoints' / tag_for(2)}"), nproc=1)
    (b / "stdout.txt").write_text(out.stdout)
    return {"a": a, "o": o, "b": b, "e": e}


def _close(got: dict, want: dict) -> None:
    """One step on the same weights and samples, with and without cp: the bounds of test_context_parallel.py."""
    for key, rtol in (("train/lm_loss", LOSS_RTOL), ("train/mtp_loss", LOSS_RTOL), ("train/grad_norm", GRAD_RTOL)):
        assert abs(got[key] - want[key]) <= rtol * abs(want[key]), (key, got, want)


def test_cp2_trains_as_one_rank(runs: dict[str, Path]):
    a, o = rows(runs["a"]), rows(runs["o"])
    assert [r["step"] for r in a] == [r["step"] for r in o] == [1, 2, 3, 4]
    # the first step only: later ones pass AdamW's sign-like first updates (tests/trainer/conftest.py
    # assert_first_step_matches); B below compares a later step on restored weights instead
    _close(a[0], o[0])
    evals, want = rows(runs["a"], "eval"), rows(runs["o"], "eval")
    assert [e["step"] for e in evals] == [e["step"] for e in want] == [4]
    # the validation sums come from both halves of every sequence: the targets counted are the single rank's
    assert evals[0]["eval/tokens"] == want[0]["eval/tokens"]


def test_cp2_with_the_experts_split_over_the_same_ranks(runs: dict[str, Path]):
    # ep=2 over the 2 CP ranks: each expert's tokens come from both halves of every sequence
    _close(rows(runs["e"])[0], rows(runs["o"])[0])


def test_a_cp_checkpoint_resumes_without_cp(runs: dict[str, Path]):
    a, b = {r["step"]: r for r in rows(runs["a"])}, {r["step"]: r for r in rows(runs["b"])}
    assert sorted(b) == [3, 4]
    assert "cp 2 -> 1" in (runs["b"] / "stdout.txt").read_text()
    _close(b[3], a[3])  # the checkpoint's weights, moments and data position, on one rank
    assert b[4]["train/lr"] == a[4]["train/lr"] and b[4]["train/tokens"] == a[4]["train/tokens"]
