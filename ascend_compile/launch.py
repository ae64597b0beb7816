"""Run a function on N local CPU ranks over gloo (for the demo, benchmarks and ``explain``).

Real deployments start ranks with torchrun or vLLM; this is the small, self-contained
launcher the CLI uses on one machine. A rank that raises or hangs fails the whole run
with its traceback: nothing waits forever.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 60) -> None:
    """One thread per rank (the ranks share the machine's cores) and a gloo group on loopback."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, int(os.environ.get("ASCEND_COMPILE_THREADS", "1"))))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _entry(fn, rank, world_size, port, args, results) -> None:
    try:
        init_gloo(rank, world_size, port)
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
    except BaseException as e:
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 900) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, run in ``world_size`` fresh processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(f"rank(s) {missing} did not finish within {timeout:.0f}s")
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode and r not in got]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                continue
            got[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    errors = {r: v for r, (s, v) in sorted(got.items()) if s == "error"}
    if errors:
        raise RuntimeError("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items()))
    return [got[r][1] for r in range(world_size)]


def run_command(cmd: list, timeout: float = 300, capture: bool | str = True, **kwargs) -> tuple:
    """``(returncode, stdout, stderr)`` of a command that starts ranks of its own (the demo,
    torchrun). It runs in a session of its own, so on a hang every rank it started is killed
    with it and a ``TimeoutError`` says so. ``capture=False`` lets the output through
    (stdout and stderr are then None); ``capture="tee"`` lets it through and keeps stderr too."""
    tee = capture == "tee"
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, stdout=None if tee else pipe, stderr=pipe, text=True, start_new_session=True,
                            **kwargs)
    kept: list = []
    if tee:  # echo stderr as it comes, keep a copy
        def echo():
            for line in proc.stderr:
                sys.stderr.write(line)
                kept.append(line)

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
    try:
        if tee:
            proc.wait(timeout=timeout)
            reader.join(timeout=30)
            return proc.returncode, None, "".join(kept)
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = (None, "".join(kept)) if tee else proc.communicate()
        raise TimeoutError(f"{cmd[:4]}... did not finish within {timeout:.0f}s (hung collective?); "
                           f"killed it and its ranks\n{stdout or ''}{stderr or ''}") from None
    return proc.returncode, stdout, stderr


# What a rank prints when it aborts while the interpreter finalizes, its work done: torch's gloo
# worker threads can still be releasing the last collective's tensors (about 1 run in 12 here).
FINALIZE_ABORT = "terminate called without an active exception"


def run_torchrun(cmd: list, timeout: float = 300, capture: bool = True, **kwargs) -> tuple:
    """:func:`run_command` for a torchrun job, run once more if a rank aborted at interpreter
    finalization (:data:`FINALIZE_ABORT`): any other failure, and a second such abort, is returned
    as it is. ``capture=False`` lets the output through."""
    for attempt in (1, 2):
        code, stdout, stderr = run_command(cmd, timeout=timeout, capture=capture or "tee", **kwargs)
        if code == 0 or FINALIZE_ABORT not in (stderr or "") or attempt == 2:
            return code, stdout, (stderr if capture else None)
        sys.stderr.write(f"a rank aborted at interpreter finalization ({FINALIZE_ABORT!r}); running the job again\n")
