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
