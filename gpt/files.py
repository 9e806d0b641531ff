"""Writing files atomically, with the permissions the user's umask gives any other file.

Every file the package writes for others to read (checkpoints, exported folders, prepared data,
pointers) goes through `atomic_path` or `atomic_open`: the data lands in a temp file in the same
directory, is flushed to disk, gets the mode `open()` would have given it (0666 minus the umask:
usually 0644), and only then replaces the target with one rename. A crash or kill at any moment
leaves the old file or the whole new one, never a torn one. Temp files from `tempfile` are created
0600 (and safetensors writes 0600 itself), which is why the mode is set explicitly.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # elsewhere: set and restore at once (the only portable way to read it)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """The mode a new regular file gets from open(): 0666 minus the umask."""
    return 0o666 & ~umask()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, as on Windows)."""
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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path next to `path` for a writer that takes a file name (safetensors, torch.save); when
    the block ends without an error, the file is synced, given the default mode and renamed onto
    `path`. On an error (or Ctrl-C) the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        full = _out_of_space(e, path.parent)
        written = tmp.stat().st_size if full and tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if full:
            raise _disk_full(path, written) from None
        raise
    _fsync_dir(path.parent)


def _out_of_space(e: BaseException, directory: Path) -> bool:
    """Whether a write failed for want of space: ENOSPC/EDQUOT, or a writer that reports failed writes
    its own way (torch.save raises RuntimeError "unexpected pos ...") while the disk is (nearly) full."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError):
        try:
            return shutil.disk_usage(directory).free < 1 << 20
        except OSError:
            return False
    return False


def _disk_full(path: Path, written: int):
    from .errors import DiskFullError  # gpt.errors imports the kernels package; files.py stays light

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    kept = f"; the previous {path.name} is intact" if path.exists() else ""
    err = DiskFullError(f"no space left on the disk of {path.parent} while writing {path.name}: it had reached "
                        f"{_size(written)} when the disk filled ({_size(free)} free without it){kept}; make room "
                        f"for more than {_size(written)} there and run again")
    err.errno = errno.ENOSPC
    return err


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """`open(path, mode)` for writing, made atomic as `atomic_path` describes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole new file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
        yield f
        f.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)
