"""Token sources for the reader: one split of a prepared directory, or a Megatron .bin/.idx pair.

Both present a split as a list of shards (flat token arrays) with document starts. Shards are memory-mapped
on first use and checked then: file sizes against the manifest always, sha256 too with verify="full", and
their largest token id against the vocabulary (one np.max over the map, ~1 ms per 8 MiB shard). An id the
model cannot embed is an IndexError on CPU and a device-side assert on a GPU; here it is a DataError naming
the file. The ids a manifest records per shard are checked when the split is opened, before any read, and
shards without a record (older manifests, Megatron pairs) are scanned then.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.manifest import MANIFEST_FILE, Manifest, check_vocab, read_manifest
from data_prep.megatron import MegatronDataset, prefix_of
from data_prep.shards import shard_problem

VERIFY_MODES = ("size", "full")

# What this process already verified, keyed on (path, size, mtime): a file checked once (by the trainer's
# pre-flight, or the previous evaluation) is not hashed or scanned again while it is unchanged.
_HASHED: set[tuple[str, int, int]] = set()
_MAX_IDS: dict[tuple[str, int, int], int] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def max_token_id(path: Path, tokens: np.ndarray) -> int:
    """The largest id in a shard's tokens (-1 if empty), computed once per unchanged file."""
    key = _file_key(path)
    found = _MAX_IDS.get(key)
    if found is None:
        found = int(tokens.max()) if len(tokens) else -1
        _MAX_IDS[key] = found
    return found


class TokenSource(ABC):
    """A split as shards. `bases[i]` is shard i's first token in the split's token stream."""

    name: str
    shard_tokens: np.ndarray  # int64 [num_shards]
    bases: np.ndarray  # int64 [num_shards + 1]
    vocab_size: int | None
    eos_id: int | None
    pad_id: int
    tokenizer_sha256: str | None
    fingerprint: str  # identifies the content, so a resumed run can tell it reads the same data
    max_doc_tokens: int | None  # longest document (tokens), when recorded
    model_vocab_size: int | None = None  # the embedding the tokens feed, when known

    @property
    def id_limit(self) -> int | None:
        """Token ids must be below this: the tokenizer's and the model's vocabulary, whichever is smaller."""
        sizes = [v for v in (self.vocab_size, self.model_vocab_size) if v is not None]
        return min(sizes) if sizes else None

    @abstractmethod
    def id_error(self, path: Path, token_id: int) -> DataError:
        """The error for a shard holding `token_id` >= id_limit."""

    def _check_ids(self, path: Path, tokens: np.ndarray) -> None:
        limit = self.id_limit
        if limit is not None and max_token_id(path, tokens) >= limit:
            raise self.id_error(path, max_token_id(path, tokens))

    def verify_all(self) -> None:
        """Check every shard now (sizes, sha256 under verify="full", token ids), not on first use."""
        for i in range(self.num_shards):
            self.tokens(i)

    def scan_unrecorded(self) -> None:
        """Scan now the shards whose largest id no manifest records (their first read would otherwise)."""
        self.verify_all()

    def _set_shards(self, counts: list[int]) -> None:
        self.shard_tokens = np.asarray(counts, dtype=np.int64)
        self.bases = np.concatenate([[0], np.cumsum(self.shard_tokens)]).astype(np.int64)

    @property
    def num_shards(self) -> int:
        return len(self.shard_tokens)

    @abstractmethod
    def tokens(self, shard: int) -> np.ndarray:
        """The shard's tokens (memory-mapped)."""

    @abstractmethod
    def doc_starts(self, shard: int) -> np.ndarray:
        """int64 offsets, inside the shard, of the documents that start there."""

    def all_doc_starts(self) -> np.ndarray:
        """Document starts as offsets in the split's token stream."""
        parts = [self.doc_starts(i) + self.bases[i] for i in range(self.num_shards)]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split's stream, across shard boundaries if need be."""
        s = int(np.searchsorted(self.bases, start, side="right")) - 1
        local = start - int(self.bases[s])
        arr = self.tokens(s)
        if local + n <= len(arr):
            return arr[local : local + n]
        pieces = [arr[local:]]
        got = len(pieces[0])
        while got < n:
            s += 1
            piece = self.tokens(s)[: n - got]
            pieces.append(piece)
            got += len(piece)
        return np.concatenate(pieces)


class PreparedSplit(TokenSource):
    """A split of a directory written by data_prep (manifest.json + NAME.bin/NAME.docs shards)."""

    def __init__(
        self, directory: str | Path, split: str, verify: str = "size", model_vocab_size: int | None = None
    ) -> None:
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        check_vocab(self.manifest, model_vocab_size)
        if split not in self.manifest.splits:
            raise DataError(
                f"{self.directory / MANIFEST_FILE} has no {split!r} split "
                f"(has {sorted(self.manifest.splits)}): prepare it with data_prep"
            )
        self.split = split
        self.info = self.manifest.splits[split]
        self.full = verify == "full"
        self.dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        self.name = f"{self.directory}[{split}]"
        self._set_shards([s.num_tokens for s in self.info.shards])
        self.vocab_size = self.manifest.vocab_size
        self.eos_id = self.manifest.eos_id
        self.pad_id = self.manifest.pad_id
        self.tokenizer_sha256 = self.manifest.tokenizer_sha256
        self.max_doc_tokens = self.info.max_doc_tokens
        self.fingerprint = f"{self.manifest.params_hash}:{split}:{self.info.num_tokens}"
        self._tokens: dict[int, np.ndarray] = {}
        self._checked: set[int] = set()
        self.model_vocab_size = model_vocab_size
        # the largest ids the manifest records: refused now, before a single token is read
        limit = self.id_limit
        for shard in self.info.shards:
            if limit is not None and shard.max_id is not None and shard.max_id >= limit:
                raise self.id_error(self.directory / shard.bin_file, shard.max_id)

    def scan_unrecorded(self) -> None:
        for i, shard in enumerate(self.info.shards):
            if shard.max_id is None:  # a manifest written before ids were recorded
                self.tokens(i)

    def id_error(self, path: Path, token_id: int) -> DataError:
        model = f", the model's {self.model_vocab_size}" if self.model_vocab_size is not None else ""
        return DataError(
            f"{path} holds token id {token_id}, outside the vocabulary (the tokenizer's {self.vocab_size} ids in "
            f"{self.directory / MANIFEST_FILE}{model}): the shard does not belong to this manifest (replaced, "
            f"corrupted or written by another tokenizer): rerun `python -m data_prep out_dir={self.directory} ...` "
            "to rebuild it"
        )

    def _check(self, i: int) -> None:
        if i in self._checked:
            return
        info = self.info.shards[i]
        problem = shard_problem(self.directory, info, self.dtype.itemsize, full=False)
        if problem is None and self.full:
            path = self.directory / info.bin_file
            key = _file_key(path)
            if key not in _HASHED:
                problem = shard_problem(self.directory, info, self.dtype.itemsize, full=True)
                if problem is None:
                    _HASHED.add(key)
        if problem:
            raise DataError(
                f"{problem}: rerun the same `python -m data_prep out_dir={self.directory} ...` command to rebuild it"
            )
        self._checked.add(i)

    def tokens(self, shard: int) -> np.ndarray:
        arr = self._tokens.get(shard)
        if arr is None:
            self._check(shard)
            path = self.directory / self.info.shards[shard].bin_file
            # a plain ndarray view of the map: slicing it skips np.memmap's per-slice Python overhead
            arr = np.memmap(path, dtype=self.dtype, mode="r").view(np.ndarray)
            self._check_ids(path, arr)
            self._tokens[shard] = arr
        return arr

    def doc_starts(self, shard: int) -> np.ndarray:
        self._check(shard)
        path = self.directory / self.info.shards[shard].docs_file
        return np.fromfile(path, dtype="<u8").astype(np.int64)


class MegatronSplit(TokenSource):
    """A Megatron PREFIX.bin/.idx pair as a single-shard split (it has no train/val division)."""

    def __init__(self, prefix: str | Path, pad_id: int = 0, model_vocab_size: int | None = None) -> None:
        self.ds = MegatronDataset(prefix)
        self.model_vocab_size = model_vocab_size
        self._ids_checked = False
        self.name = str(self.ds.prefix)
        self._set_shards([len(self.ds.tokens)])
        self.vocab_size = None
        self.eos_id = None
        self.pad_id = pad_id  # padding is masked out of the loss; any id in range will do
        self.tokenizer_sha256 = None
        starts = self.ds.document_starts()
        self._starts = starts.astype(np.int64)
        lengths = np.diff(np.append(self._starts, len(self.ds.tokens)))
        self.max_doc_tokens = int(lengths.max()) if len(lengths) else 0
        st = self.ds.bin_path.stat()
        self.fingerprint = (
            "megatron:" + hashlib.sha256(f"{self.ds.prefix.name}:{st.st_size}:{len(self.ds)}".encode()).hexdigest()[:16]
        )

    def id_error(self, path: Path, token_id: int) -> DataError:
        return DataError(
            f"{path} holds token id {token_id} but the model's vocab_size is {self.model_vocab_size}: set "
            f"model.vocab_size>={token_id + 1}, or tokenize the data with a tokenizer of at most "
            f"{self.model_vocab_size} tokens"
        )

    def tokens(self, shard: int) -> np.ndarray:
        if not self._ids_checked:  # no manifest says what the ids are: scan the whole file once
            self._check_ids(self.ds.bin_path, self.ds.tokens)
            self._ids_checked = True
        return self.ds.tokens

    def doc_starts(self, shard: int) -> np.ndarray:
        return self._starts


def open_source(
    path: str | Path, split: str, verify: str = "size", *, model_vocab_size: int | None = None
) -> TokenSource:
    """A prepared directory (has manifest.json) or a Megatron prefix; anything else is a DataError.

    With `model_vocab_size`, a tokenizer larger than the model, or a shard holding an id the model cannot
    embed, is refused (recorded ids now, the rest as each shard is first read).
    """
    if verify not in VERIFY_MODES:
        raise DataError(f"verify={verify!r} is not one of {VERIFY_MODES}")
    p = Path(path)
    if p.is_dir():
        return PreparedSplit(p, split, verify, model_vocab_size)
    prefix = prefix_of(p)
    if prefix is not None:
        if split != "train":
            raise DataError(
                f"{path} is a Megatron .bin/.idx pair, which has no {split!r} split: pass a "
                "separate pair for it (read it with split='train')"
            )
        return MegatronSplit(prefix, model_vocab_size=model_vocab_size)
    raise DataError(
        f"data path {path} does not exist (neither a prepared directory nor a Megatron "
        "PREFIX.bin/.idx): run `python -m data_prep` or fix the path"
    )
