"""The streaming reader: shapes, exact and DP-elastic resume, blending, padding, validation, corruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import prep_config

from data_prep import DataError, prepare
from data_prep.manifest import read_manifest
from data_prep.megatron import MegatronDataset, write_indexed_dataset
from data_prep.order import Blend
from data_prep.reader import TokenStream, validation_batches
from data_prep.sources import PreparedSplit

SEQ, MTP, MB, GBS = 64, 1, 2, 8
L = SEQ + 1 + MTP


def stream(dirs: list[Path], rank: int = 0, dp: int = 1, **kw) -> TokenStream:
    args = {"weights": None, "seq_len": SEQ, "mtp_depth": MTP, "micro_batch_size": MB, "global_batch_size": GBS}
    args.update(kw)
    return TokenStream([str(d) for d in dirs], dp_rank=rank, dp_size=dp, **args)


def take(s: TokenStream, n: int) -> list[torch.Tensor]:
    return [next(s)["tokens"] for _ in range(n)]


def global_batches(dirs: list[Path], dp: int, n_batches: int, state: dict | None = None) -> list[torch.Tensor]:
    """Each global batch as the concatenation, in rank order, of what every rank read for it."""
    ranks = [stream(dirs, r, dp) for r in range(dp)]
    if state is not None:
        for s in ranks:
            s.load_state_dict(state)
    per_rank_micro = GBS // dp // MB
    out = []
    for _ in range(n_batches):
        out.append(torch.cat([torch.cat(take(s, per_rank_micro)) for s in ranks]))
    return out


def test_batch_shapes_and_contents(prepared_a: Path) -> None:
    s = stream([prepared_a])
    b = next(s)
    assert b["tokens"].shape == (MB, L) and b["tokens"].dtype == torch.int64
    assert b["loss_mask"].shape == (MB, L) and b["loss_mask"].dtype == torch.float32
    assert torch.all(b["loss_mask"] == 1)  # pack mode: no padding
    # every sample is a contiguous window of the split's token stream
    src = PreparedSplit(prepared_a, "train")
    stream_bytes = np.concatenate([src.tokens(i) for i in range(src.num_shards)]).astype(np.int64).tobytes()
    for row in b["tokens"]:
        assert stream_bytes.find(row.numpy().tobytes()) % 8 == 0
    assert s.vocab_size == 384 and s.sample_len == L


def test_one_epoch_covers_every_sample_once_then_reshuffles(prepared_a: Path) -> None:
    s = stream([prepared_a], micro_batch_size=1, global_batch_size=1)
    n = s.samples_per_epoch[0]
    src = PreparedSplit(prepared_a, "train")
    expected = set()
    for i in range(src.num_shards):
        arr = src.tokens(i).astype(np.int64)
        for k in range((len(arr) - (L - SEQ)) // SEQ):
            expected.add(arr[k * SEQ : k * SEQ + L].tobytes())
    assert n == len(expected)
    epoch0 = [next(s)["tokens"][0].numpy().tobytes() for _ in range(n)]
    epoch1 = [next(s)["tokens"][0].numpy().tobytes() for _ in range(n)]
    assert set(epoch0) == expected == set(epoch1)  # each epoch: every sample exactly once
    assert epoch0 != epoch1  # epochs wrap with a new shuffle


def test_same_seed_same_stream_other_seed_other_stream(prepared_a: Path) -> None:
    a, b, c = stream([prepared_a]), stream([prepared_a]), stream([prepared_a], seed=7)
    ta, tb, tc = take(a, 6), take(b, 6), take(c, 6)
    assert all(torch.equal(x, y) for x, y in zip(ta, tb))
    assert not all(torch.equal(x, y) for x, y in zip(ta, tc))


def test_exact_resume(prepared_a: Path) -> None:
    s = stream([prepared_a])
    take(s, 7)  # mid global batch: 7 microbatches of 4 per global batch
    state = json.loads(json.dumps(s.state_dict()))  # plain JSON types
    assert state["consumed_samples"] == 7 * MB
    expected = take(s, 10)
    r = stream([prepared_a])
    r.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, take(r, 10)))


def test_dp_ranks_split_each_global_batch(prepared_a: Path) -> None:
    one = global_batches([prepared_a], dp=1, n_batches=5)
    two = global_batches([prepared_a], dp=2, n_batches=5)
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    # and the two ranks read disjoint samples
    r0, r1 = stream([prepared_a], 0, 2), stream([prepared_a], 1, 2)
    a = {row.numpy().tobytes() for t in take(r0, 8) for row in t}
    b = {row.numpy().tobytes() for t in take(r1, 8) for row in t}
    assert not a & b


@pytest.mark.parametrize(("dp_from", "dp_to"), [(2, 1), (1, 2)])
def test_dp_elastic_resume(prepared_a: Path, dp_from: int, dp_to: int) -> None:
    reference = global_batches([prepared_a], dp=1, n_batches=6)
    ranks = [stream([prepared_a], r, dp_from) for r in range(dp_from)]
    for s in ranks:
        take(s, 3 * GBS // dp_from // MB)  # three global batches
    states = [s.state_dict() for s in ranks]
    assert all(st["consumed_samples"] == 3 * GBS for st in states)
    resumed = global_batches([prepared_a], dp=dp_to, n_batches=3, state=states[0])
    assert all(torch.equal(x, y) for x, y in zip(reference[3:], resumed))


def test_mid_batch_state_needs_same_dp_size(prepared_a: Path) -> None:
    s = stream([prepared_a], 0, 2)
    next(s)
    with pytest.raises(DataError, match="mid-global-batch"):
        stream([prepared_a], 0, 1).load_state_dict(s.state_dict())


def test_state_from_other_data_is_refused(prepared_a: Path, prepared_b: Path) -> None:
    s = stream([prepared_a])
    with pytest.raises(DataError, match="data_fingerprint"):
        stream([prepared_b]).load_state_dict(s.state_dict())
    other = stream([prepared_b])
    other.load_state_dict(s.state_dict(), strict=False)  # position only
    assert other.consumed_samples == 0


def test_blend_shares_match_weights(prepared_a: Path, prepared_b: Path) -> None:
    weights = [0.7, 0.3]
    s = stream([prepared_a, prepared_b], weights=weights, micro_batch_size=50, global_batch_size=500)
    seen_a = set()
    for d in (prepared_a,):
        src = PreparedSplit(d, "train")
        for i in range(src.num_shards):
            arr = src.tokens(i).astype(np.int64)
            seen_a.update(arr[k * SEQ : k * SEQ + L].tobytes() for k in range((len(arr) - (L - SEQ)) // SEQ))
    from_a = sum(row.numpy().tobytes() in seen_a for _ in range(200) for row in next(s)["tokens"])
    assert abs(from_a / 10_000 - 0.7) < 0.02
    # the blend itself is exact to n_datasets / period at every period boundary
    ds, _ = Blend([2.0, 1.0, 1.0]).split(np.arange(40960))
    assert np.allclose(np.bincount(ds) / 40960, [0.5, 0.25, 0.25], atol=1e-3)


def test_pad_mode_one_document_per_sample(prepared_a: Path) -> None:
    m = read_manifest(prepared_a)
    seq = 256
    s = stream([prepared_a], mode="pad", seq_len=seq, global_batch_size=MB)
    src = PreparedSplit(prepared_a, "train")
    flat = np.concatenate([src.tokens(i) for i in range(src.num_shards)]).astype(np.int64)
    bounds = src.all_doc_starts().tolist() + [len(flat)]
    # expected samples: each document from its start, continuing every seq_len tokens, never past its EOS
    expected = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        for k in range(0, b - a - 1, seq):
            expected.append(flat[a + k : min(b, a + k + seq + 1 + MTP)].tobytes())
    assert s.samples_per_epoch == [len(expected)]
    got = []
    for _ in range(len(expected) // MB):
        batch = next(s)
        for tokens, mask in zip(batch["tokens"].numpy(), batch["loss_mask"].numpy()):
            n = int(mask.sum())
            assert np.all(mask[:n] == 1) and np.all(mask[n:] == 0) and np.all(tokens[n:] == m.pad_id)
            got.append(tokens[:n].tobytes())
    assert len(got) == len(set(got)) >= len(expected) - MB and set(got) <= set(expected)
    assert any(len(g) < 8 * (seq + 1 + MTP) for g in got)  # some samples are padded


def test_pad_mode_seq_len_longer_than_every_document(prepared_a: Path) -> None:
    longest = read_manifest(prepared_a).splits["train"].max_doc_tokens
    with pytest.raises(DataError, match=rf"longest has {longest}.*mode=pack"):
        stream([prepared_a], mode="pad", seq_len=longest + 5)


def test_validation_is_deterministic_and_leaves_training_alone(prepared_a: Path) -> None:
    s = stream([prepared_a])
    take(s, 3)
    state = s.state_dict()
    v1 = list(validation_batches([str(prepared_a)], SEQ, MTP, MB, max_batches=5))
    v2 = list(validation_batches([str(prepared_a)], SEQ, MTP, MB, max_batches=5))
    assert len(v1) == 5 and all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(v1, v2))
    assert s.state_dict() == state
    fresh = stream([prepared_a])
    fresh.load_state_dict(state)
    assert torch.equal(next(s)["tokens"], next(fresh)["tokens"])
    # it reads the val split: its samples are windows of the val stream only
    val = PreparedSplit(prepared_a, "val")
    vbytes = np.concatenate([val.tokens(i) for i in range(val.num_shards)]).astype(np.int64).tobytes()
    assert all(vbytes.find(r.numpy().tobytes()) >= 0 for b in v1 for r in b["tokens"])
    # one pass at most
    everything = list(validation_batches([str(prepared_a)], SEQ, MTP, MB, max_batches=None))
    per_pass = sum((n - (L - SEQ)) // SEQ for n in val.shard_tokens.tolist())
    assert len(everything) == per_pass // MB


def test_truncated_shard_is_caught(prepared_a: Path, tmp_path: Path) -> None:
    d = shutil.copytree(prepared_a, tmp_path / "t")
    victim = d / "train-00001.bin"
    victim.write_bytes(victim.read_bytes()[:-100])
    s = stream([d], micro_batch_size=8, global_batch_size=64)
    with pytest.raises(DataError, match=r"train-00001.bin is \d+ bytes, manifest.json says \d+.*data_prep"):
        for _ in range(200):
            next(s)


def test_flipped_byte_is_caught_with_full_verify(prepared_a: Path, tmp_path: Path) -> None:
    d = shutil.copytree(prepared_a, tmp_path / "f")
    victim = d / "train-00002.bin"
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0x01  # the low bit of token 500: still an id of the vocabulary (an id outside it: see below)
    victim.write_bytes(bytes(data))
    cheap = stream([d], micro_batch_size=8, global_batch_size=64)
    take(cheap, 50)  # a size check cannot see a flipped bit
    with pytest.raises(DataError, match=r"train-00002.bin does not match its sha256 .*corrupted"):
        stream([d], micro_batch_size=8, global_batch_size=64, verify="full")  # every shard, before any batch


def test_missing_and_mismatched_manifest(prepared_a: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        stream([tmp_path / "nowhere"])
    d = shutil.copytree(prepared_a, tmp_path / "m")
    (d / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest.json is missing.*python -m data_prep"):
        stream([d])
    d2 = shutil.copytree(prepared_a, tmp_path / "m2")
    raw = json.loads((d2 / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][0]["num_tokens"] += 1  # says something the file is not
    (d2 / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="train-00000.bin is .* bytes, manifest.json says"):
        take(stream([d2], micro_batch_size=8, global_batch_size=64), 200)
    (d2 / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        stream([d2])


def test_vocab_larger_than_model_and_mixed_tokenizers(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"vocabulary \(384\) is larger than the model's vocab_size \(256\)"):
        stream([prepared_a], model_vocab_size=256)
    other = tmp_path / "other"
    prepare(prep_config(corpus_a, other, tokenizer={"vocab_size": 300}))
    with pytest.raises(DataError, match="different tokenizers"):
        stream([prepared_a, other], weights=[1, 1])


def test_bad_batch_geometry(prepared_a: Path) -> None:
    with pytest.raises(DataError, match="not a multiple of micro_batch_size"):
        stream([prepared_a], rank=0, dp=2, global_batch_size=6)
    with pytest.raises(DataError, match="do not make one sample"):
        stream([prepared_a], seq_len=10**6)


def test_megatron_bin_idx_round_trip_and_stream(prepared_a: Path, corpus_a: Path, tmp_path: Path) -> None:
    src = PreparedSplit(prepared_a, "train")
    starts = src.all_doc_starts().tolist() + [int(src.bases[-1])]
    docs = [src.read(a, b - a).copy() for a, b in zip(starts[:-1], starts[1:])]
    write_indexed_dataset(tmp_path / "meg_text_document", docs, np.uint16)
    ds = MegatronDataset(tmp_path / "meg_text_document")
    assert len(ds) == len(docs) == ds.num_documents
    assert all(np.array_equal(ds[i], d) and np.array_equal(ds.document(i), d) for i, d in enumerate(docs))
    # the reader takes the pair directly; one big shard reads the same samples as a one-shard prepared dir
    single = tmp_path / "single"
    prepare(prep_config(corpus_a, single, shard_tokens=1 << 20,
                        tokenizer={"path": str(prepared_a / "tokenizer.json")}))  # fmt: skip
    a = take(stream([single]), 12)
    b = take(stream([tmp_path / "meg_text_document.bin"]), 12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    idx = tmp_path / "meg_text_document.idx"
    idx.write_bytes(b"garbage!!" + idx.read_bytes()[9:])
    with pytest.raises(DataError, match="not a Megatron MMIDIDX index"):
        MegatronDataset(tmp_path / "meg_text_document")


def test_shuffle_window_bounds_shards_touched(prepared_a: Path) -> None:
    # within a window of 2 shards, consecutive samples come from at most 2 shards
    s = stream([prepared_a], shuffle_window=2, global_batch_size=MB)
    src = PreparedSplit(prepared_a, "train")
    shard_bytes = [src.tokens(i).astype(np.int64).tobytes() for i in range(src.num_shards)]
    first = [next(s)["tokens"] for _ in range(5)]
    shards = {i for t in first for r in t for i, sb in enumerate(shard_bytes) if sb.find(r.numpy().tobytes()) >= 0}
    assert len(shards) <= 2


def test_document_segments_and_positions_follow_the_eos_tokens(prepared_a: Path) -> None:
    # every prepared document ends with EOS, so a packed sample's documents start right after each EOS
    eos = read_manifest(prepared_a).eos_id
    s = stream([prepared_a], document_mask=True, restart_positions=True)
    val = next(validation_batches([str(prepared_a)], SEQ, MTP, MB, 1, document_mask=True))
    assert set(val) == {"tokens", "loss_mask", "segments"}  # no positions asked for
    boundaries_seen = 0
    for _ in range(8):
        b = next(s)
        for tokens, segments, positions in zip(b["tokens"].numpy(), b["segments"].numpy(), b["positions"].numpy()):
            starts = np.flatnonzero(tokens[:-1] == eos) + 1
            new_doc = np.zeros(L, dtype=bool)
            new_doc[starts] = True
            assert np.array_equal(segments[1:] != segments[:-1], new_doc[1:])
            first = np.maximum.accumulate(np.where(new_doc, np.arange(L), 0))
            assert np.array_equal(positions, np.arange(L) - first)
            boundaries_seen += len(starts)
    assert boundaries_seen > 0  # samples of 66 tokens from stdlib modules do cross documents


def test_document_mask_needs_pack_mode(prepared_a: Path) -> None:
    with pytest.raises(DataError, match="document_mask=true needs mode=pack"):
        stream([prepared_a], mode="pad", seq_len=256, global_batch_size=MB, document_mask=True)
    with pytest.raises(DataError, match="restart_positions=true needs document_mask=true"):
        stream([prepared_a], restart_positions=True)
