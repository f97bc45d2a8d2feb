"""Data preparation and streaming: corpus -> tokenizer -> verified token shards -> DP-elastic batches.

`python -m data_prep corpus=python_stdlib out_dir=data/python_stdlib` prepares shards; the trainer reads them
with `data_prep.reader.TokenStream`. Nothing here imports model/, parallel/ or trainer/.
"""

from __future__ import annotations

from typing import Any

from data_prep.errors import DataError

__all__ = ["DataError", "prepare"]


def prepare(cfg: Any) -> Any:
    """Prepare shards from a PrepConfig / DictConfig / dict; see data_prep.pipeline.prepare."""
    # Imported on call: the reader side (used on every training rank) should not pay for tokenizers/tqdm.
    from data_prep.pipeline import prepare as _prepare

    return _prepare(cfg)
