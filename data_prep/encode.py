"""Tokenization in worker processes, in order, with a bounded number of chunks in flight.

Documents are grouped into chunks of about `chunk_chars` characters; a document longer than `piece_chars`
is first cut into pieces (`tokenizer.split_text`, at pre-token boundaries), so a chunk may end inside a
document and no tokenizer call is ever handed more than ~2 x chunk_chars characters: a tokenizer's working
state is ~100x its input, which for one 42 MB line meant several GB. Each worker turns a chunk into one flat
token array (BOS? + ids + EOS per document, BOS only before a document's first piece, EOS only after its
last), already in the shard dtype so little crosses the process boundary. Results come back in input order
and are reassembled into whole documents, so the output never depends on timing or on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from data_prep.tokenizer import PIECE_CHARS, split_text, splits_cleanly

_worker: _Encoder | None = None

HEAD, TAIL = 1, 2  # piece flags: the piece starts / ends its document


@dataclass
class _Encoder:
    tokenizer: Tokenizer
    bos_id: int | None  # None: no BOS
    eos_id: int
    dtype: str

    def __call__(self, texts: list[str], flags: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `texts` (pieces; flags[i] says whether piece i starts/ends a document, default both),
        concatenated, and the number of ids each piece contributed."""
        if flags is None:
            flags = bytes([HEAD | TAIL]) * len(texts)
        # encode_batch_fast skips computing character offsets, which shards do not need
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        bos = self.bos_id is not None
        lengths = np.fromiter(
            (len(e.ids) + (bos and f & HEAD > 0) + (f & TAIL > 0) for e, f in zip(encodings, flags)),
            dtype=np.int64,
            count=len(encodings),
        )
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for e, f in zip(encodings, flags):
            if bos and f & HEAD:
                out[pos] = self.bos_id
                pos += 1
            ids = e.ids
            out[pos : pos + len(ids)] = ids
            pos += len(ids)
            if f & TAIL:
                out[pos] = self.eos_id
                pos += 1
        return out, lengths


def _init_worker(tokenizer_file: str, bos_id: int | None, eos_id: int, dtype: str) -> None:
    global _worker
    # One process per core already: tokenizers' own thread pool would only oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = _Encoder(Tokenizer.from_file(tokenizer_file), bos_id, eos_id, dtype)


def _encode_in_worker(texts: list[str], flags: bytes) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None
    return _worker(texts, flags)


@dataclass
class _Chunk:
    pieces: list[str]
    flags: bytes  # HEAD | TAIL bits per piece
    chars: int


def chunked(texts: Iterable[str], chunk_chars: int, piece_chars: int | None = None) -> Iterator[_Chunk]:
    """Pieces of about `chunk_chars` characters in all; documents longer than `piece_chars` are split."""
    pieces: list[str] = []
    flags = bytearray()
    size = 0
    for t in texts:
        parts = split_text(t, piece_chars) if piece_chars else [t]
        last = len(parts) - 1
        for k, p in enumerate(parts):
            pieces.append(p)
            flags.append((HEAD if k == 0 else 0) | (TAIL if k == last else 0))
            size += len(p)
            if size >= chunk_chars:
                yield _Chunk(pieces, bytes(flags), size)
                pieces, flags, size = [], bytearray(), 0
    if pieces:
        yield _Chunk(pieces, bytes(flags), size)


@dataclass
class EncodedChunk:
    ids: np.ndarray  # every token of the chunk's documents, concatenated
    lengths: np.ndarray  # tokens per document (BOS/EOS included)
    chars: int  # characters of source text, for throughput reporting


class _Assembler:
    """Joins encoded pieces back into whole documents: a chunk's trailing partial document waits for the rest."""

    def __init__(self) -> None:
        self.carry: list[np.ndarray] = []  # ids of the unfinished document so far
        self.carry_n = 0
        self.chars = 0

    def add(self, ids: np.ndarray, piece_lengths: np.ndarray, flags: bytes, chars: int) -> EncodedChunk | None:
        self.chars += chars
        tails = np.flatnonzero(np.frombuffer(flags, dtype=np.uint8) & TAIL)
        if len(tails) == 0:  # still inside one long document
            self.carry.append(ids)
            self.carry_n += len(ids)
            return None
        ends = np.cumsum(piece_lengths)[tails]  # end of each finished document in `ids`
        cut = int(ends[-1])
        lengths = np.diff(ends, prepend=0)
        lengths[0] += self.carry_n
        whole = np.concatenate([*self.carry, ids[:cut]]) if self.carry else ids[:cut]
        out = EncodedChunk(whole, lengths, self.chars)
        self.carry = [ids[cut:]] if cut < len(ids) else []
        self.carry_n = len(ids) - cut
        self.chars = 0
        return out


class ParallelEncoder:
    """Tokenizes document streams in `num_workers` processes (0: in this one), keeping input order.

    The worker pool starts on first use and is shared by every stream encoded until `close()` (both splits
    of a preparation), since starting interpreters costs about as much as tokenizing a few megabytes.
    Documents longer than `piece_chars` are tokenized in pieces when the tokenizer gives the same tokens
    that way (`tokenizer.splits_cleanly`); otherwise they go whole, and `warn` is told once.
    """

    def __init__(self, tokenizer_file: str, *, bos_id: int | None, eos_id: int, dtype: str, num_workers: int,
                 chunk_chars: int = 1 << 18, piece_chars: int | None = PIECE_CHARS,
                 warn: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.args = (tokenizer_file, bos_id, eos_id, dtype)
        self.num_workers = num_workers
        self.chunk_chars = chunk_chars
        self.piece_chars = piece_chars
        self._pool = None
        self._local: _Encoder | None = None
        self._warn = warn or (lambda msg: print(f"data_prep: warning: {msg}", file=sys.stderr, flush=True))
        # the length past which a document this tokenizer cannot take in pieces is worth a warning
        self._warn_chars: int | None = None
        if piece_chars is not None and not splits_cleanly(Tokenizer.from_file(tokenizer_file)):
            self.piece_chars, self._warn_chars = None, piece_chars

    def __enter__(self) -> ParallelEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _watch(self, texts: Iterable[str]) -> Iterator[str]:
        """Pass texts through, warning once about a long document this tokenizer cannot take in pieces."""
        for t in texts:
            if self._warn_chars is not None and len(t) > self._warn_chars:
                self._warn(
                    f"a {len(t):,}-character document is tokenized whole, since cutting it would change this "
                    f"tokenizer's output ({self.args[0]}): expect ~100x its size in memory; split such "
                    "documents before preparing them"
                )
                self._warn_chars = None  # once
            yield t

    def encode(self, texts: Iterable[str]) -> Iterator[EncodedChunk]:
        chunks = chunked(self._watch(texts), self.chunk_chars, self.piece_chars)
        assembler = _Assembler()
        if self.num_workers == 0:
            if self._local is None:
                tokenizer_file, *rest = self.args
                self._local = _Encoder(Tokenizer.from_file(tokenizer_file), *rest)
            for c in chunks:
                done = assembler.add(*self._local(c.pieces, c.flags), c.flags, c.chars)
                if done is not None:
                    yield done
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
            pending.append((self._pool.submit(_encode_in_worker, c.pieces, c.flags), c.flags, c.chars))
            if len(pending) >= max_pending:
                fut, flags, chars = pending.popleft()
                done = assembler.add(*fut.result(), flags, chars)
                if done is not None:
                    yield done
        while pending:
            fut, flags, chars = pending.popleft()
            done = assembler.add(*fut.result(), flags, chars)
            if done is not None:
                yield done
