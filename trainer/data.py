"""The trainer's view of the data: this DP rank's training stream, validation batches, unigram entropy."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from data_prep.errors import DataError
from data_prep.reader import TokenStream, validation_batches
from data_prep.sources import open_source
from trainer.config import JobConfig
from trainer.errors import UserError
from trainer.validate import Layout


def train_stream(cfg: JobConfig, layout: Layout, dp_rank: int) -> TokenStream:
    d, t = cfg.data, cfg.train
    return TokenStream(
        list(d.dirs), None if d.weights is None else list(d.weights), seq_len=t.seq_len,
        mtp_depth=cfg.model.num_nextn_predict_layers, micro_batch_size=layout.micro_batch_size,
        global_batch_size=layout.global_batch_size, dp_rank=dp_rank, dp_size=layout.dp, seed=d.seed,
        mode=d.mode, verify=d.verify, split="train", model_vocab_size=cfg.model.vocab_size,
        document_mask=d.document_mask, restart_positions=d.restart_positions,
    )


def eval_batches(cfg: JobConfig, layout: Layout, dp_rank: int) -> Iterator[dict[str, torch.Tensor]]:
    """The validation microbatches of this rank. `train.eval_batches` counts microbatches over all DP ranks,
    so (when dp divides it) the same samples are scored whatever the data-parallel size."""
    d, t = cfg.data, cfg.train
    return validation_batches(
        list(d.dirs), seq_len=t.seq_len, mtp_depth=cfg.model.num_nextn_predict_layers,
        micro_batch_size=layout.micro_batch_size, max_batches=-(-t.eval_batches // layout.dp),
        weights=None if d.weights is None else list(d.weights), mode=d.mode, verify=d.verify, split="val",
        dp_rank=dp_rank, dp_size=layout.dp, model_vocab_size=cfg.model.vocab_size,
        document_mask=d.document_mask, restart_positions=d.restart_positions,
    )


def check_before_training(cfg: JobConfig, layout: Layout, dp_rank: int) -> None:
    """Open the data as the run will, so what would fail mid-run fails now (one line, exit code 2).

    The training split: geometry, shard sizes, the token ids its manifest records (data.verify=full: every
    shard hashed and scanned). With evaluation on, this rank's validation batches are read once: every shard
    an evaluation touches is size-checked and scanned for ids outside the vocabulary, and a split too small
    for one microbatch per rank is refused here rather than at the final evaluation.
    """
    train_stream(cfg, layout, dp_rank)  # raises DataError ("data: ..." line)
    if cfg.train.eval_batches <= 0:
        return
    try:
        for _ in eval_batches(cfg, layout, dp_rank):
            pass
    except DataError as e:
        raise UserError("data.dirs", f"validation data: {e}",
                        "or set train.eval_batches=0 to train without evaluation") from None


def unigram_entropy(data_dirs: list[str], split: str = "train", vocab_size: int | None = None) -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of the best context-free model.

    A language model that learned anything beyond token frequencies must go below it.
    """
    counts: np.ndarray | None = None
    for directory in data_dirs:
        src = open_source(directory, split)
        size = vocab_size or src.vocab_size or 0
        for shard in range(src.num_shards):
            c = np.bincount(np.asarray(src.tokens(shard), dtype=np.int64), minlength=size)
            if counts is None:
                counts = c
            else:
                n = max(len(counts), len(c))
                counts = np.pad(counts, (0, n - len(counts))) + np.pad(c, (0, n - len(c)))
    if counts is None or counts.sum() == 0:
        return math.nan
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
