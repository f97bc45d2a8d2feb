"""Helpers for the data tests (a uniquely named module: `conftest` may exist elsewhere under tests/)."""

from __future__ import annotations

import shutil
from pathlib import Path

from data_prep.config import PrepConfig, TokenizerConfig
from data_prep.corpus import stdlib_root

# Small, stable modules present in every CPython 3.11+ (about 145 KB together).
CORPUS_A = [
    "abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "keyword.py", "numbers.py", "opcode.py",
    "queue.py", "sched.py", "shlex.py", "stat.py", "textwrap.py", "graphlib.py", "glob.py", "genericpath.py",
]  # fmt: skip
CORPUS_B = ["calendar.py", "copy.py", "csv.py", "difflib.py", "dis.py", "enum.py"]

VOCAB = 384
SHARD_TOKENS = 2048


def copy_modules(names: list[str], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(stdlib_root() / n, dest / n)
    return dest


def prep_config(corpus: Path, out: Path, **kw) -> PrepConfig:
    tok = kw.pop("tokenizer", {})
    return PrepConfig(
        corpus=str(corpus),
        out_dir=str(out),
        val_fraction=kw.pop("val_fraction", 0.2),
        shard_tokens=kw.pop("shard_tokens", SHARD_TOKENS),
        num_workers=kw.pop("num_workers", 0),
        progress=False,
        tokenizer=TokenizerConfig(**{"vocab_size": VOCAB, **tok}),
        **kw,
    )
