"""The global sample order: blending across datasets, and a seeded per-epoch shuffle within each dataset.

Everything is a pure function of the global sample index (and the seed), computed vectorised for a block
of indices at a time. Nothing depends on how many ranks read the stream or how far they got, which is what
makes resume exact and independent of the data-parallel size (Megatron's consumed-samples idea).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from data_prep.errors import DataError


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class EpochOrder:
    """Dataset-local sample index j -> (shard, sample inside the shard), reshuffled every epoch.

    Epoch e = j // total. Its order: shards in a seeded random order (keyed on seed, stream, e), cut into
    windows of `window` consecutive shards; inside each window the samples are permuted (keyed on the window
    too). Reading thus stays within a few shards at a time (page-cache friendly) while samples of different
    shards mix. Permutations are built lazily and cached, so memory is bounded by the window, not the data.
    """

    def __init__(self, counts: np.ndarray, seed: int, stream: int, window: int = 8, shuffle: bool = True) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.stream, self.window, self.shuffle = seed, stream, max(1, window), shuffle
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        got = self._epochs.get(e)
        if got is None:
            n = len(self.counts)
            order = _rng(self.seed, self.stream, e, 0).permutation(n) if self.shuffle else np.arange(n)
            base = np.concatenate([[0], np.cumsum(self.counts[order])]).astype(np.int64)
            win_start = base[0 : n : self.window]
            got = (order, base, win_start)
            self._epochs[e] = got
            if len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return got

    def _perm(self, e: int, w: int, size: int) -> np.ndarray:
        key = (e, w)
        perm = self._perms.get(key)
        if perm is None:
            perm = _rng(self.seed, self.stream, e, 1, w).permutation(size)
            self._perms[key] = perm
            if len(self._perms) > 8:
                self._perms.popitem(last=False)
        return perm

    def locate(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, sample-in-shard, epoch) for dataset-local indices j (int64 array)."""
        epoch, p = np.divmod(np.asarray(j, dtype=np.int64), self.total)
        shard = np.empty_like(p)
        local = np.empty_like(p)
        # A block of consecutive indices spans one or two epochs and a few windows: loop over those
        # ranges (cheaper than np.unique, which sorts).
        for e in range(int(epoch.min()), int(epoch.max()) + 1):
            sel = epoch == e
            if not sel.any():
                continue
            pe = p[sel]
            order, base, win_start = self._epoch(e)
            if self.shuffle:
                w = np.searchsorted(win_start, pe, side="right") - 1
                for wi in range(int(w.min()), int(w.max()) + 1):
                    in_w = w == wi
                    if not in_w.any():
                        continue
                    lo = int(win_start[wi])
                    hi = int(win_start[wi + 1]) if wi + 1 < len(win_start) else self.total
                    pe[in_w] = lo + self._perm(e, wi, hi - lo)[pe[in_w] - lo]
            # 'right' - 1 skips shards with no samples (their base equals the next one's)
            k = np.searchsorted(base, pe, side="right") - 1
            shard[sel] = order[k]
            local[sel] = pe - base[k]
        return shard, local, epoch


class Blend:
    """Global sample index -> (dataset, dataset-local index), deterministic, with exact long-run shares.

    A pattern of `period` slots is filled greedily (each slot goes to the dataset furthest below its target
    share so far) and repeated; the k-th slot of dataset d in block b is its sample b * count_d + k. Shares
    are within n_datasets / period of the weights at every block boundary, and the mapping is O(1) per index.
    """

    def __init__(self, weights: list[float], period: int = 4096) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise DataError(f"data weights {list(weights)} must be non-negative numbers with a positive sum")
        w = w / w.sum()
        self.weights = w
        pattern = np.empty(period, dtype=np.int64)
        rank = np.empty(period, dtype=np.int64)
        counts = np.zeros(len(w), dtype=np.int64)
        for t in range(period):
            d = int(np.argmax(w * (t + 1) - counts))
            pattern[t] = d
            rank[t] = counts[d]
            counts[d] += 1
        self.period, self.pattern, self.rank, self.counts = period, pattern, rank, counts

    def split(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self.weights) == 1:
            return np.zeros_like(g), g
        block, pos = np.divmod(g, self.period)
        ds = self.pattern[pos]
        return ds, block * self.counts[ds] + self.rank[pos]
