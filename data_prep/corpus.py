"""Corpora: where documents come from, in a deterministic order, and which split each one belongs to.

A corpus yields (key, text) records. The split of a record is a pure function of its key (the file path for
the stdlib corpus, the text itself otherwise), so it is stable across machines, reruns and worker counts,
and identical documents never straddle train and validation.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import sys
import sysconfig
import tokenize
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from data_prep.errors import DataError

STDLIB = "python_stdlib"
SPLITS = ("train", "val")
_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a hash-selected `val_fraction` of keys, else 'train' (sha256, so stable everywhere)."""
    if val_fraction <= 0.0:
        return "train"
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    return "val" if h < val_fraction * 2.0**64 else "train"


@dataclass
class Corpus(ABC):
    """A named source of documents; subclasses implement `records()`."""

    name: str
    fingerprint: dict[str, Any] = field(default_factory=dict)  # identifies the content, for reruns
    approx_chars: int | None = None  # rough size, to pick the tokenizer-training subset
    num_records: int | None = None  # for the progress bar, when cheap to know

    # Preparation reads a corpus several times (emptiness check, tokenizer sample, one pass per split).
    # Corpora up to this size are read once: records are memoised as they are first read, and every pass,
    # even one that starts before an earlier pass finished, continues from the shared reader.
    cache_limit_chars = 128_000_000

    def records(self) -> Iterator[tuple[str, str]]:
        """(split key, text) pairs in corpus order."""
        if self.approx_chars is None or self.approx_chars > self.cache_limit_chars:
            yield from self._records()
            return
        if getattr(self, "_memo", None) is None:
            self._memo: list[tuple[str, str]] = []
            self._source: Iterator[tuple[str, str]] | None = self._records()
        i = 0
        while True:
            if i < len(self._memo):
                yield self._memo[i]
                i += 1
                continue
            if self._source is None:
                return
            rec = next(self._source, None)
            if rec is None:
                self._source = None
                return
            self._memo.append(rec)

    @abstractmethod
    def _records(self) -> Iterator[tuple[str, str]]:
        """(path, text) of every document, in corpus order."""

    def documents(self, split: str, val_fraction: float, max_documents: int | None = None) -> Iterator[str]:
        """Non-empty texts of one split, in corpus order; `max_documents` truncates the corpus first."""
        for key, text in islice(self.records(), max_documents):
            if text and split_of(key, val_fraction) == split:
                yield text


# --- the Python standard library -------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library (no site-packages), sorted by relative POSIX path."""
    root = root or stdlib_root()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        out.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def decode_source(data: bytes) -> str:
    """Python source bytes to text: UTF-8, else the PEP 263 declared encoding, else UTF-8 with U+FFFD.

    The stdlib test suite holds a few deliberately mis-encoded files; replacing their bad bytes keeps every
    file in the corpus without failing the run.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return data.decode("utf-8", errors="replace")


class StdlibCorpus(Corpus):
    """The running interpreter's standard library: a real ~34 MB corpus present on every machine."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or stdlib_root()
        self.files = stdlib_files(self.root)
        if not self.files:
            raise DataError(f"corpus=python_stdlib found no .py files under {self.root}: pass corpus=<path>")
        listing = hashlib.sha256()
        total = 0
        for p in self.files:
            size = p.stat().st_size
            total += size
            listing.update(f"{p.relative_to(self.root).as_posix()}:{size}\n".encode())
        super().__init__(
            name=STDLIB,
            fingerprint={
                "kind": STDLIB,
                "python": sys.version.split()[0],
                "files": len(self.files),
                "bytes": total,
                "listing_sha256": listing.hexdigest(),
            },
            approx_chars=total,
            num_records=len(self.files),
        )

    def _records(self) -> Iterator[tuple[str, str]]:
        for p in self.files:
            yield p.relative_to(self.root).as_posix(), decode_source(p.read_bytes())


# --- local files and hub datasets, read through `datasets` ------------------------------------------------


def _builder_for(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def local_files(path: Path, include: str = "*") -> list[Path]:
    """A file, or every non-hidden file under a directory whose name matches `include`, sorted."""
    if path.is_file():
        return [path]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        out.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and fnmatch.fnmatch(f, include))
    return sorted(out, key=lambda p: p.relative_to(path).as_posix())


def _quiet_datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


class FilesCorpus(Corpus):
    """Local text (one document per file), JSONL/JSON or Parquet (one document per row) files."""

    def __init__(self, path: Path, text_field: str = "text", include: str = "*") -> None:
        self.path = path
        self.text_field = text_field
        self.files = local_files(path, include)
        if not self.files:
            raise DataError(f"corpus {path} holds no files matching {include!r}: point corpus= at text files")
        listing = hashlib.sha256()
        total = 0
        for p in self.files:
            st = p.stat()
            total += st.st_size
            listing.update(f"{p.as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        text_files = sum(_builder_for(p) == "text" for p in self.files)
        super().__init__(
            name=str(path),
            fingerprint={
                "kind": "files",
                "path": str(path.resolve()),
                "files": len(self.files),
                "bytes": total,
                "listing_sha256": listing.hexdigest(),
                "text_field": text_field,
            },
            approx_chars=total,
            num_records=len(self.files) if text_files == len(self.files) else None,
        )

    def _records(self) -> Iterator[tuple[str, str]]:
        # Consecutive files of one kind go to one `datasets` builder, so the corpus order is the file order.
        groups: list[tuple[str, list[Path]]] = []
        for p in self.files:
            kind = _builder_for(p)
            if groups and groups[-1][0] == kind:
                groups[-1][1].append(p)
            else:
                groups.append((kind, [p]))
        for kind, files in groups:
            yield from self._read_group(kind, files)

    def _read_group(self, kind: str, files: list[Path]) -> Iterator[tuple[str, str]]:
        datasets = _quiet_datasets()
        kwargs: dict[str, Any] = {"sample_by": "document"} if kind == "text" else {}
        field_name = "text" if kind == "text" else self.text_field
        try:
            ds = datasets.load_dataset(
                kind, data_files=[str(p) for p in files], split="train", streaming=True, **kwargs
            )
            for row in ds:
                if field_name not in row:
                    raise DataError(
                        f"{files[0]}: rows have no {field_name!r} field (columns: {sorted(row)}): "
                        "set text_field=<column>"
                    )
                text = row[field_name]
                if text is not None and not isinstance(text, str):
                    raise DataError(f"{files[0]}: field {field_name!r} is not text: set text_field=<column>")
                yield text or "", text or ""
        except DataError:
            raise
        except UnicodeDecodeError:
            bad = next((p for p in files if not _decodes(p)), files[0])
            raise DataError(f"{bad} is not UTF-8 text: remove it or select files with include='*.ext'") from None
        except Exception as e:  # datasets/pyarrow parse errors: name the files and the problem
            raise DataError(
                f"cannot read {kind} files starting at {files[0]}: {type(e).__name__}: {_one_line(e)}: "
                "fix or remove the file"
            ) from None


def _decodes(path: Path) -> bool:
    try:
        path.read_text(encoding="utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class HubCorpus(Corpus):
    """A dataset name that `datasets.load_dataset` resolves (needs a network unless cached)."""

    def __init__(self, name: str, config: str | None, text_field: str) -> None:
        self.config = config
        self.text_field = text_field
        super().__init__(
            name=name, fingerprint={"kind": "hub", "name": name, "config": config, "text_field": text_field}
        )
        self._open()  # fail now, before any output is written

    def _open(self) -> Any:
        datasets = _quiet_datasets()
        try:
            return datasets.load_dataset(self.name, self.config, split="train", streaming=True)
        except Exception as e:
            raise DataError(
                f"corpus {self.name!r} is not a local path and `datasets` cannot load it "
                f"({type(e).__name__}: {_one_line(e)[:160]}): fix the path, or connect to the network"
            ) from None

    def _records(self) -> Iterator[tuple[str, str]]:
        for row in self._open():
            if self.text_field not in row:
                raise DataError(
                    f"dataset {self.name!r} has no {self.text_field!r} column (columns: {sorted(row)}): "
                    "set text_field=<column>"
                )
            text = row[self.text_field] or ""
            yield text, text


def open_corpus(spec: str, text_field: str = "text", hub_config: str | None = None, include: str = "*") -> Corpus:
    """Resolve the `corpus=` setting: python_stdlib, a local path, or a `datasets` name."""
    if spec == STDLIB:
        return StdlibCorpus()
    path = Path(spec).expanduser()
    if path.exists():
        return FilesCorpus(path, text_field, include)
    # "org/name" may be a hub dataset; anything more path-like that does not exist is a missing path.
    looks_like_path = spec.startswith(("/", "./", "../", "~", ".")) or spec.count("/") > 1
    if looks_like_path or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"corpus path {spec} does not exist: check the path (or use corpus=python_stdlib)")
    return HubCorpus(spec, hub_config, text_field)
