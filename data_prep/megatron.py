"""Megatron-LM's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`), so data prepared for Megatron can be
trained on as is.

PREFIX.bin is the token sequences back to back. PREFIX.idx, all little-endian:
  9 bytes magic b"MMIDIDX\\x00\\x00" | uint64 version (1) | uint8 dtype code |
  uint64 sequence count S | uint64 document-index length D |
  int32[S] sequence lengths (tokens) | int64[S] sequence byte offsets into .bin |
  int64[D] document index: document k is sequences [doc_idx[k], doc_idx[k+1]).
The writer here emits one sequence per document (what Megatron's preprocess_data.py does without sentence
splitting); the reader accepts any number of sequences per document.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.atomic import atomic_write_bytes
from data_prep.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_TOKEN_CODES = {1, 2, 3, 4, 5, 8}


def prefix_of(path: str | Path) -> Path | None:
    """PREFIX if `path` is PREFIX, PREFIX.bin or PREFIX.idx and both files exist, else None."""
    p = Path(path)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    if p.with_name(p.name + ".bin").is_file() and p.with_name(p.name + ".idx").is_file():
        return p
    return None


@dataclass
class MegatronIndex:
    dtype: np.dtype
    sizes: np.ndarray  # int32 [S] tokens per sequence
    pointers: np.ndarray  # int64 [S] byte offset of each sequence in .bin
    doc_idx: np.ndarray  # int64 [D] document boundaries in sequence numbers


def read_index(path: Path) -> MegatronIndex:
    data = path.read_bytes()
    fix = "regenerate it with Megatron's tools/preprocess_data.py"
    head = 9 + 8 + 1 + 8 + 8
    if len(data) < head or data[:9] != MAGIC:
        raise DataError(f"{path} is not a Megatron MMIDIDX index (bad magic): {fix}")
    (version,) = struct.unpack_from("<Q", data, 9)
    if version != VERSION:
        raise DataError(f"{path}: Megatron index version {version}, only {VERSION} is supported: {fix}")
    (code,) = struct.unpack_from("<B", data, 17)
    if code not in _TOKEN_CODES:
        raise DataError(f"{path}: dtype code {code} is not an integer token type: {fix}")
    n_seq, n_doc = struct.unpack_from("<QQ", data, 18)
    need = head + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if len(data) < need:
        raise DataError(f"{path} is truncated ({len(data)} bytes, header promises {need}): {fix}")
    sizes = np.frombuffer(data, "<i4", n_seq, head)
    pointers = np.frombuffer(data, "<i8", n_seq, head + 4 * n_seq)
    doc_idx = np.frombuffer(data, "<i8", n_doc, head + 12 * n_seq)
    return MegatronIndex(DTYPE_CODES[code].newbyteorder("<"), sizes, pointers, doc_idx)


class MegatronDataset:
    """Sequences (and documents) of a PREFIX.bin/.idx pair, memory-mapped."""

    def __init__(self, prefix: str | Path) -> None:
        p = prefix_of(prefix)
        if p is None:
            raise DataError(f"{prefix}: no Megatron PREFIX.bin + PREFIX.idx pair there: check the path")
        self.prefix = p
        self.bin_path = p.with_name(p.name + ".bin")
        self.index = read_index(p.with_name(p.name + ".idx"))
        itemsize = self.index.dtype.itemsize
        sizes, pointers = self.index.sizes.astype(np.int64), self.index.pointers
        end = int(pointers[-1] + sizes[-1] * itemsize) if len(sizes) else 0
        size = self.bin_path.stat().st_size
        if size != end:
            raise DataError(
                f"{self.bin_path} is {size} bytes, its .idx describes {end} (truncated or "
                "mismatched pair): regenerate the pair"
            )
        # The reader treats .bin as one token stream, which needs the sequences back to back, in order.
        if len(sizes) and (pointers[0] != 0 or np.any(pointers[1:] != pointers[:-1] + sizes[:-1] * itemsize)):
            raise DataError(
                f"{self.bin_path}: sequences are not stored contiguously in order: "
                "rewrite it with Megatron's preprocess_data.py"
            )
        self.tokens = (
            np.memmap(self.bin_path, dtype=self.index.dtype, mode="r").view(np.ndarray)
            if size
            else np.empty(0, self.index.dtype)
        )

    def __len__(self) -> int:
        return len(self.index.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.index.pointers[i]) // self.index.dtype.itemsize
        return self.tokens[start : start + int(self.index.sizes[i])]

    @property
    def num_documents(self) -> int:
        return max(0, len(self.index.doc_idx) - 1)

    def document(self, k: int) -> np.ndarray:
        lo, hi = int(self.index.doc_idx[k]), int(self.index.doc_idx[k + 1])
        if lo == hi:
            return self.tokens[:0]
        start = int(self.index.pointers[lo]) // self.index.dtype.itemsize
        end = int(self.index.pointers[hi - 1]) // self.index.dtype.itemsize + int(self.index.sizes[hi - 1])
        return self.tokens[start:end]

    def document_starts(self) -> np.ndarray:
        """Token offsets in .bin where documents begin (empty documents dropped)."""
        d = self.index.doc_idx
        firsts = d[:-1][d[1:] > d[:-1]]
        return self.index.pointers[firsts] // self.index.dtype.itemsize


def write_indexed_dataset(
    prefix: str | Path, documents: Iterable[np.ndarray | list[int]], dtype: np.dtype | type = np.uint16
) -> None:
    """Write documents as a Megatron PREFIX.bin/.idx pair (one sequence per document), atomically."""
    prefix = Path(prefix)
    dtype = np.dtype(dtype).newbyteorder("<")
    code = next(k for k, v in DTYPE_CODES.items() if v == dtype.newbyteorder("="))
    arrays = [np.asarray(d, dtype=dtype) for d in documents]
    sizes = np.array([len(a) for a in arrays], dtype="<i4")
    pointers = np.zeros(len(arrays), dtype="<i8")
    if len(arrays) > 1:
        pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * dtype.itemsize
    doc_idx = np.arange(len(arrays) + 1, dtype="<i8")
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", code)
    header += struct.pack("<QQ", len(sizes), len(doc_idx))
    body = np.concatenate(arrays) if arrays else np.empty(0, dtype)
    atomic_write_bytes(prefix.with_name(prefix.name + ".bin"), body.tobytes())
    atomic_write_bytes(
        prefix.with_name(prefix.name + ".idx"),
        header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes(),
    )
