"""Crash-safe writes: build everything in a staging directory next to the target, then ``os.replace``.

An interrupted run leaves either the old state or the new one, never a mix. Staging directories
are siblings of the target (same filesystem, so the rename is atomic) and are named
``.<target>.staging-<random>`` so that leftovers are easy to recognise and clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

STAGING_MARK = ".staging-"


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; on success move it to ``target`` atomically.

    On any exception the staging directory is removed and ``target`` is untouched.
    If ``target`` exists and ``overwrite`` is true, the old directory is swapped out only after the
    new one is complete: atomically on Linux (``exchange_paths``), else renamed aside, then deleted.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists")
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like a normal directory
    try:
        yield stage
        _fsync_tree(stage)
        if target.exists():
            if exchange_paths(stage, target):
                shutil.rmtree(stage, ignore_errors=True)  # the staging path now holds the old directory
            else:
                # no atomic swap here: for a moment neither exists (the old one waits in the .old- dir)
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, aside / "old")
                os.replace(stage, target)
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(stage, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``). False where unsupported.

    With it, replacing a directory never passes through a moment where the target is missing: a kill
    leaves the old directory or the new one at the target path.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no libc symbol (musl, old glibc)
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    # any failure (EINVAL on filesystems without exchange, ENOSYS on old kernels) falls back to the caller's path
    return fn(_AT_FDCWD, os.fsencode(os.fspath(a)), _AT_FDCWD, os.fsencode(os.fspath(b)), _RENAME_EXCHANGE) == 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dump_json(obj: Any) -> str:
    """Canonical, human-readable JSON used for every format file we write."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dump_json(obj))


def leftover_staging(parent: str | os.PathLike) -> list[Path]:
    """Staging or temp leftovers in ``parent`` (used by tests and ``registry gc``)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return [p for p in parent.iterdir() if p.name.startswith(".") and (STAGING_MARK in p.name or ".tmp-" in p.name or ".old-" in p.name)]


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
