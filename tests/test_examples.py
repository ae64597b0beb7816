"""The examples run as users run them: under torchrun, on 2 CPU ranks (gloo)."""

import os
import sys

import pytest

from ranks import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("step", ["auto"])  # k=1 runs in the demo and most compiled tests
def test_torchrun_example_matches_the_unsharded_model(tmp_path, step):
    # --standalone: torchrun picks a free port for its own rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "examples", "torchrun_shared_weights.py"), "--layers", "4",
           "--prefetch-step", step, "--dump-dir", str(tmp_path / "dumps")]
    returncode, stdout, stderr = run_command(cmd, cwd=tmp_path)
    assert returncode == 0, stdout + stderr
    for rank in range(2):
        assert f"rank {rank}: saved 72.0 KiB of 144.0 KiB shared; output bitwise equal to the unsharded model" in stdout
        assert (tmp_path / "dumps" / f"rank_{rank}" / "schedule.json").exists()


FLAKY_JOB = """import os, sys
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    sys.stderr.write({message!r} + "\\n")
    sys.exit(1)
print("done")
"""


@pytest.mark.parametrize("message, runs, code", [
    ("terminate called without an active exception", 2, 0),  # the finalization abort: run again, once
    ("RuntimeError: a real failure", 1, 1),  # anything else is returned as it is
])
def test_run_torchrun_runs_again_only_after_a_finalization_abort(tmp_path, capfd, message, runs, code):
    from ascend_compile.launch import FINALIZE_ABORT, run_torchrun

    script = tmp_path / "job.py"
    script.write_text(FLAKY_JOB.format(message=message))
    marker = tmp_path / "ran"
    for capture in (True, False):
        if marker.exists():
            marker.unlink()
        got, out, err = run_torchrun([sys.executable, str(script), str(marker)], timeout=60, capture=capture)
        assert got == code
        seen = capfd.readouterr()
        assert ("running the job again" in seen.err) == (runs == 2) == (FINALIZE_ABORT in message)
        if capture:  # the last run's output
            assert (out == "done\n") == (code == 0) and (message in err) == (code != 0)
        else:  # let through, as the vLLM example's driver runs its jobs
            assert out is None and err is None
            assert message in seen.err and ("done" in seen.out) == (code == 0)


def test_run_torchrun_gives_up_after_a_second_finalization_abort(tmp_path):
    from ascend_compile.launch import FINALIZE_ABORT, run_torchrun

    script = tmp_path / "job.py"
    script.write_text(f"import sys\nsys.stderr.write({FINALIZE_ABORT!r})\nsys.exit(1)\n")
    got, _, err = run_torchrun([sys.executable, str(script)], timeout=60)
    assert got == 1 and FINALIZE_ABORT in err
