"""Shared memory for the same-host fast path: one arena file under /dev/shm per sender.

The sender maps its arena once and carves regions out of it; the collector maps each arena once
(by name) and hands out views of regions. Reusing mapped pages is what makes the path fast: a
fresh segment per message costs a file, zeroed pages and page faults on both sides. A region
returns to the arena only when the collector reports the consumer's last view of it freed
(``released``), so the sender never overwrites memory a trainer still reads.

Plain files and mmap rather than ``multiprocessing.shared_memory``: on Python 3.11 that class
registers every segment it opens with the resource tracker, which unlinks segments it does not
own at exit and warns about leaks.
"""

from __future__ import annotations

import bisect
import itertools
import mmap
import os
import secrets
import stat
from collections import OrderedDict
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_PREFIX = "routing-replay-"
_PAGE = mmap.PAGESIZE
_counter = itertools.count()


def free_bytes() -> int:
    """Free bytes in /dev/shm, or 0 where there is none."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def new_name(kind: str) -> str:
    return f"{_PREFIX}{kind}-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"


def _path(name: str) -> Path:
    if "/" in name or not name.startswith(_PREFIX):
        raise ValueError(f"not a routing-replay shared-memory name: {name!r}")
    return SHM_DIR / name


def _create(name: str, size: int) -> mmap.mmap:
    fd = os.open(_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    try:
        os.unlink(_path(name))
    except (FileNotFoundError, ValueError):
        pass


def write_probe(name: str, data: bytes) -> None:
    """A small segment the collector reads to prove it sees this host's /dev/shm."""
    _path(name).write_bytes(data)


PROBE_BYTES = 8


def read_probe(name: str) -> bytes | None:
    """The first bytes of a probe segment (a name off the wire may point at any file of ours, even
    an arena of gigabytes: never more than a probe's size is read), or None if it cannot be read here."""
    try:
        fd = _open_regular(name, os.O_RDONLY)
    except (OSError, ValueError):
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(PROBE_BYTES + 1)


def _open_regular(name: str, flags: int) -> int:
    """Opens a regular file of ours without blocking (a FIFO under that name must not stall a
    receive loop); OSError for anything else."""
    fd = os.open(_path(name), flags | os.O_NONBLOCK | os.O_NOFOLLOW)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{name} is not a regular file")
    return fd


class Arena:
    """Sender side: a sparse /dev/shm file of ``size`` bytes, mapped once, split into regions.

    First fit over a free list of page-aligned extents, coalescing on free. Pages are only
    allocated by the kernel when first written, so a large arena costs what is in flight.
    """

    def __init__(self, size: int) -> None:
        self.size = size - size % _PAGE
        self.name = new_name("arena")
        self._map = _create(self.name, self.size)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # sorted (offset, length)
        self._used: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a region of at least ``nbytes``, or None when the arena has no room."""
        length = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
        for i, (offset, free) in enumerate(self._free):
            if free >= length:
                if free == length:
                    del self._free[i]
                else:
                    self._free[i] = (offset + length, free - length)
                self._used[offset] = length
                return offset
        return None

    def write(self, offset: int, *buffers: memoryview) -> None:
        for buffer in buffers:
            self._map[offset : offset + buffer.nbytes] = buffer.cast("B")
            offset += buffer.nbytes

    def free(self, offset: int) -> None:
        length = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, length))
        self._free.insert(i, (offset, length))
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:  # merge with the next
            self._free[i] = (offset, length + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # merge with the previous
            prev_offset, prev_length = self._free.pop(i - 1)
            self._free[i - 1] = (prev_offset, prev_length + self._free[i - 1][1])

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def close(self) -> None:
        """Unlinks the name; collectors' existing mappings stay valid until they are dropped."""
        unlink(self.name)
        self._map.close()


class ArenaViews:
    """Collector side: maps each sender's arena once and returns views of its regions."""

    def __init__(self, max_arenas: int = 64) -> None:
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._max = max_arenas

    def view(self, name: str, offset: int, nbytes: int) -> memoryview:
        mapped = self._maps.get(name)
        if mapped is None:
            fd = _open_regular(name, os.O_RDWR)
            try:
                mapped = mmap.mmap(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            self._maps[name] = mapped
            while len(self._maps) > self._max:
                self._maps.popitem(last=False)  # live views keep their mapping alive
        self._maps.move_to_end(name)
        if offset < 0 or offset + nbytes > len(mapped):
            raise ValueError(f"region [{offset}, {offset + nbytes}) outside arena {name} of {len(mapped)} bytes")
        return memoryview(mapped)[offset : offset + nbytes]
