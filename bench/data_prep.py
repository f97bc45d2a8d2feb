"""data_prep: preparation tokens/s on this machine vs the obvious `datasets.map` pipeline.

Both sides turn the same local directory of Python files (the first ~5 MB of the stdlib's .py files) into
the same shards with the same tokenizer (a 4096-token BPE trained once beforehand, so training is not
timed), with the same number of processes (2):
- ours: `prepare(cfg)` (datasets streaming reader, worker processes, shard writer, manifest, checks);
- peer: `datasets.load_dataset("text", sample_by="document")` + `.filter` + `.map(batched=True, num_proc=2)`
  calling the tokenizer's `encode_batch` (the obvious call), then the same shard writer over the rows;
- peer_fast (reported alongside): the same baseline calling `encode_batch_fast`, as ours does, so the
  pipelines are compared on equal tokenizer calls too.
Wall time (interleaved medians) is the headline; CPU seconds (process + reaped children) are reported too,
as they are less sensitive to other jobs on a shared machine. The shards must be byte-identical (asserted).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import interleaved_medians, result
from data_prep.corpus import stdlib_files, stdlib_root
from data_prep.pipeline import prepare
from data_prep.shards import ShardWriter
from data_prep.tokenizer import train_bpe

WORKERS = 2
CORPUS_BYTES = 5_000_000  # the first ~5 MB of the stdlib, in corpus order
SHARD_TOKENS = 1 << 20


def _setup(tmp: Path) -> tuple[Path, Path]:
    corpus = tmp / "corpus"
    corpus.mkdir()
    root = stdlib_root()
    size = 0
    for p in stdlib_files(root):
        if size >= CORPUS_BYTES:
            break
        if _utf8(p):  # one encoding for both sides: datasets' text reader is strict UTF-8
            dest = corpus / p.relative_to(root).as_posix().replace("/", "__")
            shutil.copyfile(p, dest)
            size += dest.stat().st_size
    info = train_bpe((p.read_text() for p in sorted(corpus.iterdir())), 4096)
    tok = tmp / "tokenizer.json"
    info.tokenizer.save(str(tok))
    return corpus, tok


def _utf8(p: Path) -> bool:
    try:
        p.read_bytes().decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _shard_hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("train-*.*"))}


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (worker pools are joined by the end of a call)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(repeats: int) -> dict[str, Any]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core on both sides
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp_s:
        tmp = Path(tmp_s)
        corpus, tok_path = _setup(tmp)
        calls: dict[str, int] = {}
        tokens: dict[str, int] = {}
        cpu: dict[str, list[float]] = {}

        def fresh_dir(name: str) -> Path:
            calls[name] = calls.get(name, 0) + 1
            return tmp / f"{name}{calls[name]}"

        def ours() -> None:
            out = fresh_dir("ours")
            m = prepare({"corpus": str(corpus), "out_dir": str(out), "val_fraction": 0.0,
                         "shard_tokens": SHARD_TOKENS, "num_workers": WORKERS, "progress": False,
                         "tokenizer": {"path": str(tok_path)}})  # fmt: skip
            tokens["ours"] = m.splits["train"].num_tokens

        def peer(name: str, method: str) -> None:
            out = fresh_dir(name)
            out.mkdir()
            tok = Tokenizer.from_file(str(tok_path))
            eos = tok.token_to_id("<|eos|>")
            files = [str(p) for p in sorted(corpus.iterdir())]
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train",
                                       cache_dir=str(out / "hf_cache"))  # fmt: skip

            def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
                encs = getattr(tok, method)(batch["text"], add_special_tokens=False)
                return {"ids": [e.ids + [eos] for e in encs]}

            ds = ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True, num_proc=WORKERS)
            ds = ds.map(encode, batched=True, num_proc=WORKERS, remove_columns=["text"])
            writer = ShardWriter(out, "train", SHARD_TOKENS, "uint16", on_shard=lambda s: None)
            n = 0
            for batch in ds.with_format("numpy").iter(batch_size=256):
                docs = list(batch["ids"])
                ids = np.concatenate(docs).astype(np.uint16)
                writer.add(ids, np.array([len(d) for d in docs], dtype=np.int64))
                n += len(ids)
            writer.close()
            tokens[name] = n

        def timed_cpu(name: str, fn: Callable[[], None]) -> Callable[[], None]:
            def call() -> None:
                c0 = _cpu_seconds()
                fn()
                cpu.setdefault(name, []).append(_cpu_seconds() - c0)

            return call

        fns = {
            "ours": ours,
            "peer": lambda: peer("peer", "encode_batch"),  # the obvious call
            "peer_fast": lambda: peer("peer_fast", "encode_batch_fast"),  # the call ours makes
        }
        times = interleaved_medians({k: timed_cpu(k, f) for k, f in fns.items()}, repeats)
        assert len(set(tokens.values())) == 1, tokens
        same = _shard_hashes(tmp / "ours1") == _shard_hashes(tmp / "peer1") == _shard_hashes(tmp / "peer_fast1")
        assert same, "ours and the datasets.map baseline wrote different shards"
        corpus_mb = sum(p.stat().st_size for p in corpus.iterdir()) / 1e6
    n_tok = tokens["ours"]
    cpu_med = {k: statistics.median(v[1:]) for k, v in cpu.items()}  # v[0] is the warm-up call
    return result(
        name="data_prep",
        ours=n_tok / times["ours"],
        peer=n_tok / times["peer"],
        unit="tokens/s",
        goal=">= 1x the datasets.map baseline",
        repeats=repeats,
        processes=WORKERS,
        tokens=n_tok,
        corpus_mb=round(corpus_mb, 2),
        seconds_ours=times["ours"],
        seconds_peer=times["peer"],
        peer_desc="datasets text loader + filter + map(batched, num_proc=2, encode_batch) + the same shard writer",
        peer_fast_tokens_per_s=n_tok / times["peer_fast"],
        ratio_vs_peer_fast=times["peer_fast"] / times["ours"],
        peer_fast_desc="the same baseline calling encode_batch_fast (no offsets), as ours does",
        cpu_seconds_ours=cpu_med["ours"],
        cpu_seconds_peer=cpu_med["peer"],
        cpu_seconds_peer_fast=cpu_med["peer_fast"],
        cpu_ratio_vs_peer=cpu_med["peer"] / cpu_med["ours"],
        identical_shards=same,
        seconds=time.perf_counter() - t0,
    )
