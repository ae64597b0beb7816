"""The test harness's ranks (``tests/ranks.py``): what a rank starts with."""

import os

from ranks import run_fresh


def _environ_case(rank, world):
    with open("/proc/self/environ", "rb") as f:  # the environment this process was started with
        started = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    return {"now": os.environ.get("ASCEND_COMPILE_TEST_MARK"),
            "at_start": started.get(b"MALLOC_MMAP_THRESHOLD_", b"").decode() or None}


def test_ranks_see_pytests_environment_and_start_with_what_the_c_library_reads_at_start(monkeypatch):
    monkeypatch.setenv("ASCEND_COMPILE_TEST_MARK", "1")
    # forked from the preloaded server: the environment pytest has now, though the server started without it
    assert [r["now"] for r in run_fresh(_environ_case, 2)] == ["1", "1"]
    # glibc reads MALLOC_* as a process starts: a forked rank would keep the server's settings
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    assert [r["at_start"] for r in run_fresh(_environ_case, 2)] == [str(1 << 20)] * 2
