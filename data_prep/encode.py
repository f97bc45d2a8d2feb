"""Tokenization in worker processes, in order, with a bounded number of chunks in flight.

Documents are grouped into chunks of about `chunk_chars` characters; each worker turns a chunk into one flat
token array (BOS? + ids + EOS per document) and the document lengths, already in the shard dtype so little
crosses the process boundary. Results come back in input order, so the output never depends on timing or
on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

_worker: _Encoder | None = None


@dataclass
class _Encoder:
    tokenizer: Tokenizer
    bos_id: int | None  # None: no BOS
    eos_id: int
    dtype: str

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # encode_batch_fast skips computing character offsets, which shards do not need
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        extra = 1 + (self.bos_id is not None)
        lengths = np.fromiter((len(e.ids) + extra for e in encodings), dtype=np.int64, count=len(encodings))
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for e, n in zip(encodings, lengths.tolist()):
            if self.bos_id is not None:
                out[pos] = self.bos_id
            out[pos + extra - 1 : pos + n - 1] = e.ids
            out[pos + n - 1] = self.eos_id
            pos += n
        return out, lengths


def _init_worker(tokenizer_file: str, bos_id: int | None, eos_id: int, dtype: str) -> None:
    global _worker
    # One process per core already: tokenizers' own thread pool would only oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = _Encoder(Tokenizer.from_file(tokenizer_file), bos_id, eos_id, dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None
    return _worker(texts)


def chunked(texts: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for t in texts:
        chunk.append(t)
        size += len(t)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@dataclass
class EncodedChunk:
    ids: np.ndarray  # every token of the chunk's documents, concatenated
    lengths: np.ndarray  # tokens per document (BOS/EOS included)
    chars: int  # characters of source text, for throughput reporting


class ParallelEncoder:
    """Tokenizes document streams in `num_workers` processes (0: in this one), keeping input order.

    The worker pool starts on first use and is shared by every stream encoded until `close()` (both splits
    of a preparation), since starting interpreters costs about as much as tokenizing a few megabytes.
    """

    def __init__(self, tokenizer_file: str, *, bos_id: int | None, eos_id: int, dtype: str, num_workers: int,
                 chunk_chars: int = 1 << 18) -> None:  # fmt: skip
        self.args = (tokenizer_file, bos_id, eos_id, dtype)
        self.num_workers = num_workers
        self.chunk_chars = chunk_chars
        self._pool = None
        self._local: _Encoder | None = None

    def __enter__(self) -> ParallelEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def encode(self, texts: Iterable[str]) -> Iterator[EncodedChunk]:
        chunks = chunked(texts, self.chunk_chars)
        if self.num_workers == 0:
            if self._local is None:
                tokenizer_file, *rest = self.args
                self._local = _Encoder(Tokenizer.from_file(tokenizer_file), *rest)
            for c in chunks:
                yield EncodedChunk(*self._local(c), sum(map(len, c)))
            return
        if self._pool is None:
            # spawn, not fork: the caller may hold threads (torch, tokenizers' pool) that fork would corrupt.
            # An executor, not mp.Pool: a worker that dies raises BrokenProcessPool instead of hanging.
            self._pool = ProcessPoolExecutor(
                self.num_workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=self.args
            )
        pending: deque = deque()
        # Enough queued work that workers do not idle while this process is busy or descheduled; bounded,
        # so memory stays flat (a chunk is ~256k characters).
        max_pending = 4 * self.num_workers + 1
        for c in chunks:
            pending.append((self._pool.submit(_encode_in_worker, c), sum(map(len, c))))
            if len(pending) >= max_pending:
                fut, chars = pending.popleft()
                yield EncodedChunk(*fut.result(), chars)
        while pending:
            fut, chars = pending.popleft()
            yield EncodedChunk(*fut.result(), chars)
