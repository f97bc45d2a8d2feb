"""The layout-free training state: every tensor by its single-process name, as named slices, readable by any layout.

A checkpoint written by one layout (dp, pp, ep, schedule) must resume under another. DeepSpeed's own files are
cut by the layout that wrote them (one model file per pipeline rank, ZeRO-1 shards of each data-parallel
group's flattened parameters, our expert files per ep rank), and its Universal Checkpointing reads each whole
parameter before narrowing it and knows neither DualPipe's two stage copies nor our stacked expert tensors. So
the state is written in one form that no layout owns:

    state/index.json                 name -> global shape, dtypes, and where each piece of it lies
    state/rank_<r>.safetensors       the pieces rank r owns, keyed "<kind>/<name>/<start>"

A piece is a contiguous range [start, end) of a tensor flattened in row-major order (the single-process
tensor: a routed-expert shard holding experts [lo, hi) is the range starting at lo x rows of the stacked
global weight). Kinds: `param` (the model's weights, in the run's dtype), `master` (ZeRO-1's fp32 master
weights), `exp_avg`, `exp_avg_sq` (Adam's moments, in their own dtype: BF16 moments stay BF16). Each rank
writes exactly the ranges its ZeRO-1 partition updates, so every range is written once: DualPipe's mirror
copies and 1F1B's tied embedding copy are marked `ds_pipe_replicated` and skipped, expert-DP replicas own
disjoint partitions. Buffers (the routers' bias and counts) are written whole by one holder.

Reading: a rank computes the ranges its new layout needs (the same walk) and reads only those slices
(`pread` of the byte range, `SliceFile`): its own stages' weights, its own experts, its own partition of the
masters and moments. No rank ever materialises the whole model or optimizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.moe import RoutedExperts

STATE_DIR = "state"
INDEX_FILE = "index.json"
FORMAT = 1
KINDS = ("param", "master", "exp_avg", "exp_avg_sq")
MOMENTS = ("exp_avg", "exp_avg_sq")


class ElasticStateError(ValueError):
    """A layout-free state that cannot be read: names the file and what is wrong."""


@dataclass
class Piece:
    """Range [start, end) of the flattened single-process tensor `name`, held by `tensor` (1-D, end - start)."""

    name: str
    kind: str
    start: int
    end: int
    tensor: torch.Tensor


@dataclass
class Geometry:
    shape: tuple[int, ...]  # the single-process shape
    base: int  # where this rank's local tensor starts in the flattened global tensor


def geometry(model: nn.Module) -> dict[str, Geometry]:
    """name -> global shape and offset of every parameter and buffer of this rank's model (single-process names).
    Routed-expert shards are the only tensors whose local shape is not the global one."""
    out = {n: Geometry(tuple(t.shape), 0) for n, t in [*model.named_parameters(), *persistent_buffers(model).items()]}
    for mname, m in model.named_modules():
        if isinstance(m, RoutedExperts):
            for pname in ("gate_up_proj.weight", "down_proj.weight"):
                local = out[f"{mname}.{pname}"].shape
                row = int(torch.Size(local[1:]).numel())
                out[f"{mname}.{pname}"] = Geometry((model.cfg.n_routed_experts, *local[1:]), m.first_expert * row)
    return out


def _is_zero(optimizer: Any) -> bool:
    """DeepSpeed's ZeRO stage 1/2 optimizer (flat fp32 partitions); anything else must be a plain optimizer over
    the model's own parameters (fp32, ZeRO stage 0)."""
    if hasattr(optimizer, "single_partition_of_fp32_groups") and hasattr(optimizer, "round_robin_bit16_offsets"):
        return True
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ElasticStateError(f"{type(optimizer).__name__}: the layout-free checkpoint knows ZeRO-1 and plain "
                                "fp32 optimizers; use parallel.zero_stage=1")
    return False


def rank_pieces(model: nn.Module, optimizer: Any, *, for_writing: bool, dp_rank: int = 0) -> list[Piece]:
    """The pieces of this rank: weights, fp32 masters and Adam moments of what its optimizer partition updates.

    `for_writing`: skip replicated copies (DualPipe's mirror stages, 1F1B's tied embedding on the last stage), so
    every range is written once; for reading every local tensor is a target. Without ZeRO (stage 0) the whole
    local parameters are this rank's, written by data-parallel rank 0 only."""
    names = {id(p): n for n, p in model.named_parameters()}
    geo = geometry(model)
    pieces: list[Piece] = []

    def add(name: str, kind: str, local_a: int, local_b: int, tensor: torch.Tensor) -> None:
        base = geo[name].base
        pieces.append(Piece(name, kind, base + local_a, base + local_b, tensor))

    if _is_zero(optimizer):
        for i, group in enumerate(optimizer.round_robin_bit16_groups):
            pid = dist.get_rank(group=optimizer.real_dp_process_group[i])
            size = optimizer.partition_size[i]
            lo, hi = pid * size, (pid + 1) * size
            fp32 = optimizer.single_partition_of_fp32_groups[i]
            state = optimizer.optimizer.state.get(fp32, {})
            for p, offset in zip(group, optimizer.round_robin_bit16_offsets[i]):
                if for_writing and getattr(p, "ds_pipe_replicated", False):
                    continue
                a, b = max(offset, lo), min(offset + p.numel(), hi)
                if a >= b:
                    continue
                name = names[id(p)]
                add(name, "master", a - offset, b - offset, fp32[a - lo : b - lo])
                for kind in MOMENTS:
                    if kind in state:
                        add(name, kind, a - offset, b - offset, state[kind][a - lo : b - lo])
        params = dict(model.named_parameters())
        if for_writing:  # the weights of the partition's ranges (every range once over the data-parallel group)
            for piece in [pc for pc in pieces if pc.kind == "master"]:
                base = geo[piece.name].base
                flat = params[piece.name].detach().reshape(-1)
                pieces.append(Piece(piece.name, "param", piece.start, piece.end,
                                    flat[piece.start - base : piece.end - base]))
        else:  # a rank reads the whole weights it holds (no all-gather needed after loading)
            for name, p in params.items():
                add(name, "param", 0, p.numel(), p.data.view(-1))
        return pieces
    # no ZeRO: the optimizer's parameters are the model's; its state is per parameter
    if for_writing and dp_rank != 0:
        return pieces
    opt_state = getattr(optimizer, "state", {})
    for name, p in model.named_parameters():
        if for_writing and getattr(p, "ds_pipe_replicated", False):
            continue
        add(name, "param", 0, p.numel(), p.data.view(-1))
        state = opt_state.get(p, {})
        for kind in MOMENTS:
            if kind in state:
                add(name, kind, 0, p.numel(), state[kind].view(-1))
    return pieces


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent buffers (router biases and counts), by single-process name."""
    params = {n for n, _ in model.named_parameters()}
    return {n: t for n, t in model.state_dict().items() if n not in params}


# ---- writing ---------------------------------------------------------------------------------------------
@dataclass
class RankSnapshot:
    """What rank `rank` writes: its pieces (and buffers) by safetensors key, and their index entries.

    Taken on the training thread (`snapshot_rank_state`); written later, possibly by a background thread
    (`write_rank_file`), so with `copy` the tensors are host copies the training can no longer change."""

    fname: str
    tensors: dict[str, torch.Tensor]
    entries: dict[str, Any]


def snapshot_rank_state(rank: int, model: nn.Module, optimizer: Any, dp_rank: int, write_buffers: bool,
                        copy: bool = True, reuse: dict[str, torch.Tensor] | None = None) -> RankSnapshot:
    """This rank's pieces and index entries. `copy`: into host memory (an asynchronous save; about the size of
    the rank's file), reusing the tensors of `reuse` (the previous snapshot's, already written) where they fit:
    fresh pages cost more than the copy; pinned when the source is on the GPU. Else views of the live tensors,
    to be written before the next optimizer step. `write_buffers`: this rank is the one holder that writes the
    buffers of its layers."""
    fname = f"rank_{rank:05d}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {"pieces": [], "buffers": [], "tensors": {}}
    geo = geometry(model)
    old = reuse or {}

    def take(key: str, t: torch.Tensor) -> torch.Tensor:
        if not copy:
            return t.detach()
        out = old.get(key)
        if out is None or out.shape != t.shape or out.dtype != t.dtype:
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
        out.copy_(t.detach(), non_blocking=t.is_cuda)
        return out

    for pc in rank_pieces(model, optimizer, for_writing=True, dp_rank=dp_rank):
        key = f"{pc.kind}/{pc.name}/{pc.start}"
        tensors[key] = take(key, pc.tensor)
        entries["pieces"].append([pc.name, pc.kind, pc.start, pc.end, fname, key])
        entries["tensors"].setdefault(pc.name, {"shape": list(geo[pc.name].shape), "dtype": {}})
        entries["tensors"][pc.name]["dtype"][pc.kind] = str(pc.tensor.dtype).removeprefix("torch.")
    if write_buffers:
        for name, t in persistent_buffers(model).items():
            key = f"buffer/{name}"
            tensors[key] = take(key, t)
            entries["buffers"].append([name, fname, key])
    if copy and torch.cuda.is_available():
        torch.cuda.synchronize()  # the device-to-host copies are complete before training changes the sources
    return RankSnapshot(fname, tensors, entries)


def write_rank_file(ckpt: Path, snap: RankSnapshot) -> tuple[Path, dict[str, Any]]:
    """Write a snapshot to `ckpt/state/<fname>` (fsynced); returns the path and its manifest entry (size and
    sha256, hashed from memory as the bytes are written: the file is not read back)."""
    state_dir = ckpt / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / snap.fname
    return path, write_safetensors(path, snap.tensors, {"format": str(FORMAT)})


def write_rank_state(ckpt: Path, rank: int, model: nn.Module, optimizer: Any, dp_rank: int,
                     write_buffers: bool) -> dict[str, Any]:
    """Write this rank's pieces to `ckpt/state/rank_<r>.safetensors` now; returns its index entries (for
    `write_index`). `write_buffers`: this rank is the one holder that writes the buffers of its layers."""
    snap = snapshot_rank_state(rank, model, optimizer, dp_rank, write_buffers, copy=False)
    write_rank_file(ckpt, snap)
    return snap.entries


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
_CHUNK = 16 << 20  # bytes per write (and per hash update)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """A safetensors file of `tensors` (any device, views of shared storage allowed), fsynced; returns its
    manifest entry {size, sha256}.

    The format's header (8-byte little-endian length, JSON with each tensor's dtype, shape and byte range,
    space-padded to 8 bytes) and then the raw bytes, tensor after tensor; `safetensors.safe_open` reads it.
    Written here rather than by `safetensors.torch.save_file` because that one copies every tensor first
    (and refuses views of one storage), and the sha256 is computed from memory on a second thread while the
    bytes go to the file, so hashing costs no read-back and little time."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{key}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    hasher = _Sha256Thread()
    try:
        with open(path, "wb") as f:
            for chunk in (len(head).to_bytes(8, "little"), head):
                f.write(chunk)
                hasher.update(chunk)
            for t in tensors.values():
                data = t.detach().reshape(-1).contiguous().to("cpu").view(torch.uint8).numpy().data
                for a in range(0, len(data), _CHUNK):
                    f.write(data[a : a + _CHUNK])
                    hasher.update(data[a : a + _CHUNK])
            f.flush()
            os.fsync(f.fileno())
    finally:
        digest = hasher.hexdigest()  # also ends the thread when a write failed
    return {"size": 8 + len(head) + offset, "sha256": digest}


class _Sha256Thread:
    """sha256 of a byte stream, computed on a helper thread (hashlib releases the GIL) while the caller writes."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="ckpt-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk: Any) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._hash.hexdigest()


def write_index(ckpt: Path, everyone: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    """Merge every rank's entries into `state/index.json` (rank 0), after checking that the pieces of each
    tensor and kind tile it exactly once."""
    tensors: dict[str, Any] = {}
    pieces: dict[tuple[str, str], list] = defaultdict(list)
    buffers: dict[str, Any] = {}
    for entries in everyone:
        for name, info in entries["tensors"].items():
            tensors.setdefault(name, {"shape": info["shape"], "dtype": {}})["dtype"].update(info["dtype"])
        for name, kind, start, end, fname, key in entries["pieces"]:
            pieces[(name, kind)].append([start, end, fname, key])
        for name, fname, key in entries["buffers"]:
            buffers.setdefault(name, [fname, key])  # identical copies: the first holder's
    for (name, kind), ps in pieces.items():
        ps.sort()
        numel = int(torch.Size(tensors[name]["shape"]).numel())
        covered = 0
        for start, end, _, _ in ps:
            if start != covered:
                raise RuntimeError(f"layout-free state: {kind} of {name} has a gap or overlap at {covered}")
            covered = end
        if covered != numel:
            raise RuntimeError(f"layout-free state: {kind} of {name} covers {covered} of {numel} elements")
    index = {"format": FORMAT, **extra, "tensors": {
        name: {**info, "pieces": {kind: pieces[(name, kind)] for kind in KINDS if (name, kind) in pieces}}
        for name, info in sorted(tensors.items())}, "buffers": buffers}
    path = ckpt / STATE_DIR / INDEX_FILE
    path.write_text(json.dumps(index, indent=None, separators=(",", ":")) + "\n")
    return path


# ---- reading ---------------------------------------------------------------------------------------------
class StateReader:
    """Reads ranges of named tensors from a layout-free state, opening each rank file once, lazily."""

    def __init__(self, ckpt: Path) -> None:
        self.dir = ckpt / STATE_DIR
        index_file = self.dir / INDEX_FILE
        try:
            self.index = json.loads(index_file.read_text())
        except FileNotFoundError:
            raise ElasticStateError(f"{index_file}: missing (not a layout-free checkpoint)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ElasticStateError(f"{index_file}: not valid JSON ({e})") from None
        if self.index.get("format") != FORMAT:
            raise ElasticStateError(f"{index_file}: format {self.index.get('format')!r}, this trainer reads {FORMAT}")
        self._files: dict[str, Any] = {}

    def _file(self, fname: str) -> SliceFile:
        if fname not in self._files:
            self._files[fname] = SliceFile(self.dir / fname)
        return self._files[fname]

    def has(self, name: str, kind: str) -> bool:
        return kind in self.index["tensors"].get(name, {}).get("pieces", {})

    def info(self, name: str) -> dict[str, Any]:
        try:
            return self.index["tensors"][name]
        except KeyError:
            raise ElasticStateError(f"{self.dir / INDEX_FILE}: no tensor {name!r} (another model?)") from None

    def read(self, name: str, kind: str, start: int, end: int, out: torch.Tensor) -> None:
        """Copy range [start, end) of (name, kind) into the 1-D tensor `out`, slice by slice."""
        pieces = self.info(name)["pieces"].get(kind)
        if pieces is None:
            raise ElasticStateError(f"{self.dir / INDEX_FILE}: {name!r} has no {kind} pieces")
        filled = 0
        for p_start, p_end, fname, key in pieces:
            a, b = max(start, p_start), min(end, p_end)
            if a >= b:
                continue
            self._file(fname).read_into(key, a - p_start, b - p_start, out[a - start : b - start])
            filled += b - a
        if filled != end - start:
            raise ElasticStateError(f"{self.dir / INDEX_FILE}: {kind} of {name!r} lacks [{start}, {end})")

    def buffer(self, name: str) -> torch.Tensor | None:
        where = self.index["buffers"].get(name)
        if where is None:
            return None
        fname, key = where
        return self._file(fname).tensor(key)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class SliceFile:
    """Ranges of the 1-D tensors of a safetensors file, read with `pread` straight into the destination.

    Not `safetensors.safe_open`: it maps the whole file, and every page a rank touches then counts in its
    resident memory until the handle closes; here a rank's memory holds what it asked for and nothing else.
    The format is an 8-byte little-endian header length, a JSON header (dtype, shape, data_offsets per key)
    and the raw bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ElasticStateError(f"{path}: missing (a rank's file of the checkpoint)") from None
        size = os.fstat(self._fd).st_size
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            self._header = json.loads(os.pread(self._fd, n, 8))
            self._data = 8 + n
            ends = [v["data_offsets"][1] for k, v in self._header.items() if k != "__metadata__"]
            if self._data + max(ends, default=0) > size:
                raise ValueError(f"{size} bytes, the header promises {self._data + max(ends)} (truncated?)")
        except (struct.error, ValueError, KeyError, TypeError) as e:
            os.close(self._fd)
            self._fd = None
            raise ElasticStateError(f"{path}: unreadable ({' '.join(str(e).split())[:200]})") from None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def _entry(self, key: str) -> tuple[torch.dtype, int, int]:
        try:
            entry = self._header[key]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        except KeyError:
            raise ElasticStateError(f"{self.path}: no tensor {key!r} (the index names one the file lacks)") from None
        begin, end = entry["data_offsets"]
        return dtype, self._data + begin, (end - begin) // torch.tensor([], dtype=dtype).element_size()

    def read_into(self, key: str, a: int, b: int, out: torch.Tensor) -> None:
        """Elements [a, b) of tensor `key` (flattened) into the contiguous 1-D `out` (converted if its dtype
        differs, e.g. bf16 weights into fp32 masters)."""
        dtype, offset, numel = self._entry(key)
        if not 0 <= a <= b <= numel:
            raise ElasticStateError(f"{self.path}: {key} has {numel} elements, the index reads [{a}, {b})")
        item = torch.tensor([], dtype=dtype).element_size()
        target = out if out.dtype == dtype and out.is_contiguous() else torch.empty(b - a, dtype=dtype)
        raw = target.view(torch.uint8) if target.numel() else target
        got = os.preadv(self._fd, [memoryview(raw.numpy())], offset + a * item)
        if got != (b - a) * item:
            raise ElasticStateError(f"{self.path}: {key} ends early (truncated?)")
        if target is not out:
            out.copy_(target)

    def tensor(self, key: str) -> torch.Tensor:
        dtype, _, numel = self._entry(key)
        out = torch.empty(numel, dtype=dtype)
        self.read_into(key, 0, numel, out)
        return out.view(self._header[key]["shape"])


def check_shapes(reader: StateReader, model: nn.Module) -> None:
    """Every local tensor must exist in the state with the same single-process shape (else: another model)."""
    for name, g in geometry(model).items():
        if name not in reader.index["tensors"] and name not in reader.index["buffers"]:
            raise ElasticStateError(f"{reader.dir / INDEX_FILE}: no tensor {name!r}: the checkpoint holds another "
                                    "model")
        saved = reader.index["tensors"].get(name, {}).get("shape")
        if saved is not None and tuple(saved) != g.shape:
            raise ElasticStateError(f"{reader.dir / INDEX_FILE}: {name} has shape {tuple(saved)} in the "
                                    f"checkpoint, {g.shape} here")


@torch.no_grad()
def read_rank_state(ckpt: Path, model: nn.Module, optimizer: Any, step: int,
                    kinds: tuple[str, ...] = KINDS) -> StateReader:
    """Fill this rank's weights, fp32 masters, Adam moments and buffers from a layout-free state written by any
    layout. Reads only the slices this rank holds. `kinds` without the moments: the optimizer starts fresh (its
    masters then come from the weights). Returns the reader (its index holds the saved extras)."""
    reader = StateReader(ckpt)
    check_shapes(reader, model)
    zero = _is_zero(optimizer)
    moments = any(k in kinds for k in MOMENTS)
    if moments and zero:  # the moments the base optimizer creates lazily at its first step: create them to fill
        for i, fp32 in enumerate(optimizer.single_partition_of_fp32_groups):
            _ensure_moments(optimizer.optimizer.state, fp32, reader, optimizer.round_robin_bit16_groups[i], model, step)
    elif moments and getattr(optimizer, "state", None) is not None:
        for p in model.parameters():
            _ensure_moments(optimizer.state, p, reader, [p], model, step)
    for pc in rank_pieces(model, optimizer, for_writing=False):
        if pc.kind in MOMENTS and (pc.kind not in kinds or not reader.has(pc.name, pc.kind)):
            continue  # not asked for, or saved before the first optimizer step
        # a state written without ZeRO has no separate masters (its fp32 weights are the masters), and a fresh
        # optimizer takes its masters from the weights
        kind = pc.kind
        if kind == "master" and ("master" not in kinds or not reader.has(pc.name, "master")):
            kind = "param"
        reader.read(pc.name, kind, pc.start, pc.end, pc.tensor)
    for name, buf in persistent_buffers(model).items():
        saved = reader.buffer(name)
        if saved is None:
            raise ElasticStateError(f"{reader.dir / INDEX_FILE}: no buffer {name!r}")
        if saved.shape != buf.shape:
            raise ElasticStateError(f"{reader.dir / INDEX_FILE}: buffer {name} has shape {tuple(saved.shape)}, "
                                    f"{tuple(buf.shape)} here")
        buf.copy_(saved)
    return reader


def _ensure_moments(state: dict, key: torch.Tensor, reader: StateReader, params: list, model: nn.Module,
                    step: int) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    dtypes = {}
    for p in params:
        info = reader.index["tensors"].get(names.get(id(p), ""), {})
        for kind in MOMENTS:
            if kind in info.get("pieces", {}):
                dtypes[kind] = getattr(torch, info["dtype"][kind])
    if not dtypes:
        return
    s = state.setdefault(key, {})
    s["step"] = torch.tensor(float(step))
    for kind, dtype in dtypes.items():
        if kind not in s or s[kind].dtype != dtype or s[kind].shape != key.shape:
            s[kind] = torch.zeros(key.shape, dtype=dtype, device=key.device)


def read_full(ckpt: Path, kinds: tuple[str, ...] = ("param",)) -> dict[str, dict[str, torch.Tensor]]:
    """Whole tensors by kind and name, buffers as kind "buffer" (export, tests: one process reads everything)."""
    reader = StateReader(ckpt)
    out: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, info in reader.index["tensors"].items():
        shape = torch.Size(info["shape"])
        for kind in kinds:
            if kind in info["pieces"]:
                t = torch.empty(shape.numel(), dtype=getattr(torch, info["dtype"][kind]))
                reader.read(name, kind, 0, shape.numel(), t)
                out[kind][name] = t.view(shape)
    for name in reader.index["buffers"]:
        out["buffer"][name] = reader.buffer(name)
    return dict(out)
