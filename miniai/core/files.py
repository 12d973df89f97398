"""Writing files so that a crash never leaves half of one: `atomic_path` (every file miniai writes goes through it),
and `locked`, so that processes started together (torchrun) build a shared file once (the `filelock` package)."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ['atomic_path', 'write_atomic', 'locked']


def _fsync(path: Path) -> None:
    "Flush `path` (a file, or a folder with everything in it) to the disk."
    for p in [path, *path.rglob('*')] if path.is_dir() else [path]:
        if p.is_dir(): _fsync_dir(p)
        else:
            with open(p, 'rb') as f: os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try: fd = os.open(path, os.O_RDONLY)
    except OSError: return  # a folder cannot be opened for syncing on every system (Windows)
    try: os.fsync(fd)
    except OSError: pass
    finally: os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the body to write (a file, or a folder with files); when the body
    ends without an error, what it wrote is synced to the disk and renamed to `path` in one step, so `path` is always
    either the old file or the complete new one (a folder is not put in place of one that has files: that is an
    `OSError`). On an error the temporary path is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
    tmp.mkdir()  # a folder of its own, so what is written keeps its final name (and the usual permissions)
    target = tmp / path.name
    try:
        yield target
        _fsync(target)
        os.replace(target, path)
        _fsync_dir(path.parent)
    finally: shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    "Write `data` (text as UTF-8) to the file `path` through `atomic_path`; returns the path."
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    "Hold an exclusive lock on the file `path` (made if needed) for the body, across processes and threads."
    from filelock import FileLock
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)): yield
