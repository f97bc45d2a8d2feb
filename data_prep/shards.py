"""Shard files: fixed-budget token shards with a document index, written atomically and verified on read.

A split's documents (each ending in EOS) form one token stream, cut every `shard_tokens` tokens:
NAME.bin holds the raw tokens (little-endian uint16/uint32), NAME.docs the uint64 offsets, inside the
shard, of the documents that start there. A document may continue into the next shard, so every shard but a
split's last holds exactly `shard_tokens` tokens whatever the document lengths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_prep.atomic import atomic_write_bytes, file_sha256
from data_prep.manifest import DOC_INDEX_DTYPE, ShardInfo, shard_name


class ShardWriter:
    """Cuts a stream of tokenized documents into shards; each finished shard is reported to `on_shard`.

    It can start mid-stream (a resumed run): `start_doc` / `start_offset` say where the next token sits in
    the split's document sequence, and the first document passed to `add` is document `start_doc`, of which
    the first `start_offset` tokens are already in earlier shards.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        shard_tokens: int,
        dtype: str,
        on_shard: Callable[[ShardInfo], None],
        start_index: int = 0,
        start_doc: int = 0,
        start_offset: int = 0,
        max_doc_tokens: int = 0,
    ) -> None:
        self.directory = directory
        self.split = split
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.buf = np.empty(shard_tokens, dtype=self.dtype)
        self.fill = 0
        self.doc_starts: list[np.ndarray] = []
        self.on_shard = on_shard
        self.index = start_index
        self.doc = start_doc  # split index of the next document `add` receives
        self.skip = start_offset  # tokens of that document already written
        self.max_doc_tokens = max_doc_tokens
        self.end = (start_doc, start_offset)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append whole documents (concatenated `ids`, per-document `lengths`) to the stream."""
        if len(lengths) == 0:
            return
        skip, self.skip = self.skip, 0
        if skip:
            ids = ids[skip:]
        ends = np.cumsum(lengths) - skip  # end of each document in `ids`
        starts = ends - lengths  # the first may be negative: a document resumed mid-way starts earlier
        pos, n = 0, len(ids)
        while pos < n:
            take = min(n - pos, len(self.buf) - self.fill)
            lo, hi = np.searchsorted(starts, [pos, pos + take])
            self.doc_starts.append(starts[lo:hi] - pos + self.fill)
            self.buf[self.fill : self.fill + take] = ids[pos : pos + take]
            self.fill += take
            pos += take
            done = int(np.searchsorted(ends, pos, side="right"))  # documents finished so far
            if done:
                self.max_doc_tokens = max(self.max_doc_tokens, int(lengths[:done].max()))
            if done == len(lengths):
                self.end = (self.doc + done, 0)
            else:
                self.end = (self.doc + done, int(pos - starts[done]))
            if self.fill == len(self.buf):
                self._flush()
        self.doc += len(lengths)

    def close(self) -> None:
        """Write the last, partial shard of the split (if any tokens are left)."""
        if self.fill:
            self._flush()

    def _flush(self) -> None:
        name = shard_name(self.split, self.index)
        tokens = self.buf[: self.fill]
        starts = (
            np.concatenate(self.doc_starts).astype(DOC_INDEX_DTYPE) if self.doc_starts else np.empty(0, DOC_INDEX_DTYPE)
        )
        token_bytes = memoryview(tokens).cast("B")
        atomic_write_bytes(self.directory / f"{name}.bin", token_bytes)
        atomic_write_bytes(self.directory / f"{name}.docs", starts.tobytes())
        info = ShardInfo(
            name=name,
            num_tokens=int(self.fill),
            num_docs=len(starts),
            sha256=hashlib.sha256(token_bytes).hexdigest(),
            docs_sha256=hashlib.sha256(starts.tobytes()).hexdigest(),
            end_doc=self.end[0],
            end_offset=self.end[1],
            max_doc_tokens=self.max_doc_tokens,
            max_id=int(tokens.max()) if len(tokens) else -1,
        )
        self.fill = 0
        self.doc_starts = []
        self.index += 1
        self.on_shard(info)


def shard_problem(directory: Path, info: ShardInfo, itemsize: int, full: bool) -> str | None:
    """Why NAME.bin / NAME.docs do not match the manifest entry (None if they do).

    Sizes are always checked (cheap, catches truncation); sha256 only when `full` (reads every byte).
    """
    for fname, nbytes, digest in (
        (info.bin_file, info.num_tokens * itemsize, info.sha256),
        (info.docs_file, info.num_docs * 8, info.docs_sha256),
    ):
        path = directory / fname
        if not path.exists():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != nbytes:
            return f"{path} is {size} bytes, manifest.json says {nbytes} (truncated or replaced)"
        if full and file_sha256(path) != digest:
            return f"{path} does not match its sha256 in manifest.json (corrupted)"
    return None
