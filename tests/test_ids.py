"""NodeId.random: ids cut from a shared buffer of OS randomness stay unique, across threads and
across a fork (the child forgets the bytes the parent had left)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from castore.ids import NodeId


def test_random_ids_are_unique_across_threads() -> None:
    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: [NodeId.random().raw for _ in range(5000)], range(4)))
    ids = [i for b in batches for i in b]
    assert all(len(i) == 16 for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_the_parents_next_ids() -> None:
    NodeId.random()                     # the parent now holds unused random bytes
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                        # pragma: no cover - the child
        try:
            os.write(w, b"".join(NodeId.random().raw for _ in range(8)))
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.waitpid(pid, 0)
        child = os.read(r, 16 * 8)
    finally:
        os.close(r)
    parent = b"".join(NodeId.random().raw for _ in range(8))
    assert len(child) == 128
    assert {child[i:i + 16] for i in range(0, 128, 16)}.isdisjoint(
        {parent[i:i + 16] for i in range(0, 128, 16)})
