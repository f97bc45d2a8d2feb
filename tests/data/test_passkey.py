"""Passkey documents (data_prep/passkey.py): the template, the key's places, the written pair read back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import read_manifest
from data_prep.passkey import PasskeyFormat, write_passkey_corpus
from data_prep.reader import TokenStream

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fmt(prepared_a: Path) -> PasskeyFormat:
    return PasskeyFormat.from_prepared(prepared_a)


def test_keys_are_single_tokens_the_template_never_uses(fmt: PasskeyFormat, prepared_a: Path) -> None:
    template = set(fmt.filler) | set(fmt.question) | {t for piece in fmt.needle for t in piece}
    assert len(fmt.keys) >= 10 and not template & set(fmt.keys)
    assert fmt.eos == read_manifest(prepared_a).eos_id and fmt.eos not in fmt.keys


@pytest.mark.parametrize("filler", [0, 15, 250])  # 0: the shortest document, the template alone
def test_document_holds_its_key_in_the_needle_and_as_the_answer(fmt: PasskeyFormat, filler: int) -> None:
    rng = np.random.default_rng(0)
    length = fmt.overhead + filler
    depths = set()
    for _ in range(20):
        ids, key = fmt.document(rng, length)
        assert len(ids) == length and ids[-1] == fmt.eos and ids[-2] == key
        where = np.flatnonzero(np.isin(ids, fmt.keys))
        assert (ids[where] == key).all() and len(where) == 3  # twice in the needle, once as the answer
        needle = fmt.needle[0]
        start = where[0] - len(needle)
        assert tuple(ids[start : where[0]]) == needle
        q = len(ids) - 2 - len(fmt.question)
        assert tuple(ids[q : len(ids) - 2]) == fmt.question
        depths.add(int(start))
    assert len(depths) > (length > fmt.overhead)  # the needle moves when there is filler to move through


def test_document_shorter_than_the_template_is_refused(fmt: PasskeyFormat) -> None:
    with pytest.raises(ValueError, match="at least"):
        fmt.document(np.random.default_rng(0), fmt.overhead - 1)


def test_written_pair_reads_back_one_document_per_sample(fmt: PasskeyFormat, tmp_path: Path) -> None:
    seq_len = fmt.overhead + 20
    prefix = write_passkey_corpus(tmp_path / "pk", fmt, 50, fmt.overhead, seq_len + 2, seed=3)
    docs = fmt.documents(3, 50, fmt.overhead, seq_len + 2)
    assert len(docs[0]) == seq_len + 2  # the longest first: pad mode needs one of a full sample
    # pad mode gives a document of a full sample (seq_len + 2 tokens) a second sample for its last target
    samples = len(docs) + sum(len(d) == seq_len + 2 for d in docs)
    stream = TokenStream([str(prefix)], None, seq_len=seq_len, mtp_depth=1, micro_batch_size=samples,
                         global_batch_size=samples, dp_rank=0, dp_size=1, mode="pad", shuffle=False)
    batch = next(iter(stream))
    rows = [tuple(row[: int(mask.sum())].tolist()) for row, mask in zip(batch["tokens"], batch["loss_mask"])]
    assert {r for r in rows if len(r) > 2} == {tuple(d.tolist()) for d in docs}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep.passkey", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_cli_writes_a_readable_pair(prepared_a: Path, tmp_path: Path) -> None:
    r = cli(str(tmp_path / "out" / "pk"), "--data-dir", str(prepared_a), "--docs", "7", "--min-len", "80",
            "--max-len", "90")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pk.bin", "pk.idx"]


@pytest.mark.parametrize(("args", "says"), [
    (["--data-dir", "{missing}"], "does not exist"),  # not a prepared directory
    (["--min-len", "5"], "min_len"),  # shorter than the template
    (["--docs", "0"], "docs"),
])
def test_cli_refuses_bad_arguments_in_one_line_and_writes_nothing(prepared_a: Path, tmp_path: Path,
                                                                  args: list[str], says: str) -> None:
    args = [a.format(missing=tmp_path / "none") for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(prepared_a)]
    r = cli(str(tmp_path / "out" / "pk"), *args)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
