"""data_prep: corpora -> tokenizer -> shards + manifest; round trip, reruns, atomicity, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import SHARD_TOKENS, copy_modules, prep_config
from tokenizers import Tokenizer

from data_prep import DataError, prepare
from data_prep.corpus import StdlibCorpus, split_of, stdlib_root
from data_prep.manifest import read_manifest
from data_prep.pipeline import PROGRESS_FILE
from data_prep.shards import ShardWriter
from data_prep.sources import PreparedSplit
from data_prep.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[2]


def shard_bytes(directory: Path) -> dict[str, str]:
    """sha256 of every shard file (the bytes a reader sees)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.suffix in (".bin", ".docs")
    }


def documents(directory: Path, split: str) -> list[list[int]]:
    src = PreparedSplit(directory, split)
    starts = src.all_doc_starts().tolist() + [int(src.bases[-1])]
    return [src.read(a, b - a).tolist() for a, b in zip(starts[:-1], starts[1:])]


def test_round_trip_decodes_to_source_text(prepared_a: Path, corpus_a: Path) -> None:
    m = read_manifest(prepared_a)
    tok = Tokenizer.from_file(m.tokenizer_path)
    texts = {p.read_text() for p in corpus_a.iterdir()}
    decoded = []
    for split in ("train", "val"):
        for ids in documents(prepared_a, split):
            assert ids[-1] == m.eos_id and m.eos_id not in ids[:-1]  # one EOS, closing each document
            decoded.append(tok.decode(ids[:-1]))
    assert sorted(decoded) == sorted(texts)
    # the split follows the hash of each document, as documented
    train = {tok.decode(ids[:-1]) for ids in documents(prepared_a, "train")}
    assert train == {t for t in texts if split_of(t, 0.2) == "train"}


def test_manifest_describes_the_shards(prepared_a: Path) -> None:
    m = read_manifest(prepared_a)
    assert (m.vocab_size, m.dtype) == (384, "uint16")
    assert m["vocab_size"] == m.vocab_size and {m.bos_id, m.eos_id, m.pad_id} == {0, 1, 2}
    assert Tokenizer.from_file(m.tokenizer_path).get_vocab_size() == m.vocab_size
    assert hashlib.sha256(Path(m.tokenizer_path).read_bytes()).hexdigest() == m.tokenizer_sha256
    train = m.splits["train"]
    assert len(train.shards) > 3 and train.num_tokens == sum(s.num_tokens for s in train.shards)
    assert all(s.num_tokens == SHARD_TOKENS for s in train.shards[:-1])  # fixed token budget
    for s in train.shards:
        data = (prepared_a / s.bin_file).read_bytes()
        assert len(data) == 2 * s.num_tokens and hashlib.sha256(data).hexdigest() == s.sha256
    assert m.params["shard_tokens"] == SHARD_TOKENS and m.params["tokenizer"]["vocab_size"] == 384
    assert not (prepared_a / PROGRESS_FILE).exists() and not list(prepared_a.glob("*.tmp"))


def test_rerun_skips_complete_shards(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(prepared_a, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    m = prepare(prep_config(corpus_a, out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    assert m.splits == read_manifest(prepared_a).splits
    # a damaged shard is found on rerun and rebuilt identically; the ones before it are kept
    victim = out / m.splits["train"].shards[2].bin_file
    victim.write_bytes(victim.read_bytes()[:-2] + b"\0\0")
    prepare(prep_config(corpus_a, out))
    assert shard_bytes(out) == shard_bytes(prepared_a)
    assert (out / m.splits["train"].shards[0].bin_file).stat().st_mtime_ns == before[
        m.splits["train"].shards[0].bin_file
    ]


def test_interrupted_run_resumes_to_identical_shards(
    prepared_a: Path, corpus_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "interrupted"
    real_flush = ShardWriter._flush
    calls = {"n": 0}

    def crash_on_fifth(self: ShardWriter) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            (self.directory / "train-00004.bin.tmp").write_bytes(b"half a shard")  # as if killed mid-write
            raise KeyboardInterrupt
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "_flush", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        prepare(prep_config(corpus_a, out))
    monkeypatch.setattr(ShardWriter, "_flush", real_flush)
    assert not (out / "manifest.json").exists()  # the reader refuses the directory
    with pytest.raises(DataError, match="manifest.json is missing"):
        read_manifest(out)
    assert len(list(out.glob("train-*.bin"))) == 4
    prepare(prep_config(corpus_a, out))
    assert shard_bytes(out) == shard_bytes(prepared_a)
    assert read_manifest(out).splits == read_manifest(prepared_a).splits


def test_worker_processes_give_identical_shards(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "workers"
    prepare(prep_config(corpus_a, out, num_workers=2))
    assert shard_bytes(out) == shard_bytes(prepared_a)


def test_killed_cli_then_rerun_gives_identical_shards(tmp_path: Path) -> None:
    corpus = copy_modules(sorted(p.name for p in stdlib_root().glob("[a-m]*.py"))[:25], tmp_path / "corpus")
    tok = train_bpe((p.read_text() for p in sorted(corpus.iterdir())[:10]), 512).tokenizer
    tok.save(str(tmp_path / "tok.json"))
    args = [
        f"corpus={corpus}", "shard_tokens=1024", "num_workers=0", "progress=false", "val_fraction=0.05",
        f"tokenizer.path={tmp_path / 'tok.json'}",
    ]  # fmt: skip

    def cli(out: Path) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "data_prep", f"out_dir={out}", *args],
            cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    ref = tmp_path / "ref"  # the uninterrupted run, in-process (same parameters, so the same bytes)
    prepare({**dict(a.split("=", 1) for a in args), "out_dir": str(ref), "progress": False})
    out = tmp_path / "killed"
    proc = cli(out)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("train-*.bin"))) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: this kills only what we started
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "data_prep finished before it could be killed"
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError):
        read_manifest(out)
    done_before = len(list(out.glob("train-*.bin")))
    assert cli(out).wait(timeout=120) == 0
    assert shard_bytes(out) == shard_bytes(ref)
    assert done_before < len(read_manifest(out).splits["train"].shards)


def test_jsonl_and_parquet_inputs(tmp_path: Path, prepared_a: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["def f(x):\n    return x + 1\n", "héllo wörld ✓", "line one\nline two\n\n", "x" * 3000]
    src = tmp_path / "mixed"
    src.mkdir()
    with open(src / "a.jsonl", "w") as f:
        for t in texts[:2]:
            f.write(json.dumps({"body": t}) + "\n")
    pq.write_table(pa.table({"body": texts[2:]}), src / "b.parquet")
    cfg = prep_config(src, tmp_path / "out", val_fraction=0.0, text_field="body",
                      tokenizer={"path": str(prepared_a / "tokenizer.json")})  # fmt: skip
    m = prepare(cfg)
    tok = Tokenizer.from_file(m.tokenizer_path)
    assert [tok.decode(d[:-1]) for d in documents(tmp_path / "out", "train")] == texts
    with pytest.raises(DataError, match="text_field"):
        prepare(prep_config(src, tmp_path / "out2", text_field="missing"))


def test_transformers_style_tokenizer_directory(tmp_path: Path, prepared_a: Path, corpus_a: Path) -> None:
    tdir = tmp_path / "hf_tok"
    tdir.mkdir()
    (tdir / "tokenizer.json").write_bytes((prepared_a / "tokenizer.json").read_bytes())
    (tdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|pad|>"}}))
    m = prepare(prep_config(corpus_a, tmp_path / "out", tokenizer={"path": str(tdir)}))
    assert m.eos_id == 2  # taken from tokenizer_config.json, not guessed
    assert all(d[-1] == 2 for d in documents(tmp_path / "out", "train"))


def test_stdlib_corpus_is_deterministic_and_split_by_path() -> None:
    a, b = StdlibCorpus(), StdlibCorpus()
    assert a.files == b.files and a.fingerprint == b.fingerprint
    rel = [p.relative_to(a.root).as_posix() for p in a.files]
    assert rel == sorted(rel) and len(rel) > 500
    assert not any("site-packages" in r for r in rel) and all(r.endswith(".py") for r in rel)
    assert a.fingerprint["bytes"] > 10_000_000  # the real, ~34 MB corpus
    keys = [k for k, _ in zip((k for k, _ in a.records()), range(200))]
    val = [k for k in keys if split_of(k, 0.01) == "val"]
    assert val == [k for k in rel[:200] if split_of(k, 0.01) == "val"]


def test_stdlib_prepare_small_slice(tmp_path: Path) -> None:
    m = prepare({"corpus": "python_stdlib", "out_dir": str(tmp_path / "std"), "max_documents": 12,
                 "num_workers": 0, "progress": False, "tokenizer": {"vocab_size": 300}})  # fmt: skip
    assert m.vocab_size <= 300 and m.splits["train"].num_docs + m.splits["val"].num_docs == 12
    assert m.params["corpus"]["kind"] == "python_stdlib"


# --- bad input: one clear line naming the file and the fix, nothing half-written ---------------------------


def test_missing_corpus_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"corpus path .*nope does not exist"):
        prepare(prep_config(tmp_path / "nope", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(prep_config(empty, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_tokenizer_larger_than_model(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    cfg = prep_config(corpus_a, tmp_path / "out", model_vocab_size=256,
                      tokenizer={"path": str(prepared_a / "tokenizer.json")})  # fmt: skip
    with pytest.raises(DataError, match=r"384 tokens, more than model_vocab_size=256"):
        prepare(cfg)


def test_other_parameters_need_overwrite(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(prepared_a, out)
    with pytest.raises(DataError, match="different parameters.*overwrite=true"):
        prepare(prep_config(corpus_a, out, shard_tokens=4096))
    assert read_manifest(out).splits == read_manifest(prepared_a).splits  # untouched
    m = prepare(prep_config(corpus_a, out, shard_tokens=4096, overwrite=True))
    assert m.splits["train"].shards[0].num_tokens == 4096


def test_bad_options_are_data_errors(corpus_a: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="bad data_prep option shard_size: Key 'shard_size' not in"):
        prepare({"corpus": str(corpus_a), "shard_size": 5})
    with pytest.raises(DataError, match="val_fraction"):
        prepare(prep_config(corpus_a, tmp_path / "o", val_fraction=1.5))
    with pytest.raises(DataError, match="tokenizer.path .* does not exist"):
        prepare(prep_config(corpus_a, tmp_path / "o", tokenizer={"path": str(tmp_path / "none.json")}))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("corpus={tmp}/missing", "error: corpus path {tmp}/missing does not exist"),
        ("tokenizer.vocab_size=abc", "error: tokenizer.vocab_size: Value 'abc' of type 'str' could not be converted"),
        ("shard_size=5", "error: shard_size: Key 'shard_size' not in 'PrepConfig'"),
    ],
)
def test_cli_prints_one_line_and_exits_2(tmp_path: Path, override: str, expected: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "data_prep", override.format(tmp=tmp_path), f"out_dir={tmp_path / 'o'}"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path)), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no Hydra outputs/, no logs, nothing half-made


def test_tokenizer_training_is_deterministic(corpus_a: Path) -> None:
    texts = [p.read_text() for p in sorted(corpus_a.iterdir())]
    a = train_bpe(texts, 400).tokenizer.to_str()
    b = train_bpe(texts, 400).tokenizer.to_str()
    assert a == b


def test_doc_index_marks_document_starts(prepared_a: Path) -> None:
    m = read_manifest(prepared_a)
    src = PreparedSplit(prepared_a, "train")
    starts = src.all_doc_starts()
    assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    stream = np.concatenate([src.tokens(i) for i in range(src.num_shards)])
    assert np.array_equal(np.flatnonzero(stream == m.eos_id) + 1, np.append(starts[1:], len(stream)))


def test_add_bos_wraps_each_document(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    m = prepare(
        prep_config(corpus_a, tmp_path / "bos", add_bos=True, tokenizer={"path": str(prepared_a / "tokenizer.json")})
    )
    tok = Tokenizer.from_file(m.tokenizer_path)
    docs = documents(tmp_path / "bos", "train")
    assert all(d[0] == m.bos_id and d[-1] == m.eos_id for d in docs)
    assert sorted(tok.decode(d[1:-1]) for d in docs) == sorted(
        tok.decode(d[:-1]) for d in documents(prepared_a, "train")
    )


def test_uint32_shards_for_large_vocabularies(tmp_path: Path) -> None:
    from data_prep.manifest import ShardInfo, dtype_for_vocab
    from data_prep.shards import shard_problem

    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"
    shards: list[ShardInfo] = []
    writer = ShardWriter(tmp_path, "train", 1024, "uint32", shards.append)
    ids = np.array([70_000, 5, 1, 99_999, 1] * 300, dtype=np.uint32)
    writer.add(ids, np.array([3, 2] * 300))
    writer.close()
    assert [s.num_tokens for s in shards] == [1024, 476]
    back = np.concatenate([np.fromfile(tmp_path / s.bin_file, dtype="<u4") for s in shards])
    assert np.array_equal(back, ids) and all(shard_problem(tmp_path, s, 4, full=True) is None for s in shards)
    assert (shards[0].end_doc, shards[0].end_offset) == (409, 1)  # 409 whole docs (1023 tokens) + 1 token
