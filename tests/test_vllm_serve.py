"""``vllm serve`` with data parallelism: vLLM's OpenAI server with 2 DP engine cores of a MoE model,
unshared and with shared weights (``layout="layers"`` and ``"slices"``), driven over HTTP by
``examples/vllm_serve.py``; and the test harness's stand-ins for the collectives vLLM's CPU
communicator lacks (``tests/serve_hook``)."""

import json
import os
import re
import sys

import pytest
import torch

from ranks import free_port, run_command, run_ranks

# vLLM is not an extra of ours (its wheels pin torch): scripts/install.sh builds .venv-vllm, where
# scripts/test.sh runs these files; there a missing vLLM fails, never skips
import vllm  # noqa: E402,F401

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK = os.path.join(HERE, "serve_hook")


def _stand_ins_case(rank, world):
    """The harness's all_gatherv / reduce_scatterv on gloo ranks holding different numbers of rows,
    against what they must equal (every rank's rows in rank order; this rank's rows of the sum), and
    the inputs they must refuse."""
    from types import SimpleNamespace

    sys.path.insert(0, HOOK)
    import cpu_vcollectives as cv

    comm = SimpleNamespace(world_size=world, rank_in_group=rank, device_group=None)
    sizes = [3, 1]  # rank 0 has 3 rows, rank 1 one (an idle DP rank's dummy forward has 1 token)
    rows = [torch.arange(n * 4, dtype=torch.bfloat16).reshape(n, 4) + 100 * r for r, n in enumerate(sizes)]
    gathered = cv._gatherv_one(comm, rows[rank], sizes)
    full = torch.arange(sum(sizes) * 4, dtype=torch.float32).reshape(-1, 4) * (rank + 1)
    before = full.clone()
    scattered = cv._reduce_scatterv_dim0(comm, full, sizes)
    start = sum(sizes[:rank])
    refused = {}
    for name, call in {"wrong size": lambda: cv._gatherv_one(comm, rows[rank], [2, 2]),
                       "dim 1": lambda: cv.all_gatherv(comm, rows[rank], dim=1, sizes=sizes)}.items():
        try:
            call()
            refused[name] = None
        except (AssertionError, NotImplementedError) as e:
            refused[name] = f"{type(e).__name__}: {e}"
    return {"gathered": torch.equal(gathered, torch.cat(rows)), "gathered_dtype": gathered.dtype,
            "scattered": torch.equal(scattered, (before * 3 / (rank + 1))[start:start + sizes[rank]]),
            "input_unchanged": torch.equal(full, before), "refused": refused}


def test_the_harness_collectives_equal_their_reference_and_refuse_what_they_do_not_do():
    for r in run_ranks(_stand_ins_case, 2):
        assert r["gathered"] and r["gathered_dtype"] == torch.bfloat16
        assert r["scattered"] and r["input_unchanged"]
        assert r["refused"]["wrong size"] is not None and r["refused"]["wrong size"].startswith("AssertionError")
        assert r["refused"]["dim 1"] == "NotImplementedError: the test stand-in all_gatherv gathers along dim 0 only"


@pytest.mark.timeout(900)  # three servers of up to 250 s each; the example stops them
def test_vllm_serve_with_dp2_moe_and_shared_weights_answers_like_the_unshared_server(tmp_path):
    """Three OpenAI servers (``python -m vllm.entrypoints.openai.api_server --data-parallel-size 2``,
    a MoE DeepSeek-V2, compilation mode 2 with our backend): unshared, ``o_proj`` shared as whole
    layers, and as slices. Over HTTP: single, streamed, one-at-a-time and concurrent greedy
    requests. The shared servers' tokens (and log-probabilities) equal the unshared server's where
    batching is the same (single, streamed, one at a time); concurrent requests complete with all
    their tokens (their rounding depends on how vLLM batched them, shared or not: reported by the
    example, not compared); each engine core holds half of ``o_proj``; the sliced server's cores
    took both paths; every server stops leaving no process behind."""
    example = os.path.join(HERE, "..", "examples", "vllm_serve.py")
    try:
        code, out, err = run_command([sys.executable, example, "--runs", "unshared,layers,slices", "--timed", "1",
                                      "--decode-tokens", "8", "--dir", str(tmp_path), "--port", str(free_port()),
                                      "--start-timeout", "250"], timeout=850)
    finally:  # on our deadline the example is killed before it stops its servers (sessions of their own)
        _example().stop_leftovers(str(tmp_path))
    assert code == 0, out[-4000:] + err[-4000:]
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    runs = {r["name"]: r for r in summary["runs"]}
    assert list(runs) == ["unshared", "layers", "slices"]
    for name, r in runs.items():
        assert r["clean_stop"], name
        assert not r["errors"], (name, r["errors"][:5])
        lengths = [n for _, n, _ in _example().CONCURRENT]
        assert len(r["single"]["ids"]) == 12 and [len(s["ids"]) for s in r["sequential"]] == lengths
        assert [len(c.get("ids", [])) for c in r["concurrent"]] == lengths, r["concurrent"]
    assert runs["unshared"]["held"] == []
    for name in ("layers", "slices"):
        held = runs[name]["held"]
        assert [rank for rank, _, _ in held] == [0, 1], held
        assert all(have == pytest.approx(of / 2, abs=0.01) for _, have, of in held), held
        c = summary["compare"][name]
        assert c["tokens_equal"], name
    assert summary["compare"]["layers"]["logprob_diff"] == 0.0  # whole weights: bitwise
    with open(tmp_path / "slices.log") as f:
        log = f.read()
    assert "rank 0 loads slice 0 of each" in log and "rank 1 loads slice 1 of each" in log
    # both paths ran in both engine cores: prompts of more than 8 tokens gathered, decode steps computed on the slices
    for path in ("slices", "gather"):
        for rank in (0, 1):
            assert re.search(rf"rank {rank} of group \S+: first sliced forward on the {path} path", log), (path, rank)


def _example():
    """``examples/vllm_serve.py`` as a module."""
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    import vllm_serve

    return vllm_serve


def test_agree_accepts_rounding_and_near_ties_only():
    """The concurrent requests' check: equal tokens with log-probabilities within ``tol``, and a
    first difference only where both sides' tokens are near-tied; anything else disagrees."""
    agree = _example().agree

    def gen(ids, lps, tops):
        return {"ids": ids, "lps": lps, "tops": tops}

    a = gen([5, 7, 9], [-0.5, -1.0, -0.2], [{5: -0.5}, {7: -1.0, 8: -1.05}, {9: -0.2}])
    assert agree(a, a, 0.1) == {"ok": True, "diverge_at": None, "max_logprob_diff": 0.0}
    rounded = gen([5, 7, 9], [-0.55, -1.0, -0.2], a["tops"])
    assert agree(a, rounded, 0.1)["ok"] and not agree(a, rounded, 0.01)["ok"]
    tie = gen([5, 8, 3], [-0.5, -1.02, -0.1], [{5: -0.5}, {8: -1.02, 7: -1.04}, {3: -0.1}])
    assert agree(a, tie, 0.1) == {"ok": True, "diverge_at": 1, "max_logprob_diff": 0.0}
    clear = gen([5, 8, 3], [-0.5, -0.1, -0.1], [{5: -0.5}, {8: -0.1, 7: -3.0}, {3: -0.1}])  # 7 far below 8
    assert agree(a, clear, 0.1)["ok"] is False
    missing = gen([5, 8, 3], [-0.5, -1.02, -0.1], [{5: -0.5}, {8: -1.02}, {3: -0.1}])  # 7 not in its top 5
    assert agree(a, missing, 0.1)["ok"] is False
    assert agree(a, gen([5, 7], [-0.5, -1.0], a["tops"][:2]), 0.1)["ok"] is False  # fewer tokens
