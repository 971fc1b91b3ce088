"""The CPU training processes' malloc setting: a large block freed and allocated again is not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A 64 MB block (above glibc's largest mmap threshold, 32 MiB) malloc'd and written, freed, then malloc'd and
# written again (what torch's CPU allocator does with a step's activations): the page faults of the second
# round, in a fresh process with or without the setting.
PROBE = """
import ctypes, json, resource, sys
from nemo_rl.utils.host_allocator import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def round_trip():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def second_round_faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_blocks_are_reused_without_page_faults():
    default = second_round_faults("default")
    kept = second_round_faults("keep")
    assert kept["applied"] is True
    pages = (64 << 20) // 4096
    assert default["faults"] > pages // 2, "glibc's default maps a fresh 64 MB block: one fault per page"
    assert kept["faults"] < pages // 20, f"the freed block should be reused: {kept['faults']} faults"
