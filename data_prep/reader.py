"""The streaming reader the trainer uses: `TokenStream` (training) and `validation_batches`.

A sample is `seq_len + 1 + mtp_depth` tokens: inputs, next-token labels and the MTP modules' further
targets. Global sample g is a pure function of (g, seed, data); global batch b is samples
[start_b, start_b + global_batch_size) and DP rank r reads the r-th contiguous slice of it, in microbatches.
The position is one number, consumed_samples, so a checkpoint restores exactly, and onto any DP size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data_prep.errors import DataError
from data_prep.order import Blend, EpochOrder
from data_prep.sources import TokenSource, open_source

MODES = ("pack", "pad")
DOC_STARTS_CACHED = 64  # shards whose document index a reader keeps (document masking)
STATE_VERSION = 1


@dataclass
class _Table:
    """The samples of one source: per-shard counts, and (pad mode) each sample's start and length."""

    counts: np.ndarray  # samples per shard
    sample_base: np.ndarray  # pad mode: index of each shard's first sample in starts/lengths
    starts: np.ndarray | None  # pad mode: sample start in the split's token stream
    lengths: np.ndarray | None  # pad mode: real tokens in the sample (the rest is padding)


def _pack_table(src: TokenSource, seq_len: int, sample_len: int) -> _Table:
    # Samples stay inside a shard: windows of sample_len tokens every seq_len tokens, consecutive windows
    # overlapping by 1 + mtp_depth so every token is a main-head target exactly once.
    counts = np.maximum(0, (src.shard_tokens - (sample_len - seq_len)) // seq_len)
    return _Table(counts, np.empty(0, np.int64), None, None)


def _pad_table(src: TokenSource, seq_len: int, sample_len: int) -> _Table:
    # One document per sample; a document longer than a sample continues in further samples (stride
    # seq_len, like pack mode) rather than being cut, so no text is dropped.
    starts = src.all_doc_starts()
    total = int(src.bases[-1])
    lengths = np.diff(np.append(starts, total))
    longest = int(lengths.max()) if len(lengths) else 0
    if longest < sample_len:
        raise DataError(
            f"{src.name}: mode=pad with seq_len={seq_len} needs documents of {sample_len} tokens "
            f"(seq_len + 1 + mtp_depth) but the longest has {longest}: use mode=pack, or "
            f"seq_len<={longest - (sample_len - seq_len)}"
        )
    keep = lengths >= 2  # a sample needs at least one target
    starts, lengths = starts[keep], lengths[keep]
    chunks = (lengths - 2) // seq_len + 1
    doc_of = np.repeat(np.arange(len(starts)), chunks)
    first = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64)
    k = np.arange(len(doc_of)) - np.repeat(first, chunks)
    s_start = starts[doc_of] + k * seq_len
    s_len = np.minimum(sample_len, lengths[doc_of] - k * seq_len)
    # a sample belongs to the shard where its document starts
    shard_of_doc = np.searchsorted(src.bases, starts, side="right") - 1
    counts = np.bincount(shard_of_doc[doc_of], minlength=src.num_shards).astype(np.int64)
    base = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return _Table(counts, base, s_start.astype(np.int64), s_len.astype(np.int64))


@dataclass
class _Plan:
    """Where the samples of a block of global indices live, resolved once so gathering is a tight loop."""

    arrays: list[np.ndarray]  # the shard array each sample reads from
    offsets: list[int]  # start inside that shard
    lengths: list[int]  # real tokens (== sample_len in pack mode)
    sources: list[TokenSource]  # each sample's source, to read samples crossing a shard end (pad mode)
    split_starts: list[int]  # each sample's start in its split's token stream (pad mode)
    max_epoch: int
    doc_starts: list[np.ndarray] | None = None  # document masking: each sample's shard's document starts


class _Sampler:
    """Global sample index -> tokens, for a blend of sources (shared by training and validation)."""

    def __init__(
        self,
        sources: list[TokenSource],
        weights: list[float] | None,
        seq_len: int,
        mtp_depth: int,
        mode: str,
        seed: int,
        shuffle: bool,
        window: int,
        document_mask: bool = False,
        restart_positions: bool = False,
    ) -> None:
        self.sources = sources
        self.seq_len = seq_len
        self.sample_len = seq_len + 1 + mtp_depth
        self.mode = mode
        self.document_mask, self.restart_positions = document_mask, restart_positions
        self._doc_starts: dict[tuple[int, int], np.ndarray] = {}  # (source, shard) -> document starts
        make = _pack_table if mode == "pack" else _pad_table
        self.tables = [make(s, seq_len, self.sample_len) for s in sources]
        for s, t in zip(sources, self.tables):
            if t.counts.sum() == 0:
                raise DataError(
                    f"{s.name}: {int(s.bases[-1])} tokens do not make one sample of "
                    f"{self.sample_len} tokens: use a shorter seq_len or more data"
                )
        self.orders = [EpochOrder(t.counts, seed, i, window, shuffle) for i, t in enumerate(self.tables)]
        self.blend = Blend(weights if weights is not None else [1.0] * len(sources))
        self.pad_id = sources[0].pad_id

    def plan(self, g: np.ndarray) -> _Plan:
        ds, j = self.blend.split(g)
        n = len(g)
        offset = np.empty(n, np.int64)
        split_start = np.empty(n, np.int64)
        length = np.full(n, self.sample_len, np.int64)
        arrays: list[Any] = [None] * n
        max_epoch = 0
        starts: list[Any] = [None] * n if self.document_mask else []
        groups = (
            [(0, np.arange(n))]
            if len(self.sources) == 1
            else [(d, np.flatnonzero(ds == d)) for d in range(len(self.sources))]
        )
        for d, sel in groups:
            if len(sel) == 0:
                continue
            shard, local, epoch = self.orders[d].locate(j[sel])
            max_epoch = max(max_epoch, int(epoch.max()))
            src, table = self.sources[d], self.tables[d]
            if table.starts is None:  # pack: fixed windows inside the shard
                offset[sel] = local * self.seq_len
                split_start[sel] = src.bases[shard] + offset[sel]
            else:
                idx = table.sample_base[shard] + local
                split_start[sel] = table.starts[idx]
                offset[sel] = split_start[sel] - src.bases[shard]
                length[sel] = table.lengths[idx]
            # open (and check) each needed shard once, then look arrays up by shard id
            by_shard: list[Any] = [None] * src.num_shards
            for s in np.flatnonzero(np.bincount(shard, minlength=src.num_shards)).tolist():
                by_shard[s] = src.tokens(s)
            if len(groups) == 1:
                arrays = [by_shard[s] for s in shard.tolist()]
            else:
                for i, s in zip(sel.tolist(), shard.tolist()):
                    arrays[i] = by_shard[s]
            if self.document_mask:
                for i, s in zip(sel.tolist(), shard.tolist()):
                    starts[i] = self._shard_doc_starts(d, s)
        sources = [self.sources[d] for d in ds.tolist()] if self.mode == "pad" else []
        return _Plan(arrays, offset.tolist(), length.tolist(), sources, split_start.tolist(), max_epoch,
                     starts if self.document_mask else None)

    def _shard_doc_starts(self, source: int, shard: int) -> np.ndarray:
        """A shard's document starts, from a bounded cache (the shuffle window touches a few shards at a time)."""
        key = (source, shard)
        starts = self._doc_starts.pop(key, None)
        if starts is None:
            starts = self.sources[source].doc_starts(shard)
            if len(self._doc_starts) >= DOC_STARTS_CACHED:
                self._doc_starts.pop(next(iter(self._doc_starts)))  # the least recently used
        self._doc_starts[key] = starts  # (re)inserted last: dicts keep insertion order
        return starts

    def documents(self, plan: _Plan, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Packed samples lo..hi: each token's document (`segments`: index of the last document start at or
        before it, so tokens before the shard's first start share one) and, with restart_positions, its
        position inside the part of its document in the sample (`positions`: 0 at the sample's start and at
        every document start; RoPE only sees relative positions inside a document, so the document's earlier
        part outside the sample does not matter)."""
        L = self.sample_len
        index = np.arange(L, dtype=np.int64)
        segments = np.empty((hi - lo, L), dtype=np.int64)
        for row, (st, o) in enumerate(zip(plan.doc_starts[lo:hi], plan.offsets[lo:hi])):
            segments[row] = np.searchsorted(st, o + index, side="right")
        out = {"segments": torch.from_numpy(segments)}
        if self.restart_positions:
            first = np.ones((hi - lo, L), dtype=bool)
            first[:, 1:] = segments[:, 1:] != segments[:, :-1]
            start = np.maximum.accumulate(np.where(first, index, 0), axis=1)
            out["positions"] = torch.from_numpy(index - start)
        return out

    def fill(self, plan: _Plan, lo: int, hi: int, out: np.ndarray, mask: np.ndarray) -> None:
        """Write samples lo..hi of `plan` into `out` (int64 [hi-lo, L]); zero `mask` (all ones) over padding."""
        L = self.sample_len
        arrays, offsets = plan.arrays, plan.offsets
        if self.mode == "pack":
            for row, (a, o) in enumerate(zip(arrays[lo:hi], offsets[lo:hi])):
                out[row] = a[o : o + L]
            return
        for row, i in enumerate(range(lo, hi)):
            n, o = plan.lengths[i], offsets[i]
            if o + n <= len(arrays[i]):
                out[row, :n] = arrays[i][o : o + n]
            else:  # the document continues in the next shard
                out[row, :n] = plan.sources[i].read(plan.split_starts[i], n)
            out[row, n:] = self.pad_id
            mask[row, n:] = 0.0

    def batch(self, plan: _Plan, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """A freshly allocated microbatch of samples lo..hi of `plan`."""
        # numpy allocation + torch.from_numpy: about half the per-call cost of torch.empty + .numpy()
        tokens = np.empty((hi - lo, self.sample_len), dtype=np.int64)
        mask = np.empty((hi - lo, self.sample_len), dtype=np.float32)
        mask.fill(1.0)
        if self.mode == "pack":  # the hot path: inline, no padding
            L = self.sample_len
            for row, (a, o) in enumerate(zip(plan.arrays[lo:hi], plan.offsets[lo:hi])):
                tokens[row] = a[o : o + L]
        else:
            self.fill(plan, lo, hi, tokens, mask)
        batch = {"tokens": torch.from_numpy(tokens), "loss_mask": torch.from_numpy(mask)}
        if self.document_mask:
            batch.update(self.documents(plan, lo, hi))
        return batch


def _open_all(
    data_dirs: list[str], weights: list[float] | None, split: str, verify: str, model_vocab_size: int | None
) -> list[TokenSource]:
    if isinstance(data_dirs, str | bytes):
        data_dirs = [data_dirs]
    data_dirs = [str(d) for d in data_dirs]
    if not data_dirs:
        raise DataError("no data directories given: set data_dirs=[<prepared dir>, ...]")
    if weights is not None and len(weights) != len(data_dirs):
        raise DataError(f"{len(weights)} weights for {len(data_dirs)} data directories: give one weight each")
    # each source refuses a tokenizer larger than the model, and shards recording ids it cannot embed
    sources = [open_source(d, split, verify, model_vocab_size=model_vocab_size) for d in data_dirs]
    shas = {s.tokenizer_sha256 for s in sources if s.tokenizer_sha256}
    if len(shas) > 1:
        names = ", ".join(s.name for s in sources)
        raise DataError(
            f"datasets {names} were tokenized with different tokenizers: prepare them all with the same tokenizer.path"
        )
    for s in sources:
        if verify == "full":  # every shard hashed and its ids scanned now, so nothing surfaces mid-run
            s.verify_all()
        else:  # ids no manifest records: scanned now (recorded ones were checked on opening)
            s.scan_unrecorded()
    return sources


def _check_sizes(seq_len: int, mtp_depth: int, micro_batch_size: int, mode: str) -> None:
    if seq_len < 1 or mtp_depth < 0 or micro_batch_size < 1:
        raise DataError(
            f"seq_len={seq_len}, mtp_depth={mtp_depth}, micro_batch_size={micro_batch_size}: "
            "need seq_len >= 1, mtp_depth >= 0, micro_batch_size >= 1"
        )
    if mode not in MODES:
        raise DataError(f"mode={mode!r} is not one of {MODES}")


def _check_documents(mode: str, document_mask: bool, restart_positions: bool) -> None:
    if document_mask and mode != "pack":
        raise DataError(f"document_mask=true needs mode=pack (mode={mode} holds one document per sample already)")
    if restart_positions and not document_mask:
        raise DataError("restart_positions=true needs document_mask=true (positions restart where documents "
                        "are kept apart)")


class TokenStream:
    """This DP rank's infinite stream of microbatches over a seeded, blended, epoch-reshuffled order.

    next(stream) -> {"tokens": LongTensor [micro_batch_size, seq_len + 1 + mtp_depth],
                     "loss_mask": FloatTensor, same shape: 1.0 for real tokens, 0.0 for padding,
                     with document_mask: "segments" LongTensor, same shape: the document of each token,
                     with restart_positions: "positions" LongTensor, same shape: its RoPE position}.
    Global batch b covers global samples [c_b, c_b + global_batch_size) where c_b is consumed_samples at its
    start; rank r reads samples c_b + r * global_batch_size / dp_size + [0, global_batch_size / dp_size), as
    consecutive microbatches. The union over ranks is therefore the same for any dp_size.
    """

    def __init__(
        self,
        data_dirs: list[str],
        weights: list[float] | None,
        seq_len: int,
        mtp_depth: int,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int = 1234,
        mode: str = "pack",
        verify: str = "size",
        split: str = "train",
        *,
        model_vocab_size: int | None = None,
        shuffle: bool = True,
        shuffle_window: int = 8,
        document_mask: bool = False,
        restart_positions: bool = False,
    ) -> None:
        _check_sizes(seq_len, mtp_depth, micro_batch_size, mode)
        _check_documents(mode, document_mask, restart_positions)
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise DataError(
                f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size * dp_size = "
                f"{micro_batch_size} * {dp_size}: set it to micro_batch_size * grad_accum * dp_size"
            )
        self.seq_len, self.mtp_depth, self.mode, self.seed = seq_len, mtp_depth, mode, seed
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        self.micro_per_batch = self.per_rank // micro_batch_size
        self.sources = _open_all(data_dirs, weights, split, verify, model_vocab_size)
        self.weights = [float(w) for w in weights] if weights is not None else None
        self._sampler = _Sampler(self.sources, weights, seq_len, mtp_depth, mode, seed, shuffle, shuffle_window,
                                 document_mask, restart_positions)
        self.fingerprint = hashlib.sha256(
            repr(
                (
                    [s.fingerprint for s in self.sources],
                    self._sampler.blend.weights.round(12).tolist(),
                    seq_len,
                    mtp_depth,
                    mode,
                    seed,
                    shuffle,
                    shuffle_window,
                )
            ).encode()
        ).hexdigest()[:16]
        # Position: the first global sample of the current global batch, and microbatches of it done here.
        self._batch_start = 0
        self._micro = 0
        # Sample locations for this rank's share of a block of upcoming global batches, resolved at once
        # (vectorised). The rank's rows of consecutive global batches are consecutive in the plan.
        self._plan: _Plan | None = None
        self._row = 0
        self._plan_batches = max(1, -(-2048 // self.per_rank))

    # -- facts the trainer may want ---------------------------------------------------------------------

    @property
    def sample_len(self) -> int:
        return self._sampler.sample_len

    @property
    def vocab_size(self) -> int | None:
        return self.sources[0].vocab_size

    @property
    def samples_per_epoch(self) -> list[int]:
        return [int(t.counts.sum()) for t in self._sampler.tables]

    @property
    def consumed_samples(self) -> int:
        return self._batch_start + self._micro * self.micro_batch_size * self.dp_size

    # -- iteration --------------------------------------------------------------------------------------

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._plan is None or self._row >= self._plan_batches * self.per_rank:
            gb = self._batch_start + np.arange(self._plan_batches, dtype=np.int64)[:, None] * self.global_batch_size
            g = gb + self.dp_rank * self.per_rank + np.arange(self.per_rank, dtype=np.int64)[None, :]
            self._plan = self._sampler.plan(g.ravel())
            self._row = self._micro * self.micro_batch_size
        lo = self._row
        self._row = lo + self.micro_batch_size
        # A fresh allocation per microbatch (not views of a bigger block): blocks past glibc's mmap
        # threshold would be page-faulted anew each time, which costs more than the copy.
        batch = self._sampler.batch(self._plan, lo, self._row)
        self._micro += 1
        if self._micro == self.micro_per_batch:
            self._micro = 0
            self._batch_start += self.global_batch_size
        return batch

    # -- checkpointing ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position; `consumed_samples` is the global sample index reached."""
        return {
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "batch_start_samples": self._batch_start,
            "micro_in_batch": self._micro,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "mtp_depth": self.mtp_depth,
            "mode": self.mode,
            "data_fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from `state`, possibly saved with another dp_size (at a global-batch boundary).

        strict: refuse a state saved over different data, seed, seq_len, mtp_depth or mode, where
        "the same stream" would not mean the same samples.
        """
        if strict:
            for key, mine in (
                ("seed", self.seed),
                ("seq_len", self.seq_len),
                ("mtp_depth", self.mtp_depth),
                ("mode", self.mode),
                ("data_fingerprint", self.fingerprint),
            ):
                if key in state and state[key] != mine:
                    raise DataError(
                        f"data state in the checkpoint has {key}={state[key]!r}, this run {mine!r}: resume "
                        "with the same data settings, or start a new run from the checkpoint with "
                        "train.init_from=<checkpoint> (weights kept, data position fresh)"
                    )
        micro = int(state.get("micro_in_batch", 0))
        batch_start = int(state.get("batch_start_samples", state["consumed_samples"]))
        if micro:
            same = all(
                state.get(k) == v
                for k, v in (
                    ("dp_size", self.dp_size),
                    ("micro_batch_size", self.micro_batch_size),
                    ("global_batch_size", self.global_batch_size),
                )
            )
            if not same:
                raise DataError(
                    f"data state was saved mid-global-batch (microbatch {micro}) with dp_size="
                    f"{state.get('dp_size')}, micro_batch_size={state.get('micro_batch_size')}, "
                    f"global_batch_size={state.get('global_batch_size')}: resume with those, or from a "
                    "checkpoint taken at a step boundary"
                )
        self._batch_start = batch_start
        self._micro = micro
        self._plan = None  # positions changed: resolve sample locations afresh


def validation_batches(
    data_dirs: list[str],
    seq_len: int,
    mtp_depth: int,
    micro_batch_size: int,
    max_batches: int | None,
    *,
    weights: list[float] | None = None,
    mode: str = "pack",
    verify: str = "size",
    split: str = "val",
    dp_rank: int = 0,
    dp_size: int = 1,
    model_vocab_size: int | None = None,
    document_mask: bool = False,
    restart_positions: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Microbatches of the validation split in a fixed order (no shuffle), one pass at most.

    Independent of any TokenStream (no shared state). With dp_size > 1, rank r gets microbatches
    r, r + dp_size, ...; stops after `max_batches` (per rank) or before any sample would repeat.
    """
    _check_sizes(seq_len, mtp_depth, micro_batch_size, mode)
    _check_documents(mode, document_mask, restart_positions)
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
    sources = _open_all(data_dirs, weights, split, verify, model_vocab_size)
    sampler = _Sampler(sources, weights, seq_len, mtp_depth, mode, seed=0, shuffle=False, window=1,
                       document_mask=document_mask, restart_positions=restart_positions)
    group = micro_batch_size * dp_size  # every rank stops at the same count, so DP evaluation stays in step
    k = 0
    while max_batches is None or k < max_batches:
        plan = sampler.plan(k * group + np.arange(group, dtype=np.int64))
        if plan.max_epoch > 0:
            if k == 0:
                names = ", ".join(s.name for s in sources)
                raise DataError(
                    f"{names}: fewer {split} samples than one microbatch per rank ({group}): prepare more "
                    "validation data (val_fraction) or lower micro_batch_size / seq_len"
                )
            return
        lo = dp_rank * micro_batch_size
        yield sampler.batch(plan, lo, lo + micro_batch_size)
        k += 1
