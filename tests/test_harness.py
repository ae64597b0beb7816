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


DRIVER = '''
import json, os, sys, time
sys.path.insert(0, {tests!r})
from ranks import configs_main


def worker(args):
    rank = int(os.environ["RANK"])
    env = {{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}}
    if args.config == "fails" and rank == 1:
        raise ValueError("rank 1 refuses")
    if args.config == "fails" or (args.config == "hangs" and rank == 0):
        time.sleep(600)  # a peer that would wait forever
    with open(os.path.join(args.dir, f"{{args.config}}_rank{{rank}}.json"), "w") as f:
        json.dump(env, f)
    return 0


sys.exit(configs_main("a driver", "ok", worker, lambda: None))
'''


def test_driver_ranks_get_torchruns_environment_and_a_failed_or_hung_job_is_its_error(tmp_path):
    import json
    import sys

    from ranks import GRACE_ENV, run_command

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    code, out, err = run_command([sys.executable, str(script), "--dir", str(tmp_path), "--configs", "ok,fails,hangs",
                                  "--timeout", "8"], timeout=120, env={**os.environ, GRACE_ENV: "2"})
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ok"] == {str(r): {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                                      "MASTER_ADDR": "127.0.0.1"} for r in range(2)}
    # rank 1 raised; rank 0, waiting on it, was killed after the grace period (as torchrun stops a job)
    error = summary["fails"]["error"]
    assert error.startswith("exit 1: ") and "ValueError: rank 1 refuses" in error, error
    assert "--- rank 0 (killed after a peer failed) ---" in error and "--- rank 1 (exit 1) ---" in error, error
    # rank 1 finished, rank 0 never did: killed at the deadline
    error = summary["hangs"]["error"]
    assert error.startswith("timeout: ") and "0: 'killed at the deadline'" in error and "1: 'exit 0'" in error, error
