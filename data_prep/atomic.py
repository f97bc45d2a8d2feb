"""Write-then-rename file helpers: a reader never sees a half-written file under its final name.

Durable as well as atomic: the data reaches the disk (fsync) before the rename, and the rename itself (the
directory entry) is fsynced after it, so a power loss or kernel crash leaves either the old file or the whole
new one under the final name, never an empty or truncated one (ext4/xfs may commit a rename before the data).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path.tmp`, fsync it, rename it over `path` (atomic on POSIX), fsync the directory."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable; a no-op where the filesystem refuses to fsync
    a directory (the rename is still atomic there)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
