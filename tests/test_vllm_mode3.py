"""vLLM 0.23's engine in compilation mode 3 (VLLM_COMPILE: the graph split at attention, each piece
compiled by vLLM's own backend and pass manager), on 2 DP ranks, with sharing turned on by
``additional_config`` alone: sliced layers run inside vLLM's pieces and our pass checks each piece;
whole layers are broadcast on a schedule our pass gives each piece; the tokens equal the unshared
mode-3 run's in both layouts. vLLM's CPU platform turns mode 3 into mode 2; the test
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
        assert sliced[rank]["paths"]["gather"] >= 1 and sliced[rank]["paths"]["slices"] >= 8, sliced[rank]["paths"]
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


def test_whole_layers_in_vllms_pieces_equal_the_unshared_run(summary):
    unshared, layers = summary["unshared"], summary["layers"]
    assert "error" not in layers, layers.get("error")
    for rank in ("0", "1"):
        assert layers[rank]["tokens"] == unshared[rank]["tokens"], rank
        plan = layers[rank]["plan"]
        assert plan["layout"] == "layers" and plan["saved_bytes"] == plan["series_bytes"] // 2 > 0
        saved = unshared[rank]["weight_bytes"] - layers[rank]["weight_bytes"]
        assert abs(saved - plan["saved_bytes"]) < 0.02 * plan["saved_bytes"]
    assert layers["0"]["forwards"] == layers["1"]["forwards"] == unshared["0"]["forwards"]


def test_our_pass_scheduled_the_broadcasts_of_every_piece(summary):
    import glob
    import json

    for rank in ("0", "1"):
        tables = {}
        for path in glob.glob(os.path.join(summary["dumps"], "layers", "ascend_compile", f"rank_{rank}",
                                           "graph_piece_*", "schedule.json")):
            with open(path) as f:
                tables[os.path.basename(os.path.dirname(path))] = json.load(f)
        # 4 decoder layers: the piece after attention i holds o_proj[i] and down_proj[i]; none before the first
        assert sorted(tables) == [f"graph_piece_{i}" for i in range(1, 5)], sorted(tables)
        for i in range(4):
            table = tables[f"graph_piece_{i + 1}"]
            assert [o.split()[0] for o in table["order"]] == [f"o_proj.weight[{i}]", f"down_proj.weight[{i}]"]
            o_proj, down_proj = sorted(table["collectives"], key=lambda r: r["issue"])
            assert (o_proj["series"], down_proj["series"]) == ("o_proj.weight", "down_proj.weight")
            assert o_proj["owner"] == down_proj["owner"] == i % 2
            # prefetch_step=1: both issued as the piece starts, down_proj's in flight while o_proj computes
            assert down_proj["issue"] < o_proj["wait"] < o_proj["first_use"] < down_proj["wait"]


def test_a_piece_compiled_without_our_pass_is_refused_on_every_rank(summary):
    error = summary["slices-nopass"].get("error", "")
    assert error.startswith("exit "), error[-2000:]  # not "timeout": no rank waited in a collective
    assert "ForeignBackendError" in error and "This graph is a piece of vLLM's compilation mode 3, compiled " \
        "without ascend_compile's pass" in error, error[-3000:]
