"""data.document_mask through the trainer: the reader's document boundaries reach the model in training and in
evaluation (the model-level equality with lone documents: tests/model/test_documents.py; through the pipelines:
tests/parallel/test_1f1b.py and test_pipeline_engine.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.trainer.conftest import MODULES, VOCAB, base_overrides, launch, losses, rows

STEPS = ["parallel=dp", "train.steps=3", "train.eval_interval=3", "checkpoint.interval=0"]


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents of 12 lines of stdlib source each, so that every 34-token sample crosses a boundary or two."""
    from data_prep.config import PrepConfig, TokenizerConfig
    from data_prep.corpus import stdlib_root
    from data_prep.pipeline import prepare

    corpus = tmp_path_factory.mktemp("short_docs")
    for name in MODULES:
        lines = (stdlib_root() / name).read_text().splitlines()
        for i in range(0, len(lines), 12):
            (corpus / f"{Path(name).stem}_{i:05d}.py").write_text("\n".join(lines[i : i + 12]) + "\n")
    out = tmp_path_factory.mktemp("data") / "short_docs"
    prepare(PrepConfig(corpus=str(corpus), out_dir=str(out), val_fraction=0.2, shard_tokens=16384, num_workers=0,
                       progress=False, tokenizer=TokenizerConfig(vocab_size=VOCAB)))
    return out


def test_a_run_with_document_masking_trains_and_evaluates(short_documents: Path, tmp_path: Path):
    masked, plain = tmp_path / "masked", tmp_path / "plain"
    launch(base_overrides(short_documents, masked, *STEPS, "data.document_mask=true", "data.restart_positions=true"),
           1)
    launch(base_overrides(short_documents, plain, *STEPS), 1)
    got, want = losses(masked), losses(plain)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    # the same weights and samples at step 1: only the masks differ, and they do change the loss
    assert got[1] != want[1]
    evals = {run: rows(run, "eval") for run in (masked, plain)}
    assert all(len(e) == 1 and math.isfinite(e[0]["eval/lm_loss"]) for e in evals.values())
    assert evals[masked][0]["eval/lm_loss"] != evals[plain][0]["eval/lm_loss"]
