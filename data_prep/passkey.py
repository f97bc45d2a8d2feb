"""Passkey documents: a key hidden at a random depth of filler text, asked for at the end.

    python -m data_prep.passkey OUT_PREFIX --data-dir data/python_stdlib --docs 20000 --min-len 30 \\
        --max-len 66 [--seed 0]

writes OUT_PREFIX.bin/.idx (a Megatron pair, which `data.dirs` takes beside prepared directories), one passkey
document per sequence, tokenized with the prepared directory's tokenizer and ended with its EOS. A document of
n tokens (its EOS included) reads

    <filler> The pass key is <key>. Remember it. <key> is the pass key.<filler> What is the pass key? The pass
    key is <key><EOS>

the classic passkey prompt: one filler sentence group repeated (entered at a random offset), the needle at a
uniformly random depth, the key stated twice in it as in the original test. The key is one token drawn from
the single-character tokens the rest of the document never uses (" 0" .. " Z", ~30 of them), so it is found by
content. Both choices make the lookup learnable by a tiny model in a few hundred steps: the second statement
can be copied from a few tokens back, which teaches the copy before the model must find the key far away
(without it, and with multi-token keys, the tiny model learned nothing in 800 steps). What is left to fail at
a longer length is position (RoPE at distances never trained, attention spread over more tokens): what a
context-extension phase fixes. `bench/long_context.py` mixes these into training and scores the answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.manifest import read_manifest
from data_prep.megatron import write_indexed_dataset

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = (" The pass key is", ". Remember it.", " is the pass key.")  # the key goes between the pieces
QUESTION = " What is the pass key? The pass key is"
KEY_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class PasskeyFormat:
    """The token ids of the template pieces and of the keys, from one tokenizer."""

    filler: tuple[int, ...]
    needle: tuple[tuple[int, ...], ...]
    question: tuple[int, ...]
    keys: tuple[int, ...]
    eos: int
    vocab_size: int
    bos: int | None = None  # the prepared corpus starts every document with BOS (add_bos=true)

    @property
    def overhead(self) -> int:
        """Tokens of a document that are not filler (the needle's two keys, the answer and the EOS included):
        the shortest document."""
        return sum(len(p) for p in self.needle) + len(self.question) + len(self.needle) + 1 + (self.bos is not None)

    @classmethod
    def from_prepared(cls, directory: str | Path) -> PasskeyFormat:
        """The format of a prepared data_prep directory: its tokenizer and its EOS id."""
        directory = Path(directory)
        manifest = read_manifest(directory)  # DataError naming the file and the fix
        fmt = cls.from_tokenizer(directory / Path(manifest.tokenizer_file).name, manifest.eos_id)
        return dataclasses.replace(fmt, bos=manifest.bos_id) if manifest.add_bos else fmt

    @classmethod
    def from_tokenizer(cls, tokenizer_file: str | Path, eos_id: int) -> PasskeyFormat:
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception for an unreadable file
            raise ValueError(f"{tokenizer_file} is not a tokenizer.json ({str(e).splitlines()[0]})") from None
        vocab = tok.get_vocab_size()
        if not 0 <= eos_id < vocab:
            raise ValueError(f"eos id {eos_id} is outside the tokenizer's {vocab} ids")

        def ids(text: str) -> tuple[int, ...]:  # as data_prep encodes documents: no special tokens added
            return tuple(tok.encode(text, add_special_tokens=False).ids)

        filler, question = ids(FILLER), ids(QUESTION)
        needle = tuple(ids(piece) for piece in NEEDLE)
        used = set(filler) | set(question) | {t for piece in needle for t in piece} | {eos_id}

        # a key must be one token, and one the template never holds: then the only place to copy it from is the
        # needle (" 7" reads naturally; a small vocabulary may lack it, then the bare characters)
        def single(prefix: str) -> list[int]:
            encoded = [ids(prefix + c) for c in KEY_CHARS]
            return [e[0] for e in encoded if len(e) == 1 and e[0] not in used]

        keys = single(" ")
        if len(keys) < 10:
            keys = list(dict.fromkeys(keys + single("")))
        if len(keys) < 10:
            raise ValueError(f"{tokenizer_file}: only {len(keys)} single-token keys (0-9, A-Z); need 10")
        return cls(filler, needle, question, tuple(keys), eos_id, vocab)

    def document(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, int]:
        """(ids of one document of exactly `length` tokens, its key); the key is the token before the EOS."""
        fill = length - self.overhead
        if fill < 0:
            raise ValueError(f"a passkey document needs at least {self.overhead} tokens, asked for {length}")
        key = int(rng.choice(self.keys))
        depth = int(rng.integers(0, fill + 1))
        offset = int(rng.integers(0, len(self.filler)))
        reps = (offset + fill) // len(self.filler) + 1
        text = np.tile(np.asarray(self.filler, np.int64), reps)[offset : offset + fill]
        needle = [x for piece in self.needle for x in (piece, [key])][:-1]  # piece, key, piece, key, piece
        bos = [] if self.bos is None else [self.bos]
        parts = [bos, text[:depth], *needle, text[depth:], self.question, [key], [self.eos]]
        return np.concatenate([np.asarray(p, np.int64) for p in parts]), key

    def documents(self, seed: int, count: int, min_len: int, max_len: int) -> list[np.ndarray]:
        """`count` documents with lengths uniform in [min_len, max_len]; the first is max_len long (so a
        `data.mode=pad` reader at that sample length accepts the set)."""
        rng = np.random.default_rng(seed)
        lengths = rng.integers(min_len, max_len + 1, size=count)
        lengths[0] = max_len
        return [self.document(rng, int(n))[0] for n in lengths]


def write_passkey_corpus(prefix: str | Path, fmt: PasskeyFormat, count: int, min_len: int, max_len: int,
                         seed: int = 0) -> Path:
    """Write `count` passkey documents as PREFIX.bin/.idx (atomically); returns the prefix. Arguments are
    checked before anything is written."""
    if count < 1:
        raise ValueError(f"docs: need at least one document, got {count}")
    if not fmt.overhead <= min_len <= max_len:
        raise ValueError(f"need {fmt.overhead} <= min_len <= max_len (the template takes {fmt.overhead} tokens), "
                         f"got min_len={min_len}, max_len={max_len}")
    documents = fmt.documents(seed, count, min_len, max_len)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_indexed_dataset(prefix, documents, dtype=np.uint16 if fmt.vocab_size <= 2**16 else np.int32)
    return prefix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.passkey", description=__doc__.split("\n")[0])
    p.add_argument("out_prefix")
    p.add_argument("--data-dir", default="data/python_stdlib",
                   help="a prepared data_prep directory: its tokenizer and EOS id")
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--min-len", type=int, default=30)
    p.add_argument("--max-len", type=int, default=66)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        fmt = PasskeyFormat.from_prepared(a.data_dir)
        write_passkey_corpus(a.out_prefix, fmt, a.docs, a.min_len, a.max_len, a.seed)
    except (ValueError, DataError) as e:
        print(f"data_prep.passkey: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"data_prep.passkey: cannot write {a.out_prefix}.bin/.idx ({e.strerror}): pass a writable "
              "OUT_PREFIX", file=sys.stderr)
        return 2
    print(f"wrote {a.docs} passkey documents of {a.min_len}-{a.max_len} tokens to {a.out_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
