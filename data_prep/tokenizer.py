"""Tokenizers: train a byte-level BPE on the corpus, or load a `tokenizers` JSON / transformers directory.

Whatever the source, the tokenizer used for the shards is saved as `tokenizer.json` next to them (loadable
with `tokenizers.Tokenizer.from_file`), and its BOS/EOS/PAD ids go into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.errors import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
_COMMON = {
    "eos": ["<|endoftext|>", "<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"],
    "bos": ["<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>"],
    "pad": ["<|pad|>", "<pad>", "[PAD]", "<｜▁pad▁｜>"],
}


# Texts longer than this many characters are given to a tokenizer in pieces (`split_text`). A tokenizer's
# working state costs ~100x the text it is handed (per-byte alignments, then per-token strings, offsets and
# masks), so one 42 MB line took 4-7 GB whole; in pieces the transient is ~25 MB per call whatever the line.
# Cuts fall on pre-token boundaries, so tokens and shards are those of whole documents (checked on the stdlib,
# whose 760k-character pydoc_data/topics.py is cut in three).
PIECE_CHARS = 1 << 18

# The last space that follows a non-whitespace character, searched backwards from the end (greedy `.*`).
_LAST_CUT = re.compile(r"(?s).*\S( )")


def split_text(text: str, max_chars: int = PIECE_CHARS) -> list[str]:
    """`text` as consecutive pieces of at most `max_chars` characters ("".join(pieces) == text).

    Each cut goes just before a space that follows a non-whitespace character: there, GPT-2 / tiktoken-style
    regex pre-tokenizers and Metaspace always start a new pre-token (a space only ever leads a pre-token or
    belongs to a run of whitespace), and BPE never merges across pre-tokens, so the pieces' tokens
    concatenate to the whole text's tokens (`splits_cleanly` checks a tokenizer for it). A stretch of
    `max_chars` characters without such a space is cut at `max_chars`.
    """
    if len(text) <= max_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        m = _LAST_CUT.match(text, start, end + 1)
        cut = m.start(1) if m else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


_PROBE = (
    "def f(x, y=2):\n    return x  +  y # it's 'quoted', they've 12345 and 3.14\n\n\tclass A:  pass\r\n"
    "Ünïcödé wörds, 漢字 かな and emoji 🙂 ; end.  \n  trailing   spaces   here "
)


def splits_cleanly(tok: Tokenizer) -> bool:
    """Whether cutting text as `split_text` does leaves this tokenizer's output unchanged.

    True for byte-level BPEs (GPT-2, tiktoken-style, DeepSeek) and Metaspace ones; False e.g. for
    sentencepiece conversions that prepend "▁" in the normalizer (every piece would gain one).
    """
    if tok.pre_tokenizer is None:  # the whole text is one word: merges may cross spaces
        return False
    cuts = [m.start() for m in re.finditer(r"(?<=\S) ", _PROBE)]
    pieces = [_PROBE[a:b] for a, b in zip([0, *cuts], [*cuts, len(_PROBE)])]
    whole = tok.encode(_PROBE, add_special_tokens=False).ids
    parts = [i for e in tok.encode_batch(pieces, add_special_tokens=False) for i in e.ids]
    return whole == parts


@dataclass
class TokenizerInfo:
    tokenizer: Tokenizer
    vocab_size: int  # one past the largest id, special tokens included
    bos_id: int
    eos_id: int
    pad_id: int
    source: str  # "trained" or the path it was loaded from


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TokenizerInfo:
    """A GPT-2-style byte-level BPE: lossless (decode(encode(s)) == s for any text), no unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # long texts in pieces (cut at pre-token boundaries, so the word counts are the same): bounded memory
    tok.train_from_iterator((p for t in texts for p in split_text(t)), trainer)
    return _info(tok, {"bos": BOS, "eos": EOS, "pad": PAD}, "trained")


def training_subset(docs: Iterable[str], approx_chars: int | None, max_chars: int) -> Iterator[str]:
    """A deterministic, corpus-wide sample of about `max_chars` characters for BPE training.

    Documents are kept when a hash of their text falls under max_chars / approx_chars, so the sample spreads
    over the whole corpus instead of being its alphabetical head; reading stops at the budget.
    """
    keep = 1.0 if not approx_chars else min(1.0, max_chars / approx_chars)
    used = 0
    for text in docs:
        if keep < 1.0:
            h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
            if h >= keep * 2.0**64:
                continue
        yield text
        used += len(text)
        if used >= max_chars:
            return


def load_tokenizer(path: str, bos: str | None = None, eos: str | None = None, pad: str | None = None) -> TokenizerInfo:
    """Load a `tokenizers` JSON file or a transformers tokenizer directory and find its special tokens."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"tokenizer.path {p} does not exist: fix the path, or drop it to train a BPE")
    names: dict[str, str | None] = {"bos": bos, "eos": eos, "pad": pad}
    if p.is_dir():
        cfg_file = p / "tokenizer_config.json"
        if cfg_file.exists():
            tcfg = json.loads(cfg_file.read_text())
            for k in names:
                names[k] = names[k] or _token_text(tcfg.get(f"{k}_token"))
        if (p / "tokenizer.json").exists():
            tok = _from_file(p / "tokenizer.json")
        else:
            tok = _from_transformers(p, names)
    else:
        tok = _from_file(p)
    return _info(tok, names, str(p))


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(
            f"{path} is not a `tokenizers` JSON file ({' '.join(str(e).split())[:120]}): "
            "pass a tokenizer.json or a transformers tokenizer directory"
        ) from None


def _from_transformers(path: Path, names: dict[str, str | None]) -> Tokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise DataError(
            f"{path}: transformers cannot load a tokenizer from it ({type(e).__name__}): "
            "pass a directory with tokenizer.json"
        ) from None
    if not getattr(hf, "is_fast", False):
        raise DataError(f"{path}: only a slow tokenizer is available: convert it to tokenizer.json first")
    for k in names:
        names[k] = names[k] or getattr(hf, f"{k}_token", None)
    return hf.backend_tokenizer


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _info(tok: Tokenizer, names: dict[str, str | None], source: str) -> TokenizerInfo:
    vocab = tok.get_vocab(with_added_tokens=True)

    def find(kind: str) -> int | None:
        wanted = names.get(kind)
        if wanted is not None:
            if wanted not in vocab:
                raise DataError(
                    f"{source}: tokenizer.{kind}_token {wanted!r} is not in the vocabulary: "
                    f"set tokenizer.{kind}_token to one of its special tokens"
                )
            return vocab[wanted]
        return next((vocab[c] for c in _COMMON[kind] if c in vocab), None)

    eos_id = find("eos")
    if eos_id is None:
        raise DataError(f"{source}: no end-of-text token found: set tokenizer.eos_token=<its EOS token>")
    bos_id = find("bos")
    pad_id = find("pad")
    # GPT-2-style vocabularies have a single <|endoftext|> serving as BOS and EOS; padding is masked anyway.
    return TokenizerInfo(
        tokenizer=tok,
        vocab_size=max(vocab.values()) + 1,
        bos_id=eos_id if bos_id is None else bos_id,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        source=source,
    )
