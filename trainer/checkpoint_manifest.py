"""The manifest of a checkpoint: every file with its size and sha256, so a damaged file is found before it is loaded.

`manifest.json` in the checkpoint directory, independent of the checkpoint's layout (whatever files a save
writes, the manifest is the same kind of map):

    {"format": 1, "files": {"<path relative to the checkpoint, posix>": {"size": <bytes>, "sha256": "<hex>"}}}

It lists every file of the checkpoint except itself and `meta.json`, which is written after it and stays the
marker of a complete checkpoint. Writing: each rank hashes the files it wrote (they are still in its page cache),
rank 0 gathers the entries, hashes its own extra files and any file no rank claimed, and writes the manifest
(`trainer/checkpoint.py`, `Checkpointer.save`). Verifying (`verify`): rank 0 reads the manifest and compares the
sizes (a truncated file is found without reading it); then the files are hashed, file i on rank i % world,
and the ranks agree on the first damaged file. Cost: one extra read of the checkpoint at save (each rank its own
files) and at resume (split over all ranks); sha256 runs at about 1-2 GB/s per core.

A checkpoint written before manifests existed is accepted: its sizes cannot be checked, only that every torch
file is a readable zip archive (a truncated one is not; its end-of-archive record is gone).

`load_torch` reads a checkpoint's torch file; one that cannot be read is a `DamagedFile` (a UserError naming it).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_prep.atomic import file_sha256
from trainer.errors import UserError

MANIFEST_FILE = "manifest.json"
FORMAT = 1
Entry = dict[str, Any]  # {"size": int, "sha256": str}


class ManifestError(ValueError):
    """manifest.json itself is unreadable (cut or corrupt)."""


class DamagedFile(UserError):
    """A checkpoint file that cannot be read: one line naming it (trainer/checkpoint.py adds which checkpoint
    to use instead)."""

    def __init__(self, path: str | Path, problem: str, fix: str = "restore it, or use an earlier checkpoint") -> None:
        super().__init__(str(path), problem, fix)
        self.path = Path(path)


def load_torch(path: Path, **kwargs: Any) -> Any:
    """torch.load that names the file when its bytes cannot be read (truncated, corrupt): DamagedFile."""
    import torch

    try:
        return torch.load(path, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as e:  # RuntimeError (the zip reader), EOFError, UnpicklingError, ...
        raise DamagedFile(path, f"unreadable, the file is truncated or corrupt ({_short(e)})") from None


def relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def file_entry(path: Path) -> Entry:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def hash_files(root: Path, paths: Iterable[Path]) -> dict[str, Entry]:
    """{relative path: entry} of the given files under root (each hashed once)."""
    return {rel: file_entry(root / rel) for rel in sorted({relative(root, Path(p)) for p in paths})}


def list_files(root: Path, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file under root, relative and sorted, without the top-level names in `exclude`."""
    skip = set(exclude)
    return sorted(rel for p in root.rglob("*") if p.is_file() and (rel := relative(root, p)) not in skip)


def write_manifest(root: Path, entries: dict[str, Entry]) -> Path:
    """manifest.json under root (temp file, fsync, rename); the caller fsyncs the directory."""
    path = root / MANIFEST_FILE
    tmp = root / f".{MANIFEST_FILE}.tmp{os.getpid()}"
    text = json.dumps({"format": FORMAT, "files": dict(sorted(entries.items()))}, indent=1) + "\n"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(root: Path) -> dict[str, Entry] | None:
    """The manifest's files, or None for a checkpoint written without one. ManifestError if it is unreadable."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise ValueError("an entry is not {size, sha256}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{MANIFEST_FILE}: unreadable ({_short(e)})") from None
    return files


def size_problem(root: Path, rel: str, entry: Entry) -> str | None:
    path = root / rel
    if not path.is_file():
        return f"{rel}: missing"
    size = path.stat().st_size
    if size < entry["size"]:
        return f"{rel}: truncated ({size} of {entry['size']} bytes)"
    if size != entry["size"]:
        return f"{rel}: {size} bytes, the manifest says {entry['size']}"
    return None


def hash_problem(root: Path, rel: str, entry: Entry) -> str | None:
    problem = size_problem(root, rel, entry)
    if problem is None and file_sha256(root / rel) != entry["sha256"]:
        problem = f"{rel}: sha256 mismatch"
    return problem


def structure_problem(root: Path, rel: str) -> str | None:
    """Without a manifest: a torch file must at least be a whole zip archive (reads only its end)."""
    if not rel.endswith(".pt"):
        return None
    try:
        with zipfile.ZipFile(root / rel):
            return None
    except (OSError, zipfile.BadZipFile) as e:
        return f"{rel}: not a readable torch file, truncated or corrupt ({_short(e)})"


def plan(root: Path, exclude: Iterable[str], only: Iterable[str] | None = None
         ) -> tuple[str | None, list[tuple[str, Entry | None]]]:
    """(a problem found without reading any file, or None; the files to check: (name, entry or None)).
    `only`: just these names (of the manifest, or of the directory for a checkpoint without one)."""
    wanted = None if only is None else set(only)
    try:
        manifest = read_manifest(root)
    except ManifestError as e:
        return str(e), []
    if manifest is None:
        return None, [(rel, None) for rel in list_files(root, exclude) if wanted is None or rel in wanted]
    items = sorted((rel, e) for rel, e in manifest.items() if wanted is None or rel in wanted)
    for rel, entry in items:
        problem = size_problem(root, rel, entry)
        if problem is not None:
            return problem, []
    return None, items


def check(root: Path, items: list[tuple[str, Entry | None]]) -> str | None:
    """The first problem among these files (hash against the entry, or the zip check without one)."""
    for rel, entry in items:
        problem = structure_problem(root, rel) if entry is None else hash_problem(root, rel, entry)
        if problem is not None:
            return problem
    return None


def verify(root: Path, exclude: Iterable[str] = (), only: Iterable[str] | None = None) -> str | None:
    """The first damaged file of the checkpoint at root as 'name: problem', or None if it is intact.

    Collective when a process group is up (every rank calls it): rank 0 reads the manifest and compares the
    sizes; the files are hashed file i on rank i % world; every rank returns the same verdict. `only`: check
    just these files (relative names; then non-collective: export and sampling read a few files in one process).
    """
    import torch.distributed as dist

    exclude = (*exclude, MANIFEST_FILE)
    if only is not None:
        problem, items = plan(root, exclude, only)
        return problem or check(root, items)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        problem, items = plan(root, exclude)
        return problem or check(root, items)
    rank = dist.get_rank()
    shared: list[Any] = [plan(root, exclude) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    problem, items = shared[0]
    if problem is not None:
        return problem
    mine = check(root, items[rank::world])
    everyone: list[str | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    found = [p for p in everyone if p is not None]
    return min(found) if found else None  # the same line on every rank, whichever rank found it


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:160]
