"""How the process's C heap gives memory back: set once by the `gqn-fast` program (gqn_fast.cli.main) and
by the bench's memory processes, so that the memory the bench reports is what a command's
process gets. Imports nothing heavy (the command line's --help stays fast)."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024


def limit_malloc_caching() -> None:
    """Make the resident set follow the live tensors (call first, before large allocations).

    glibc serves large blocks by mmap, but raises that threshold as large blocks are freed
    and keeps later ones in its heap for reuse, so RSS would stay at the largest earlier
    peak. A fixed threshold (128 KiB) unmaps every large block when it is freed. A no-op
    where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass
