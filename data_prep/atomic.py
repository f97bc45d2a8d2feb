"""Write-then-rename file helpers: a reader never sees a half-written file under its final name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path.tmp`, then rename over `path` (rename is atomic on POSIX filesystems)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def remove_tmp_files(directory: Path) -> None:
    """Delete leftovers of an interrupted run (files that never got their final name)."""
    for p in directory.glob("*" + TMP_SUFFIX):
        p.unlink(missing_ok=True)
