"""manifest.json: what a prepared directory holds, and the single source of truth the reader checks against.

The manifest is written last (atomically), so a directory without one is an unfinished preparation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.atomic import atomic_write_text
from data_prep.errors import DataError

FORMAT = "dsv3-token-shards"
VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
DOC_INDEX_DTYPE = "<u8"  # .docs files: little-endian uint64 offsets of document starts inside the shard


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardInfo:
    name: str  # files are NAME.bin (tokens) and NAME.docs (document starts)
    num_tokens: int
    num_docs: int  # documents that start in this shard
    sha256: str  # of NAME.bin
    docs_sha256: str  # of NAME.docs
    # Where the split's token stream stands after this shard: the next token is token `end_offset` of
    # document `end_doc` (0-based, in split order). A rerun resumes tokenizing from here.
    end_doc: int
    end_offset: int
    max_doc_tokens: int  # longest document finished so far in the split (running maximum)
    # The largest token id in NAME.bin (-1 if empty), so a reader can refuse ids its model cannot embed
    # without reading the shard. None in manifests written before it was recorded: the reader computes it.
    max_id: int | None = None

    @property
    def bin_file(self) -> str:
        return self.name + ".bin"

    @property
    def docs_file(self) -> str:
        return self.name + ".docs"


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)
    num_tokens: int = 0
    num_docs: int = 0
    max_doc_tokens: int = 0


@dataclass
class Manifest:
    vocab_size: int
    dtype: str
    bos_id: int
    eos_id: int
    pad_id: int
    add_bos: bool
    tokenizer_file: str
    tokenizer_sha256: str
    tokenizer_source: str
    params: dict[str, Any]
    params_hash: str
    splits: dict[str, SplitInfo]
    stats: dict[str, Any] = field(default_factory=dict)  # timings of the run that wrote it (informative)
    format: str = FORMAT
    version: int = VERSION
    directory: Path = field(default=Path("."), compare=False)  # where it was read from; not serialised

    @property
    def tokenizer_path(self) -> str:
        return str(self.directory / self.tokenizer_file)

    # Mapping-style access too, so callers may write m["vocab_size"] or m.vocab_size.
    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("directory")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], directory: Path) -> Manifest:
        d = dict(d)
        splits = {
            name: SplitInfo(
                shards=[ShardInfo(**s) for s in sp["shards"]],
                **{k: v for k, v in sp.items() if k != "shards"},
            )
            for name, sp in d.pop("splits").items()
        }
        return cls(**d, splits=splits, directory=directory)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=1) + "\n")


def read_manifest(directory: str | Path) -> Manifest:
    """Read DIR/manifest.json; every problem is a DataError naming the file and the fix."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    rerun = f"run `python -m data_prep out_dir={directory}` (with the corpus you want) to prepare it"
    if not directory.exists():
        raise DataError(f"data directory {directory} does not exist: {rerun}")
    if not path.exists():
        raise DataError(f"{path} is missing (not prepared, or the preparation was interrupted): {rerun}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): {rerun}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{path} is not a data_prep manifest (format != {FORMAT!r}): {rerun}")
    if raw.get("version") != VERSION:
        raise DataError(f"{path} has format version {raw.get('version')}, this reader reads {VERSION}: {rerun}")
    try:
        manifest = Manifest.from_dict(raw, directory)
    except (TypeError, KeyError, AttributeError) as e:
        raise DataError(f"{path} is malformed ({e}): {rerun}") from None
    if manifest.dtype not in ("uint16", "uint32"):
        raise DataError(f"{path}: unknown token dtype {manifest.dtype!r}: {rerun}")
    if not Path(manifest.tokenizer_path).exists():
        raise DataError(f"{manifest.tokenizer_path} is missing (listed in {path}): {rerun}")
    return manifest


def check_vocab(manifest: Manifest, model_vocab_size: int | None) -> None:
    """A tokenizer larger than the model's embedding would index out of range: refuse it up front."""
    if model_vocab_size is not None and manifest.vocab_size > model_vocab_size:
        raise DataError(
            f"{manifest.directory / MANIFEST_FILE}: tokenizer vocabulary ({manifest.vocab_size}) is larger "
            f"than the model's vocab_size ({model_vocab_size}): set model.vocab_size>={manifest.vocab_size} "
            "or prepare the data with a smaller tokenizer.vocab_size"
        )
