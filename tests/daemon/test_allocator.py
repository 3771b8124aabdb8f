"""The daemon caps glibc's malloc arenas (daemon/allocator.py): threads that allocate share two."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or ctypes.util.find_library("c") is None, reason="glibc only"
)

REPO = Path(__file__).resolve().parents[2]

# Eight live threads allocate at once, then glibc's malloc_info lists one <heap> per arena.
COUNT_ARENAS = """
import ctypes, ctypes.util, sys, tempfile, threading
from daemon.allocator import limit_malloc_arenas
if sys.argv[1] == "capped":
    print("cap", limit_malloc_arenas({}))
barrier = threading.Barrier(8)
def allocate():
    barrier.wait()
    kept = [bytes(20000) for _ in range(50)]  # > obmalloc's 512 B: real malloc calls
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads: thread.start()
for thread in threads: thread.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as report:
    handle = libc.fopen(report.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(handle))
    libc.fclose(ctypes.c_void_p(handle))
    print("heaps", open(report.name).read().count("<heap nr="))
"""


def arenas(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", COUNT_ARENAS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": ""},
        cwd=REPO,
    ).stdout.split("\n")
    heaps = next(int(line.split()[1]) for line in out if line.startswith("heaps"))
    cap = next((line.split()[1] for line in out if line.startswith("cap")), "-")
    return cap, heaps


def test_threads_share_two_arenas_once_capped():
    cap, heaps = arenas("capped")
    assert cap == "2"
    assert heaps <= 2, f"expected at most 2 malloc arenas after limit_malloc_arenas, malloc_info lists {heaps}"


def test_without_the_cap_each_thread_gets_an_arena():  # the check above can fail
    _, heaps = arenas("default")
    assert heaps > 2, f"expected glibc to give the 8 threads arenas of their own, malloc_info lists {heaps}"


def test_the_users_malloc_arena_max_wins():
    from daemon.allocator import limit_malloc_arenas

    assert limit_malloc_arenas({"MALLOC_ARENA_MAX": "8"}) is None
