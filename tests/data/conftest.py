"""Session fixtures for the data tests: small real corpora (a few stdlib modules), prepared once."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import CORPUS_A, CORPUS_B, copy_modules, prep_config

from data_prep.pipeline import prepare


@pytest.fixture(scope="session")
def corpus_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_modules(CORPUS_A, tmp_path_factory.mktemp("corpus_a"))


@pytest.fixture(scope="session")
def corpus_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_modules(CORPUS_B, tmp_path_factory.mktemp("corpus_b"))


@pytest.fixture(scope="session")
def prepared_a(corpus_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "a"
    prepare(prep_config(corpus_a, out))
    return out


@pytest.fixture(scope="session")
def prepared_b(corpus_b: Path, prepared_a: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second dataset tokenized with dataset A's tokenizer, so the two can be blended."""
    out = tmp_path_factory.mktemp("prepared") / "b"
    prepare(prep_config(corpus_b, out, tokenizer={"path": str(prepared_a / "tokenizer.json")}))
    return out
