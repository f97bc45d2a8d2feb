"""`prepare(cfg)`: corpus -> tokenizer -> verified shards -> manifest, resumable and safe to interrupt.

Order of work, chosen so that an interrupted run never leaves anything the reader would accept:
1. check the corpus has text (before writing anything);
2. drop any old manifest.json (a directory without one is "not ready" for the reader);
3. obtain the tokenizer and save it as tokenizer.json;
4. per split, tokenize and write shards; after each shard, append a line recording it to progress.jsonl
   (an append-only log, so recording stays O(1) per shard; a torn last line is ignored);
5. write manifest.json last, then remove progress.jsonl.
A rerun with the same parameters verifies the recorded shards (size and sha256), keeps the longest intact
prefix, and resumes tokenizing from the position recorded after it, so its shards are byte-identical to
those of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.atomic import atomic_write_text, remove_tmp_files
from data_prep.config import PrepConfig, to_prep_config, validate
from data_prep.corpus import SPLITS, Corpus, open_corpus
from data_prep.encode import ParallelEncoder
from data_prep.errors import DataError
from data_prep.manifest import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    dtype_for_vocab,
    params_hash,
    read_manifest,
    write_manifest,
)
from data_prep.shards import ShardWriter, shard_problem
from data_prep.tokenizer import BOS, EOS, PAD, TokenizerInfo, load_tokenizer, train_bpe, training_subset

PROGRESS_FILE = "progress.jsonl"
LOCK_FILE = ".data_prep.lock"


def prepare(cfg: Any) -> Manifest:
    """Prepare (or finish, or confirm up to date) the shards described by `cfg`; returns the manifest.

    `cfg` is a PrepConfig, an OmegaConf DictConfig or a dict with PrepConfig's keys. User mistakes raise
    DataError with a one-line message.
    """
    cfg = to_prep_config(cfg)
    validate(cfg)
    corpus = open_corpus(cfg.corpus, cfg.text_field, cfg.hub_config, cfg.include)
    if next(corpus.documents("train", cfg.val_fraction, cfg.max_documents), None) is None:
        raise DataError(
            f"corpus {corpus.name} has no non-empty documents for the train split: "
            "point corpus= at files with text (or lower val_fraction)"
        )
    out = Path(cfg.out_dir)
    prep = _Preparation(cfg, corpus, out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create out_dir {out} ({e.strerror}): choose a writable out_dir") from None
    with _locked(out):
        return prep.run()


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One writer per directory: a second `prepare` on the same out_dir waits, then finds it up to date."""
    with open(out / LOCK_FILE, "a") as f:  # "a": never truncates or touches an existing lock file
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _tokenizer_sha(info: TokenizerInfo) -> str:
    return hashlib.sha256(info.tokenizer.to_str().encode()).hexdigest()


class _Preparation:
    def __init__(self, cfg: PrepConfig, corpus: Corpus, out: Path) -> None:
        self.cfg = cfg
        self.corpus = corpus
        self.out = out
        self.loaded: TokenizerInfo | None = None
        if cfg.tokenizer.path is not None:
            self.loaded = load_tokenizer(
                cfg.tokenizer.path, cfg.tokenizer.bos_token, cfg.tokenizer.eos_token, cfg.tokenizer.pad_token
            )
            self._check_vocab(self.loaded)
        self.params = self._params()
        self.hash = params_hash(self.params)
        self.progress: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        if self.cfg.progress:
            print(f"data_prep: {msg}", file=sys.stderr, flush=True)

    def _params(self) -> dict[str, Any]:
        """Everything that determines the shards' bytes (and nothing that does not, like num_workers)."""
        c = self.cfg
        tok = dataclasses.asdict(c.tokenizer)
        if self.loaded is not None:
            tok["sha256"] = _tokenizer_sha(self.loaded)
        return {
            "format_version": VERSION,
            "corpus": self.corpus.fingerprint,
            "val_fraction": c.val_fraction,
            "shard_tokens": c.shard_tokens,
            "add_bos": c.add_bos,
            "max_documents": c.max_documents,
            "include": c.include,
            "text_field": c.text_field,
            "hub_config": c.hub_config,
            "tokenizer": tok,
        }

    def _check_vocab(self, info: TokenizerInfo) -> None:
        limit = self.cfg.model_vocab_size
        if limit is not None and info.vocab_size > limit:
            raise DataError(
                f"tokenizer {info.source} has {info.vocab_size} tokens, more than model_vocab_size={limit}: "
                "use a smaller tokenizer (tokenizer.vocab_size) or a larger model vocabulary"
            )

    # -- state of a previous run ------------------------------------------------------------------------

    def _previous(self) -> tuple[dict[str, Any] | None, Manifest | None]:
        """The recorded state of an earlier run with the same parameters (progress dict, manifest)."""
        mpath, ppath = self.out / MANIFEST_FILE, self.out / PROGRESS_FILE
        if mpath.exists():
            raw = _load_json(mpath)
            if raw.get("params_hash") == self.hash and isinstance(raw.get("splits"), dict):
                splits = {k: {"shards": v.get("shards", []), "done": True} for k, v in raw["splits"].items()}
                prog = {
                    "params_hash": self.hash,
                    "tokenizer_sha256": raw.get("tokenizer_sha256"),
                    "splits": splits,
                }
                try:
                    return prog, read_manifest(self.out)
                except DataError:  # e.g. tokenizer.json deleted: the shards may still be reusable
                    return prog, None
            self._refuse_or_wipe(mpath)
            return None, None
        if ppath.exists():
            prog = _load_progress(ppath)
            if prog.get("params_hash") == self.hash:
                return prog, None
            self._refuse_or_wipe(ppath)
        return None, None

    def _refuse_or_wipe(self, found: Path) -> None:
        if not self.cfg.overwrite:
            raise DataError(
                f"{found} belongs to a preparation with different parameters: choose another out_dir, "
                "or set overwrite=true to replace it"
            )
        self.log(f"overwrite=true: removing the previous preparation in {self.out}")
        for pattern in (
            MANIFEST_FILE,
            PROGRESS_FILE,
            TOKENIZER_FILE,
            "train-*.bin",
            "train-*.docs",
            "val-*.bin",
            "val-*.docs",
        ):
            for p in self.out.glob(pattern):
                p.unlink()

    # -- the run ----------------------------------------------------------------------------------------

    def run(self) -> Manifest:
        start = time.perf_counter()
        remove_tmp_files(self.out)
        prev, manifest = self._previous()
        if manifest is not None and self._all_intact(manifest):
            self._record_max_ids(manifest)
            self.log(f"{self.out} is up to date ({manifest.splits['train'].num_tokens:,} train tokens)")
            self._warn_empty_val(manifest)
            return manifest
        # From here on the directory is being changed: it must not look finished to a reader.
        (self.out / MANIFEST_FILE).unlink(missing_ok=True)
        info = self._tokenizer(prev)
        tok_sha = _tokenizer_sha(info)
        if prev is not None and prev.get("tokenizer_sha256") != tok_sha:
            prev = None  # recorded shards were made with another tokenizer: redo them
        dtype = dtype_for_vocab(info.vocab_size)
        self.progress = {"params_hash": self.hash, "tokenizer_sha256": tok_sha, "splits": {}}
        bar = tqdm(
            total=self._total_docs(),
            unit="doc",
            desc="tokenizing",
            disable=not self.cfg.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        stats = {"tokens_written": 0, "seconds_tokenizing": 0.0}
        workers = (os.cpu_count() or 1) if self.cfg.num_workers is None else self.cfg.num_workers
        encoder = ParallelEncoder(
            str(self.out / TOKENIZER_FILE),
            bos_id=info.bos_id if self.cfg.add_bos else None,
            eos_id=info.eos_id,
            dtype=dtype,
            num_workers=workers,
        )
        try:
            for split in SPLITS:
                recorded = (prev or {}).get("splits", {}).get(split, {})
                self._write_split(split, encoder, dtype, recorded, bar, stats)
        finally:
            encoder.close()
            bar.close()
        splits = {}
        for split in SPLITS:
            shards = [ShardInfo(**s) for s in self.progress["splits"][split]["shards"]]
            splits[split] = SplitInfo(
                shards=shards,
                num_tokens=sum(s.num_tokens for s in shards),
                num_docs=sum(s.num_docs for s in shards),
                max_doc_tokens=shards[-1].max_doc_tokens if shards else 0,
            )
        if splits["train"].num_tokens == 0:
            raise DataError(f"corpus {self.corpus.name} produced no train tokens: point corpus= at text files")
        elapsed = time.perf_counter() - start
        stats["seconds_total"] = elapsed
        manifest = Manifest(
            vocab_size=info.vocab_size,
            dtype=dtype,
            bos_id=info.bos_id,
            eos_id=info.eos_id,
            pad_id=info.pad_id,
            add_bos=self.cfg.add_bos,
            tokenizer_file=TOKENIZER_FILE,
            tokenizer_sha256=tok_sha,
            tokenizer_source=info.source,
            params=self.params,
            params_hash=self.hash,
            splits=splits,
            stats=stats,
            directory=self.out,
        )
        write_manifest(self.out, manifest)
        (self.out / PROGRESS_FILE).unlink(missing_ok=True)
        rate = stats["tokens_written"] / max(stats["seconds_tokenizing"], 1e-9)
        self.log(
            f"wrote {self.out}: {splits['train'].num_tokens:,} train + {splits['val'].num_tokens:,} val "
            f"tokens in {len(splits['train'].shards)}+{len(splits['val'].shards)} shards, "
            f"{elapsed:.1f} s ({rate:,.0f} tokens/s tokenizing)"
        )
        self._warn_empty_val(manifest)
        return manifest

    def _warn_empty_val(self, m: Manifest) -> None:
        """val_fraction > 0 that selected no document: say so (the trainer refuses it when it evaluates)."""
        val = m.splits.get("val")
        if self.cfg.val_fraction > 0 and (val is None or val.num_tokens == 0):
            print(
                f"data_prep: warning: val_fraction={self.cfg.val_fraction} selected none of the "
                f"{m.splits['train'].num_docs} documents, so {self.out} has an empty validation split (training "
                "with train.eval_batches>0 refuses it): use a corpus of more documents or a larger val_fraction",
                file=sys.stderr,
                flush=True,
            )

    def _record_max_ids(self, m: Manifest) -> None:
        """A manifest written before shards recorded their largest token id gets them (a cheap read)."""
        missing = [s for split in m.splits.values() for s in split.shards if s.max_id is None]
        if not missing:
            return
        dtype = np.dtype(m.dtype).newbyteorder("<")
        for s in missing:
            tokens = np.fromfile(self.out / s.bin_file, dtype=dtype)
            s.max_id = int(tokens.max()) if len(tokens) else -1
        write_manifest(self.out, m)
        self.log(f"recorded the largest token id of {len(missing)} shard(s) in {self.out / MANIFEST_FILE}")

    def _all_intact(self, m: Manifest) -> bool:
        if _file_sha(Path(m.tokenizer_path)) != m.tokenizer_sha256:
            self.log(f"{m.tokenizer_path} differs from manifest.json: redoing the preparation")
            return False
        itemsize = np.dtype(m.dtype).itemsize
        for split in m.splits.values():
            for s in split.shards:
                problem = shard_problem(self.out, s, itemsize, full=True)
                if problem:
                    self.log(f"{problem}: rebuilding from there")
                    return False
        return True

    def _total_docs(self) -> int | None:
        n = self.corpus.num_records
        if n is not None and self.cfg.max_documents is not None:
            n = min(n, self.cfg.max_documents)
        return n

    def _tokenizer(self, prev: dict[str, Any] | None) -> TokenizerInfo:
        path = self.out / TOKENIZER_FILE
        if self.loaded is not None:
            info = self.loaded
        elif prev is not None and path.exists() and _file_sha(path) == prev.get("tokenizer_sha256"):
            info = load_tokenizer(str(path), BOS, EOS, PAD)  # trained by the interrupted run: reuse it
            info.source = "trained"
        else:
            t = self.cfg.tokenizer
            self.log(
                f"training a {t.vocab_size}-token byte-level BPE on up to {t.train_max_chars:,} chars "
                f"of {self.corpus.name}"
            )
            docs = self.corpus.documents("train", self.cfg.val_fraction, self.cfg.max_documents)
            info = train_bpe(
                training_subset(docs, self.corpus.approx_chars, t.train_max_chars),
                t.vocab_size,
                t.min_frequency,
            )
        self._check_vocab(info)
        text = info.tokenizer.to_str()
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)
        return info

    def _write_split(
        self,
        split: str,
        encoder: ParallelEncoder,
        dtype: str,
        recorded: dict[str, Any],
        bar: tqdm,
        stats: dict[str, Any],
    ) -> None:
        itemsize = np.dtype(dtype).itemsize
        valid: list[ShardInfo] = []
        for s in recorded.get("shards", []):
            shard = ShardInfo(**s)
            problem = shard_problem(self.out, shard, itemsize, full=True)
            if problem:
                self.log(f"{problem}: rewriting it and the shards after it")
                break
            valid.append(shard)
        keep = {s.bin_file for s in valid} | {s.docs_file for s in valid}
        for p in [*self.out.glob(f"{split}-*.bin"), *self.out.glob(f"{split}-*.docs")]:
            if p.name not in keep:
                p.unlink()
        entry = {"shards": [dataclasses.asdict(s) for s in valid], "done": False}
        self.progress["splits"][split] = entry
        if recorded.get("done") and len(valid) == len(recorded.get("shards", [])):
            entry["done"] = True
            self._save_progress()
            return
        if valid:
            self.log(f"{split}: {len(valid)} shard(s) already complete and verified; resuming after them")
        self._save_progress()
        start_doc, start_offset, max_doc = (
            (valid[-1].end_doc, valid[-1].end_offset, valid[-1].max_doc_tokens) if valid else (0, 0, 0)
        )

        def on_shard(shard: ShardInfo) -> None:
            entry["shards"].append(dataclasses.asdict(shard))
            self._append_progress({"split": split, "shard": entry["shards"][-1]})

        writer = ShardWriter(
            self.out,
            split,
            self.cfg.shard_tokens,
            dtype,
            on_shard,
            start_index=len(valid),
            start_doc=start_doc,
            start_offset=start_offset,
            max_doc_tokens=max_doc,
        )
        if split == "val" and self.cfg.val_fraction == 0:
            docs: Iterator[str] = iter(())  # nothing can be in it: skip reading the corpus again
        else:
            docs = islice(self.corpus.documents(split, self.cfg.val_fraction, self.cfg.max_documents), start_doc, None)
        if start_doc:
            bar.update(start_doc)
        t0 = time.perf_counter()
        n_tokens = 0
        for chunk in encoder.encode(docs):
            writer.add(chunk.ids, chunk.lengths)
            n_tokens += len(chunk.ids)
            bar.update(len(chunk.lengths))
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):,.0f} tok/s", refresh=False)
        writer.close()
        stats["tokens_written"] += n_tokens
        stats["seconds_tokenizing"] += time.perf_counter() - t0
        entry["done"] = True
        self._append_progress({"split": split, "done": True})

    def _save_progress(self) -> None:
        """Rewrite the log from memory: a header line, then one line per shard and per finished split."""
        lines = [{"params_hash": self.hash, "tokenizer_sha256": self.progress["tokenizer_sha256"]}]
        for split, entry in self.progress["splits"].items():
            lines += [{"split": split, "shard": s} for s in entry["shards"]]
            if entry["done"]:
                lines.append({"split": split, "done": True})
        atomic_write_text(self.out / PROGRESS_FILE, "".join(json.dumps(x) + "\n" for x in lines))

    def _append_progress(self, record: dict[str, Any]) -> None:
        # Appended after the shard's files have their final names; flushed so a later kill keeps it.
        with open(self.out / PROGRESS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_progress(path: Path) -> dict[str, Any]:
    """The state recorded in progress.jsonl; a line torn by a kill (only ever the last) is ignored."""
    state: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if "params_hash" in rec:
            state = {**rec, "splits": {}}
        elif state:
            entry = state["splits"].setdefault(rec["split"], {"shards": [], "done": False})
            if "shard" in rec:
                entry["shards"].append(rec["shard"])
            else:
                entry["done"] = True
    return state


def _load_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
