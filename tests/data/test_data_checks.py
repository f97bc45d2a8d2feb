"""Early data checks: token ids against the vocabulary, long lines in bounded memory, empty validation splits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from data_helpers import CORPUS_A, VOCAB, copy_modules, prep_config
from tokenizers import Tokenizer, normalizers

from data_prep import DataError, prepare
from data_prep.corpus import split_of
from data_prep.encode import ParallelEncoder
from data_prep.manifest import read_manifest
from data_prep.megatron import write_indexed_dataset
from data_prep.reader import TokenStream, validation_batches
from data_prep.tokenizer import split_text, splits_cleanly

REPO = Path(__file__).resolve().parents[2]
SEQ, MTP, MB, GBS = 64, 1, 2, 8


def stream(dirs: list[Path], **kw) -> TokenStream:
    args = {"weights": None, "seq_len": SEQ, "mtp_depth": MTP, "micro_batch_size": MB, "global_batch_size": GBS,
            "dp_rank": 0, "dp_size": 1}  # fmt: skip
    args.update(kw)
    return TokenStream([str(d) for d in dirs], **args)


def poke(path: Path, index: int, token_id: int) -> None:
    """Overwrite token `index` of a uint16 shard in place (same size: a size check cannot see it)."""
    data = np.fromfile(path, dtype="<u2")
    data[index] = token_id
    data.tofile(path)


def forget_max_ids(directory: Path) -> None:
    """Make the manifest look like one written before shards recorded their largest id."""
    raw = json.loads((directory / "manifest.json").read_text())
    for split in raw["splits"].values():
        for shard in split["shards"]:
            del shard["max_id"]
    (directory / "manifest.json").write_text(json.dumps(raw))


def test_manifest_records_each_shards_largest_id(prepared_a: Path) -> None:
    m = read_manifest(prepared_a)
    for split in m.splits.values():
        for s in split.shards:
            assert s.max_id == int(np.fromfile(prepared_a / s.bin_file, dtype="<u2").max())
            assert s.max_id < m.vocab_size


def test_id_outside_the_vocabulary_is_refused_when_its_shard_is_opened(prepared_a: Path, tmp_path: Path) -> None:
    d = shutil.copytree(prepared_a, tmp_path / "d")
    poke(d / "train-00001.bin", 77, VOCAB + 16)  # the manifest still records the true maximum
    s = stream([d], micro_batch_size=8, global_batch_size=64)
    with pytest.raises(DataError, match=rf"train-00001.bin holds token id {VOCAB + 16}, outside the vocabulary "
                       rf"\(the tokenizer's {VOCAB} ids .*data_prep out_dir="):  # fmt: skip
        for _ in range(500):
            next(s)
    # the validation reader too (the case: found only at the final evaluation)
    poke(d / "val-00000.bin", 3, 60000)
    with pytest.raises(DataError, match=r"val-00000.bin holds token id 60000.*model's 512"):
        next(validation_batches([str(d)], SEQ, MTP, MB, max_batches=1, model_vocab_size=512))
    # a manifest without recorded ids (written before they were): its shards are scanned when it is opened
    forget_max_ids(d)
    with pytest.raises(DataError, match=r"val-00000.bin holds token id 60000"):
        next(validation_batches([str(d)], SEQ, MTP, MB, max_batches=1))
    with pytest.raises(DataError, match=rf"train-00001.bin holds token id {VOCAB + 16}"):
        stream([d])  # before any batch


def test_recorded_id_outside_the_vocabulary_is_refused_before_any_read(prepared_a: Path, tmp_path: Path) -> None:
    d = shutil.copytree(prepared_a, tmp_path / "d")
    raw = json.loads((d / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][2]["max_id"] = VOCAB
    (d / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=rf"train-00002.bin holds token id {VOCAB}"):
        stream([d])  # constructing the stream reads no token


def test_full_verify_scans_every_shard_up_front(prepared_a: Path, tmp_path: Path) -> None:
    d = shutil.copytree(prepared_a, tmp_path / "d")
    last = sorted(d.glob("train-*.bin"))[-1]
    poke(last, 5, 1000)
    stream([d])  # size: shards are checked as they are first read
    with pytest.raises(DataError, match=rf"{last.name} (does not match its sha256|holds token id 1000)"):
        stream([d], verify="full")


def test_megatron_ids_are_checked_against_the_model(tmp_path: Path) -> None:
    prefix = tmp_path / "mega"
    rng = np.random.default_rng(0)
    write_indexed_dataset(prefix, [rng.integers(0, 500, 300) for _ in range(20)], dtype=np.uint16)
    next(stream([prefix], model_vocab_size=500))
    with pytest.raises(DataError, match=r"mega.bin holds token id 499 but the model's vocab_size is 300: set "
                       r"model.vocab_size>=500"):  # fmt: skip
        next(stream([prefix], model_vocab_size=300))


def test_rerun_records_the_ids_an_old_manifest_lacks(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    d = shutil.copytree(prepared_a, tmp_path / "d")
    forget_max_ids(d)
    assert all(s.max_id is None for s in read_manifest(d).splits["train"].shards)
    next(stream([d]))  # still readable
    prepare(prep_config(corpus_a, d))  # up to date: only the ids are added
    assert read_manifest(d).splits == read_manifest(prepared_a).splits


def test_split_text_cuts_before_spaces_and_keeps_tokens() -> None:
    text = "alpha  beta,\tgamma(1) it's\n  delta " * 300
    pieces = split_text(text, 100)
    assert "".join(pieces) == text and len(pieces) > 50
    assert all(0 < len(p) <= 100 for p in pieces)
    assert all(p.startswith(" ") and not prev[-1].isspace() for prev, p in zip(pieces, pieces[1:]))
    assert [len(p) for p in split_text("x" * 250, 100)] == [100, 100, 50]  # no space: cut at the limit
    assert split_text("short", 100) == ["short"]


def test_long_document_in_pieces_gives_the_same_shard_tokens(prepared_a: Path, tmp_path: Path) -> None:
    tok_file = read_manifest(prepared_a).tokenizer_path
    tok = Tokenizer.from_file(tok_file)
    assert splits_cleanly(tok)
    docs = [(REPO / "data_prep" / "reader.py").read_text() * 3, "tiny", (REPO / "data_prep" / "encode.py").read_text()]

    def encode(**kw) -> tuple[np.ndarray, np.ndarray]:
        with ParallelEncoder(tok_file, bos_id=0, eos_id=1, dtype="uint16", num_workers=0, **kw) as enc:
            out = list(enc.encode(docs))
        return np.concatenate([c.ids for c in out]), np.concatenate([c.lengths for c in out])

    whole_ids, whole_lengths = encode(piece_chars=None)
    ids, lengths = encode(piece_chars=500, chunk_chars=2000)  # documents spread over many chunks
    assert np.array_equal(ids, whole_ids) and np.array_equal(lengths, whole_lengths)
    assert whole_lengths.tolist() == [len(tok.encode(t).ids) + 2 for t in docs]  # BOS + ids + EOS each
    # a tokenizer that prepends a marker to every text cannot take pieces: it gets whole documents
    tok.normalizer = normalizers.Prepend("Ġ")
    assert not splits_cleanly(tok)
    odd = tmp_path / "odd.json"
    tok.save(str(odd))
    warnings: list[str] = []
    with ParallelEncoder(str(odd), bos_id=None, eos_id=1, dtype="uint16", num_workers=0, piece_chars=500,
                         warn=warnings.append) as enc:  # fmt: skip
        lengths = np.concatenate([c.lengths for c in enc.encode(docs)])
    assert lengths.tolist() == [len(tok.encode(t).ids) + 1 for t in docs]
    assert len(warnings) == 1 and "tokenized whole" in warnings[0]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_one_long_line_tokenizes_in_bounded_memory(tmp_path: Path) -> None:
    # a tokenizer's working state is ~100x the text it is handed, if handed the whole line at once
    script = textwrap.dedent(f"""
        import random, re, sys
        sys.path.insert(0, {str(REPO)!r})
        from data_prep.encode import ParallelEncoder
        from data_prep.tokenizer import train_bpe
        rnd = random.Random(0)
        words = ["alpha", "beta,", "x=1;", "(foo)", "12345", "it's", "\\t", "[]"]  # one line: no newline
        block = " ".join(rnd.choice(words) for _ in range(20_000))
        text = " ".join([block] * (4_000_000 // len(block)))  # built without a peak of its own
        def peak():  # this process's peak RSS in bytes (ru_maxrss would include the forking parent's)
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) * 1024
        before = peak()
        info = train_bpe([text], 400)
        info.tokenizer.save({str(tmp_path / "tok.json")!r})
        with ParallelEncoder({str(tmp_path / "tok.json")!r}, bos_id=None, eos_id=1, dtype="uint16",
                             num_workers=0) as enc:
            n = sum(len(c.ids) for c in enc.encode([text]))
        print(peak() - before, n)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    grown, n_tokens = map(int, out.stdout.split())
    assert n_tokens > 1_000_000
    # measured: ~125 MiB; whole (before pieces) ~780 MiB
    assert grown < 400 << 20, f"peak RSS grew by {grown >> 20} MiB for a 4 MB line"


def test_empty_validation_split_gets_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    name = next(n for n in CORPUS_A if split_of(copy_modules([n], tmp_path / "probe").joinpath(n).read_text(),
                                                  0.05) == "train")  # fmt: skip
    corpus = copy_modules([name], tmp_path / "one")
    m = prepare(prep_config(corpus, tmp_path / "out", val_fraction=0.05))
    assert m.splits["val"].num_tokens == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warning" in line]
    assert len(lines) == 1 and "val_fraction=0.05 selected none of the 1 documents" in lines[0], err
    assert "train.eval_batches" in lines[0]
