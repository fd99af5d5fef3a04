"""glibc told to keep freed memory (x2p_ros/allocator.py): large arrays come from the heap, which keeps them
for the next allocation, instead of fresh mappings that are faulted in again page by page."""
import ctypes
import ctypes.util
import platform
import subprocess
import sys

import pytest

from x2p_ros import cli

# Runs in a fresh interpreter, so that the test process keeps its allocator as it is. Prints the bytes glibc
# held in mmapped blocks while a 200 MB array lived, and the bytes still in its heap after it was freed.
PROBE = """
import ctypes, ctypes.util, sys
import numpy as np
from x2p_ros.allocator import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
array = np.ones(200 * 2 ** 20, dtype=np.uint8)
mapped = libc.mallinfo2().hblkhd
del array
print(kept, mapped, libc.mallinfo2().arena)
"""


def _glibc_with_mallinfo2() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")


def _probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    kept, mapped, arena = out.stdout.split()
    return kept, int(mapped), int(arena)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33 or later (mallinfo2)")
def test_large_arrays_come_from_the_heap_and_stay_there_once_told():
    MB = 2 ** 20
    kept, mapped, arena = _probe("default")
    assert mapped >= 200 * MB and arena < 200 * MB  # glibc's default: its own mapping, unmapped when freed
    kept, mapped, arena = _probe("keep")
    assert kept == "True"
    assert mapped < 200 * MB and arena >= 200 * MB  # from the heap, which keeps it after the free


def test_the_command_line_keeps_freed_memory_before_it_reads_its_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["--help"]) == 0  # argparse's exit code, returned
    assert calls == [True]
