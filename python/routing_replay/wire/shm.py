"""Shared-memory segments for the same-host fast path: files under /dev/shm, mapped with mmap.

Plain files and mmap rather than ``multiprocessing.shared_memory``: on Python 3.11 that class
registers every segment it opens with the resource tracker, which unlinks segments it does not
own at exit and warns about leaks. Here the sender creates a segment, the collector maps it and
unlinks the name at once (the mapping lives until the last view of it is freed), and the sender
unlinks names it still owns when the sample is taken, abandoned or resent.
"""

from __future__ import annotations

import itertools
import mmap
import os
import secrets
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_PREFIX = "routing-replay-"
_counter = itertools.count()


def free_bytes() -> int:
    """Free bytes in /dev/shm, or 0 where there is none."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def new_name(kind: str = "seg") -> str:
    return f"{_PREFIX}{kind}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"


def _path(name: str) -> Path:
    if "/" in name or not name.startswith(_PREFIX):
        raise ValueError(f"not a routing-replay shared-memory name: {name!r}")
    return SHM_DIR / name


def write_segment(name: str, *buffers: memoryview) -> None:
    """Creates segment ``name`` holding the buffers back to back."""
    size = sum(b.nbytes for b in buffers)
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(size, 1))
        with mmap.mmap(fd, max(size, 1)) as mapped:
            offset = 0
            for buffer in buffers:
                mapped[offset : offset + buffer.nbytes] = buffer.cast("B")
                offset += buffer.nbytes
    finally:
        os.close(fd)


def map_and_unlink(name: str, size: int) -> mmap.mmap:
    """Maps segment ``name`` (which must hold ``size`` bytes) and removes its name."""
    path = _path(name)
    fd = os.open(path, os.O_RDWR)
    try:
        actual = os.fstat(fd).st_size
        if actual < size:
            raise ValueError(f"segment {name} holds {actual} bytes, the header says {size}")
        return mmap.mmap(fd, max(size, 1))
    finally:
        os.close(fd)
        unlink(name)


def unlink(name: str) -> None:
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        pass


def read_probe(name: str) -> bytes | None:
    """The bytes of a probe segment, or None if it cannot be read here."""
    try:
        return _path(name).read_bytes()
    except (OSError, ValueError):
        return None
