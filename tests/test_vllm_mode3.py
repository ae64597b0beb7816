"""vLLM 0.23's engine in compilation mode 3 (VLLM_COMPILE: the graph split at attention, each piece
compiled by vLLM's own backend and pass manager), on 2 DP ranks, with sharing turned on by
``additional_config`` alone: sliced layers run inside vLLM's pieces, our pass checks each piece, and
the tokens equal the unshared mode-3 run's. vLLM's CPU platform turns mode 3 into mode 2; the test
harness in ``tests/vllm_mode3.py`` (never shipped) keeps it."""

import os
import subprocess
import sys

import pytest

import vllm  # noqa: F401  (run in .venv-vllm by scripts/test.sh: a missing vLLM fails)
from ranks import driver_summary  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    return driver_summary(os.path.join(HERE, "vllm_mode3.py"), tmp_path_factory.mktemp("mode3"), 1700,
                          "--timeout", "500")


def test_sliced_layers_in_vllms_pieces_equal_the_unshared_run(summary):
    unshared, sliced = summary["unshared"], summary["slices"]
    assert "error" not in unshared and "error" not in sliced, sliced.get("error", unshared.get("error"))
    for rank in ("0", "1"):
        assert sliced[rank]["tokens"] == unshared[rank]["tokens"], rank
        plan = sliced[rank]["plan"]
        assert plan["layout"] == "slices" and plan["saved_bytes"] == plan["series_bytes"] // 2 > 0
        assert unshared[rank]["weight_bytes"] - sliced[rank]["weight_bytes"] == plan["saved_bytes"]
        # the prompts' forward gathers, the decode steps compute on the slices, agreed across the DP ranks
        assert sliced[rank]["paths"]["prefill"] >= 1 and sliced[rank]["paths"]["decode"] >= 8, sliced[rank]["paths"]
    assert sliced["0"]["paths"] == sliced["1"]["paths"]


def test_our_pass_ran_in_every_piece_with_sliced_layers(summary):
    explain = subprocess.run([sys.executable, "-m", "ascend_compile.cli", "explain", "--all-graphs",
                              os.path.join(summary["dumps"], "slices", "ascend_compile")],
                             capture_output=True, text=True, timeout=120)
    assert explain.returncode == 0, explain.stderr
    out = explain.stdout
    for rank in ("0", "1"):  # 4 decoder layers: a piece between each two attention calls holds o_proj[i], down_proj[i]
        for i in range(4):
            piece = out.split(f"== rank_{rank}/graph_piece_{i + 1}/schedule.json")[1].split("==")[0]
            assert "layout=slices  paths=agreed  sliced layers=2" in piece
            assert piece.index(f"o_proj[{i}]") < piece.index(f"down_proj[{i}]")
    assert "graph_piece_0" not in out  # the piece before the first attention holds no sliced layer


def test_a_piece_compiled_without_our_pass_is_refused_on_every_rank(summary):
    error = summary["slices-nopass"].get("error", "")
    assert error.startswith("exit "), error[-2000:]  # not "timeout": no rank waited in a collective
    assert "ForeignBackendError" in error and "This graph is a piece of vLLM's compilation mode 3, compiled " \
        "without ascend_compile's pass" in error, error[-3000:]
