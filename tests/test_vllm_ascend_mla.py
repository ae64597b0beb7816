"""vLLM-Ascend 0.23's MLA attention op, as a CPU stand-in that follows its calls (``tests/ascend_mla_standin.py``),
through vLLM 0.23's engine on 2 DP ranks: ``q_b_proj`` and ``o_proj`` are called inside the op, a
different number of times on each rank (mixed batches, decode-only batches, an idle rank's dummy
forwards); both layouts give the unshared run's tokens, under compilation mode 2 with our backend and
under mode 3 (vLLM-Ascend's default) with the graph split at the op, as vLLM-Ascend splits it at
``vllm::mla_forward``."""

import os
import subprocess
import sys

import pytest

import vllm  # noqa: E402,F401  (run in .venv-vllm by scripts/test.sh: a missing vLLM fails)
from ranks import driver_summary  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    return driver_summary(os.path.join(HERE, "ascend_mla_standin.py"), tmp_path_factory.mktemp("mla"), 1500,
                          "--configs", "unshared,layers,slices,layers-nofetch,kv_b_proj,unshared-mode3,layers-mode3,slices-mode3",
                          "--timeout", "400")


@pytest.mark.parametrize("config", ["layers", "slices", "layers-mode3", "slices-mode3"])
def test_layers_called_inside_the_attention_op_equal_the_unshared_run(summary, config):
    layout, _, mode = config.partition("-")
    unshared, shared = summary["unshared" + (f"-{mode}" if mode else "")], summary[config]
    if mode:  # vLLM split the graph at the attention op: a piece of its own
        for rank in ("0", "1"):
            with open(os.path.join(summary["dumps"], config, f"rank_{rank}_dp_{rank}",
                                   "__compiled_fn_1.after_split.0.py")) as f:
                split = f.read()
            pieces = split.split("class submod_")[1:]
            ops = [i for i, piece in enumerate(pieces) if "= torch.ops.vllm.ascend_compile_standin_mla_forward(" in piece]
            assert len(pieces) == 9 and ops == [1, 3, 5, 7], (len(pieces), ops)  # 4 ops, each a piece of its own
    explain = subprocess.run([sys.executable, "-m", "ascend_compile.cli", "explain",
                              os.path.join(summary["dumps"], config, "ascend_compile")],
                             capture_output=True, text=True, timeout=120)
    assert explain.returncode == 0, explain.stderr
    for rank in ("0", "1"):  # every rank's attention ops, their layers, and where they are fetched
        assert f"== rank_{rank}/attention_ops.json: 4 op(s) read shared layers inside" in explain.stdout
    assert ("model.layers.2.self_attn: reads q_b_proj.weight[2], o_proj.weight[2]; fetched at the start of "
            "model.layers.1.self_attn, 1 op(s) ahead") in explain.stdout
    assert "error" not in unshared and "error" not in shared, shared.get("error", unshared.get("error"))
    for rank in ("0", "1"):
        assert shared[rank]["tokens"] == unshared[rank]["tokens"], rank
        plan = shared[rank]["plan"]
        assert plan["layout"] == layout and plan["saved_bytes"] == plan["series_bytes"] // 2 > 0
        assert shared[rank]["weight_bytes"] < unshared[rank]["weight_bytes"]
        # what makes the case: mixed batches (q_b_proj called twice in one op) on both ranks ...
        assert shared[rank]["q_proj_calls"]["2"] > 0
        assert shared[rank]["q_proj_calls"] == unshared[rank]["q_proj_calls"]
    # ... a different number of calls on each rank, and an idle rank's dummy forwards (no call at all)
    # while its peer computes
    assert shared["0"]["q_proj_calls"] != shared["1"]["q_proj_calls"]
    assert shared["0"]["dummy_forwards"] > 0 and shared["1"]["dummy_forwards"] == 0
    if layout == "slices":  # the layers read inside the op are gathered there: no forward took a path
        assert shared["0"]["paths"] == {"slices": 0, "gather": 0}


def test_without_the_fetch_at_the_ops_start_every_rank_refuses_instead_of_hanging(summary):
    error = summary["layers-nofetch"].get("error", "")
    assert error.startswith("exit "), error[-2000:]  # not "timeout": no rank waited in a collective
    assert "OpaqueReadError" in error and "cannot see, outside ascend_compile.fetch_layers" in error, error[-3000:]


def test_kv_b_proj_read_at_load_is_refused_on_every_rank(summary):
    error = summary["kv_b_proj"].get("error", "")
    assert error.startswith("exit "), error[-2000:]
    assert "is read at load by StandinMLAImpl" in error and "as kv_b_proj" in error, error[-3000:]
    assert "Remove 'kv_b_proj' from additional_config['ascend_compile']['shared_weight']['layers']" in error
