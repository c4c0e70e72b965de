"""The daemon's malloc tuning (castore.node.reuse_freed_memory): buffers of a few MiB, freed and
allocated again as every chunk is, reuse the same memory instead of fresh pages from the
kernel. Each case runs in a child interpreter: the setting is for the whole process."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

_FAULTS = r"""
import os, random, resource, sys, threading, time
from castore.node import reuse_freed_memory
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()

def churn():                      # chunk-sized buffers of mixed sizes, a few alive at a time
    rnd, alive = random.Random(1), []
    for _ in range(100):
        buf = bytearray(rnd.randrange(256 << 10, 4 << 20))
        buf[::4096] = b"x" * len(buf[::4096])
        alive.append(buf)
        if len(alive) > 3:
            alive.pop(rnd.randrange(len(alive)))

def in_a_thread():                # as the daemon's workers and pools do
    t = threading.Thread(target=churn)
    t.start()
    t.join()
    # join returns before the thread has exited and handed its malloc arena back for the
    # next thread to reuse; on a loaded machine the next one would get a fresh arena
    while os.path.exists(f"/proc/self/task/{t.native_id}"):
        time.sleep(0.001)

in_a_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_a_thread()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                         text=True, check=True, timeout=50)
    return int(out.stdout.strip())


def test_freed_chunk_buffers_are_reused_not_faulted_in_again() -> None:
    pages = 100 * (2 << 20) // 4096            # what the buffers of the second pass touch
    assert _faults("tuned") < pages // 100
    assert _faults("default") > pages // 10     # what the tuning saves
