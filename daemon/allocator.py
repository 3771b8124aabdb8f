"""glibc malloc tuning for a process that runs for months: few arenas, so RSS stays flat.

glibc gives each thread that allocates its own arena (up to 8 per core). The daemon's file IO
runs in asyncio's default executor (up to cores + 4 threads) and every finished job passes
through several of them; freed memory stays in the arena that allocated it, so each thread's
arena keeps a little more after every job. Measured with `bench/memory.py --jobs 100000` on
2 cores: +20.3 MiB over 100,000 jobs with the default arenas, +9.2 MiB with two (the slope fell
from 17.7 to 2.9 MiB per 100,000). The price: threads that allocate at once (the prepare
pools decoding video) share two arena locks; a malloc is short beside a frame's decode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h


def limit_malloc_arenas(environ: os._Environ | dict[str, str] = os.environ) -> int | None:
    """Cap glibc's arenas at ARENAS unless the user chose MALLOC_ARENA_MAX; the cap set, or None.

    Call before the daemon starts threads: an arena that exists stays. Not glibc (musl, macOS):
    nothing to do, None.
    """
    if "MALLOC_ARENA_MAX" in environ:  # glibc read it at start; the user's choice wins
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    if mallopt(M_ARENA_MAX, ARENAS) != 1:
        log.debug("mallopt(M_ARENA_MAX, %d) refused; keeping the allocator's default", ARENAS)
        return None
    return ARENAS
