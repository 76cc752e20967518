"""Which bytes of a file are in the page cache (Linux mincore), to measure what a
reader actually read. Readahead would blur the measurement, so `no_readahead` marks
the process's existing mappings of the file MADV_RANDOM (fault in single pages)."""

from __future__ import annotations

import ctypes
import os

PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_RANDOM = 1


def drop_from_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages (a file just written) cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def no_readahead(path: str) -> int:
    """MADV_RANDOM on every mapping of `path` in this process; returns how many."""
    count = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                assert _libc.madvise(start, end - start, MADV_RANDOM) == 0
                count += 1
    return count


def resident_ranges(path: str) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of the file that are in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    os.close(fd)
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        assert _libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
    finally:
        _libc.munmap(addr, size)
    ranges: list[tuple[int, int]] = []
    for i, flag in enumerate(vec):
        if flag & 1:
            if ranges and ranges[-1][1] == i * PAGE:
                ranges[-1] = (ranges[-1][0], (i + 1) * PAGE)
            else:
                ranges.append((i * PAGE, (i + 1) * PAGE))
    return ranges
