"""Spawn gloo ranks on 127.0.0.1 for tests, with a deadline; a hung collective fails the test.

``run_ranks(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in every rank of
a pool of worker processes (kept between tests of the same world size, so torch is
imported and the process group set up once) and returns the list of results by rank. If
any rank raises, the test fails with that rank's traceback; if the ranks do not all finish
within ``timeout`` seconds, the pool is killed and the test fails saying which ranks hung.
``fn`` must be a module-level function (it is sent by reference).
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import traceback

from ascend_compile.launch import free_port, init_gloo, run_command  # noqa: F401  (run_command: for the tests)

DEFAULT_TIMEOUT = float(os.environ.get("ASCEND_COMPILE_TEST_TIMEOUT", "300"))


def _context():
    """Ranks are forked from one server process that imported torch, ascend_compile and Inductor
    and probed the CPU once (``tests/rank_preload.py``), instead of each spawned rank doing it.

    Except where the environment sets what the C library reads only as a process starts (glibc's
    ``MALLOC_*`` and ``GLIBC_TUNABLES``, e.g. a test's mmap threshold): a forked rank would keep the
    server's settings, so those ranks are spawned."""
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["rank_preload"])
    return ctx


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # the ranks' parent is the forkserver: ask after pytest itself
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _worker(rank: int, world_size: int, port: int, tasks, results, parent: int, environ: dict) -> None:
    import torch.distributed as dist

    os.environ.clear()  # the environment pytest has now, as a spawned rank would see it (not the server's)
    os.environ.update(environ)
    try:
        init_gloo(rank, world_size, port)
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        try:
            task = tasks.get(timeout=5)
        except queue.Empty:
            if not _alive(parent):  # pytest was killed: no one will send a task or read a result
                break
            continue
        if task is None:
            break
        task_id, fn, args = task
        try:
            out = fn(rank, world_size, *args)
            results.put((rank, task_id, ("ok", out)))
        except BaseException as e:  # report, keep serving
            results.put((rank, task_id, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
    if dist.is_initialized():  # a test may have aborted the group (ascend_compile's abort_group)
        dist.destroy_process_group()


class RankPool:
    def __init__(self, world_size: int, allow_dead: bool = False):
        self.world_size = world_size
        self.allow_dead = allow_dead  # a rank that exits reports ("died", exit code) instead of failing the run
        ctx = _context()
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, world_size, port, self.tasks[r], self.results, os.getpid(), dict(os.environ)))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.next_id = 0
        ready = self._collect("ready", DEFAULT_TIMEOUT)
        errors = {r: v for r, v in ready.items() if v is not None}
        if errors:
            self.close()
            raise RuntimeError(f"ranks failed to start: {errors}")

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def _collect(self, task_id, timeout: float) -> dict:
        import time

        deadline = time.monotonic() + timeout
        got: dict = {}
        while len(got) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.world_size)) - set(got))
                self.close()
                errors = {r: v for r, v in got.items() if isinstance(v, tuple) and v[0] == "error"}
                detail = "".join(f"\n--- rank {r} ---\n{v[1]}" for r, v in errors.items())
                raise TimeoutError(
                    f"rank(s) {missing} did not finish within {timeout:.0f}s (hung collective?); "
                    f"the pool was killed.{detail}"
                )
            try:
                rank, tid, value = self.results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in got]
                if dead and self.allow_dead:
                    for r in dead:
                        got[r] = ("died", self.procs[r].exitcode)
                    continue
                if dead:
                    self.close()
                    raise RuntimeError(f"rank(s) {dead} died (exit codes {[self.procs[r].exitcode for r in dead]})")
                continue
            if tid == "error":
                got[rank] = value
            elif tid == task_id:
                got[rank] = value
        return got

    def run(self, fn, *args, timeout: float = DEFAULT_TIMEOUT) -> list:
        task_id = self.next_id
        self.next_id += 1
        for q in self.tasks:
            q.put((task_id, fn, args))
        got = self._collect(task_id, timeout)
        errors = {r: v[1] for r, v in sorted(got.items()) if v[0] == "error"}
        if errors and not self.allow_dead:
            raise AssertionError("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items()))
        if self.allow_dead:
            return [got[r] for r in range(self.world_size)]
        return [got[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for q in self.tasks:
            try:
                q.put_nowait(None)
            except Exception:
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_pools: dict = {}


def run_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT) -> list:
    pool = _pools.get(world_size)
    if pool is None or not pool.alive():
        pool = _pools[world_size] = RankPool(world_size)
    try:
        return pool.run(fn, *args, timeout=timeout)
    except (TimeoutError, RuntimeError):
        _pools.pop(world_size, None)
        raise


def run_fresh(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, allow_dead: bool = False) -> list:
    """Like run_ranks, in a pool of its own that is closed afterwards (for tests that break groups).

    ``allow_dead``: ranks may exit or raise; each rank's result is ``("ok", value)``,
    ``("error", traceback)`` or ``("died", exit code)`` instead of failing the run."""
    pool = RankPool(world_size, allow_dead=allow_dead)
    try:
        return pool.run(fn, *args, timeout=timeout)
    finally:
        pool.close()


@atexit.register
def _close_all() -> None:
    for pool in _pools.values():
        pool.close()


def _fork_rank(worker, args, rank: int, ranks: int, port: int, log: str) -> int:
    """Fork one rank of a job: the environment torchrun gives its workers (``--standalone``, one
    machine), output to ``log``; the child runs ``worker(args)`` and exits with its code (1 if it
    raised, the traceback in ``log``) without running this process's exit handlers."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                          GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(ranks),
                          ROLE_NAME="default", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          TORCHELASTIC_RESTART_COUNT="0", TORCHELASTIC_MAX_RESTARTS="0")
        code = worker(args) or 0
    except BaseException:  # noqa: BLE001 - the rank's failure is its exit code and its log
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


GRACE_ENV = "ASCEND_COMPILE_TEST_FAIL_GRACE"  # seconds a failed rank's peers get to fail with it (default 30)


def _wait_ranks(pids: dict, timeout: float) -> tuple:
    """Wait for a job's ranks (``{pid: rank}``): ``(exit code of the first rank that failed or 0,
    {rank: how it ended}, whether the deadline passed)``. Once one fails, the others get 30 s
    (``GRACE_ENV``) to fail with it (ranks that fail together do), then they are killed, as torchrun
    stops a job; past ``timeout`` every rank left is killed."""
    import signal
    import time

    grace = float(os.environ.get(GRACE_ENV, "30"))
    deadline, failed_at, first, ended = time.monotonic() + timeout, None, 0, {}
    left = dict(pids)
    while left:
        for pid in list(left):  # this job's ranks only: the driver may have other children
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rank = left.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                ended[rank] = f"exit {code}" if code >= 0 else f"killed by signal {-code}"
                if code != 0 and failed_at is None:
                    first, failed_at = code, time.monotonic()
        now = time.monotonic()
        if left and (now > deadline or (failed_at is not None and now > failed_at + grace)):
            why = "killed at the deadline" if now > deadline else "killed after a peer failed"
            for pid, rank in left.items():
                os.kill(pid, signal.SIGKILL)  # in the driver's process group: a hang-kill of the driver reaches them
                os.waitpid(pid, 0)
                ended[rank] = why
            return first, ended, failed_at is None
        time.sleep(0.2)
    return first, ended, False


def preload_vllm(*modules: str) -> None:
    """Import, once, what a driver's ranks import (vLLM's engine and CPU worker, the example's
    ``vllm_generate``, ``modules``) and probe the CPU for Inductor, in the driver the ranks are then
    forked from. Forking is safe only while the driver runs one thread: checked."""
    import importlib
    import sys
    import threading

    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)  # vllm_generate
    for name in ("vllm_generate", "vllm.entrypoints.llm", "vllm.v1.engine.llm_engine", "vllm.v1.worker.cpu_worker",
                 "vllm.v1.worker.cpu_model_runner", *modules):
        importlib.import_module(name)
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.pick_vec_isa()  # cached: every rank (vLLM compiles its sampler with Inductor) inherits it
    if threading.active_count() != 1:
        raise RuntimeError(f"a driver that forks ranks must run one thread; it runs {threading.enumerate()}")


def run_configs(worker, out_dir: str, configs: list, timeout: float, ranks: int = 2) -> dict:
    """Run a driver's ``worker`` on ``ranks`` CPU ranks once per config (``args.config``; each rank
    writes ``{config}_rank{rank}.json``, a failed or hung job is its error text). The ranks are
    forked from this process (which imported what they need once, ``configs_main``'s ``preload``)
    with the environment torchrun would give them, instead of each importing vLLM anew under
    torchrun: ~12 s of a 2-core machine per rank. The examples' engine jobs still run under torchrun.
    Returns ``{config: {rank: result} or {"error": ...}}``, also written to ``summary.json``."""
    import argparse
    import json

    os.makedirs(out_dir, exist_ok=True)
    summary = {}
    for config in configs:
        args = argparse.Namespace(dir=out_dir, config=config)
        logs = [os.path.join(out_dir, f"{config}_rank{rank}.log") for rank in range(ranks)]
        port = free_port()
        pids = {_fork_rank(worker, args, rank, ranks, port, logs[rank]): rank for rank in range(ranks)}
        code, ended, timed_out = _wait_ranks(pids, timeout)
        if code != 0 or timed_out:
            tails = ""
            for rank, log in enumerate(logs):
                with open(log, errors="replace") as f:
                    tails += f"\n--- rank {rank} ({ended[rank]}) ---\n" + f.read()[-3000:]
            head = f"timeout: ranks did not finish within {timeout:.0f} s: {ended}" if timed_out else f"exit {code}: "
            summary[config] = {"error": head + tails}
            continue
        summary[config] = {}
        for rank in range(ranks):
            with open(os.path.join(out_dir, f"{config}_rank{rank}.json")) as f:
                summary[config][rank] = json.load(f)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return summary


def configs_main(doc: str, default_configs: str, worker, preload, argv=None) -> int:
    """The command line of a driver such as ``tests/ascend_mla_standin.py``: ``--dir``, ``--configs``
    (comma-separated), ``--timeout``. It runs ``preload()`` (imports) once, then every config on
    forked ranks (``run_configs``), and prints the summary."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--configs", default=default_configs)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    preload()
    print(json.dumps(run_configs(worker, args.dir, args.configs.split(","), args.timeout)))
    return 0


def driver_summary(script: str, out_dir, timeout: float, *args: str) -> dict:
    """Run a driver (``configs_main``) in a session of its own (on a hang it is killed with
    every rank it started) and return its ``summary.json``, with ``"dumps"``: its dump directory."""
    import json
    import sys

    code, _, err = run_command([sys.executable, script, "--dir", str(out_dir), *args], timeout=timeout)
    assert code == 0, (err or "")[-4000:]
    with open(os.path.join(str(out_dir), "summary.json")) as f:
        result = json.load(f)
    result["dumps"] = os.path.join(str(out_dir), "dumps")
    return result
