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


def torchrun_configs(script: str, out_dir: str, configs: list, timeout: float, ranks: int = 2) -> dict:
    """Run ``script`` under torchrun on ``ranks`` CPU ranks once per config (``--dir out_dir --config
    c``; each rank writes ``{config}_rank{rank}.json``, a failed or hung job is its error text).
    Returns ``{config: {rank: result} or {"error": ...}}``, also written to ``summary.json``."""
    import json
    import sys

    from ascend_compile.launch import run_torchrun

    os.makedirs(out_dir, exist_ok=True)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    summary = {}
    for config in configs:
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(ranks), os.path.abspath(script), "--dir", out_dir,
               "--config", config]
        try:
            code, _, err = run_torchrun(cmd, timeout=timeout)
        except TimeoutError as e:
            summary[config] = {"error": f"timeout: {str(e)[-2000:]}"}
            continue
        if code != 0:
            summary[config] = {"error": f"exit {code}: {(err or '')[-4000:]}"}
            continue
        summary[config] = {}
        for rank in range(ranks):
            with open(os.path.join(out_dir, f"{config}_rank{rank}.json")) as f:
                summary[config][rank] = json.load(f)
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    return summary


def configs_main(script: str, doc: str, default_configs: str, worker, argv=None) -> int:
    """The command line of a torchrun driver such as ``tests/ascend_mla_standin.py``: ``--dir``,
    ``--configs`` (comma-separated), ``--timeout``. Under torchrun (``RANK`` set) it runs
    ``worker(args)`` for ``--config``; otherwise it runs every config (``torchrun_configs``) and
    prints the summary."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--configs", default=default_configs)
    parser.add_argument("--config", help=argparse.SUPPRESS)  # set for the torchrun workers
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        return worker(args)
    print(json.dumps(torchrun_configs(script, args.dir, args.configs.split(","), args.timeout)))
    return 0


def driver_summary(script: str, out_dir, timeout: float, *args: str) -> dict:
    """Run a torchrun driver (``configs_main``) in a session of its own (on a hang it is killed with
    every rank it started) and return its ``summary.json``, with ``"dumps"``: its dump directory."""
    import json
    import sys

    code, _, err = run_command([sys.executable, script, "--dir", str(out_dir), *args], timeout=timeout)
    assert code == 0, (err or "")[-4000:]
    with open(os.path.join(str(out_dir), "summary.json")) as f:
        result = json.load(f)
    result["dumps"] = os.path.join(str(out_dir), "dumps")
    return result
