"""The prefetch cost model: simulated times, the choice of k, and its agreement across ranks."""

import json
import re
import os
import tempfile

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ascend_compile.passes.cost_model import CostInputs, choose_prefetch_step, simulate
from ranks import run_ranks


def inputs(t_comm, t_compute=1e-3, layers=8, budget=None, latency=0.0):
    return CostInputs(layers=layers, layer_bytes=int(t_comm * 1e9), buffer_bytes=100, bandwidth=1e9,
                      compute_s=t_compute, latency_s=latency, memory_budget=budget)


def test_simulation_matches_hand_computed_times():
    # k=0: every layer waits for its own transfer: N * (comm + compute)
    assert simulate(inputs(0.5e-3), 0) == pytest.approx(8 * 1.5e-3)
    # k=1, compute-bound: only the first transfer is exposed
    assert simulate(inputs(0.5e-3), 1) == pytest.approx(0.5e-3 + 8 * 1e-3)
    # comm-bound: the link is the bottleneck whatever k is
    assert simulate(inputs(2e-3), 1) == pytest.approx(8 * 2e-3 + 1e-3)
    assert simulate(inputs(2e-3), 3) == pytest.approx(simulate(inputs(2e-3), 1))


def test_choice_is_the_smallest_k_near_the_best():
    c = choose_prefetch_step(inputs(0.5e-3))
    assert c.k == 1 and "compute-bound" in c.explanation
    assert c.times[0] == pytest.approx(8 * 1.5e-3)
    # a negligible transfer: nothing to hide, fetch at use
    assert choose_prefetch_step(inputs(1e-9)).k == 0
    c = choose_prefetch_step(inputs(3e-3))
    assert c.k == 1 and "comm-bound" in c.explanation


def test_memory_budget_caps_k():
    c = choose_prefetch_step(inputs(0.5e-3, budget=150))  # one layer buffer costs 100 B
    assert c.k == 0 and "memory budget allows k <= 0" in c.explanation


def _auto_case(rank, world, overrides, wrap=True):

    torch._dynamo.reset()
    shape = StackShape(layers=4)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step="auto", wrap_around=wrap))
    ref = build_stack(shape)(make_input(shape))
    d = tempfile.mkdtemp()
    out = torch.compile(model, backend="ascend_compile",
                        options={"lowering": "aot_eager", "dump_dir": d, "cost_model": overrides})(make_input(shape))
    table = json.load(open(os.path.join(d, f"rank_{rank}", "schedule.json")))
    costs = ac.runtime.state.of_model(model).costs  # what the ranks measured and agreed
    return torch.equal(out, ref), table["prefetch_step"], table.get("explain", ""), costs


def _expected_step(costs, layers=4, tokens=16):
    """The step the cost model must pick for ``_auto_case``'s graph from the agreed measurements: its
    documented inputs (o_proj bytes per layer, the layer's matmul FLOPs at the agreed matmul rate, the
    agreed link, one window per series for the next forward) through ``choose_prefetch_step``."""
    shape = StackShape(layers=layers)
    layer = build_stack(shape).layers[0]
    flops = sum(2 * tokens * m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear))
    o_proj = layer.self_attn.o_proj.weight
    nbytes = o_proj.numel() * o_proj.element_size()
    return choose_prefetch_step(CostInputs(
        layers=shape.layers, layer_bytes=nbytes, buffer_bytes=nbytes, bandwidth=costs["bandwidth"],
        compute_s=flops / costs["flops_per_s"], latency_s=costs["latency_s"], wrap_windows=1)).k


def test_auto_step_is_measured_and_agreed_across_ranks():
    results = run_ranks(_auto_case, 2, {})
    assert all(equal for equal, _, _, _ in results)
    (costs,) = {tuple(sorted(c.items())) for *_, c in results}  # the same measurements on every rank
    costs = dict(costs)
    assert costs["bandwidth"] > 0 and costs["flops_per_s"] > 0 and costs["latency_s"] >= 0, costs
    expected = _expected_step(costs)
    for _, k, why, _ in results:
        assert k == expected, (k, expected, costs, why)
        assert why.startswith(f"k={expected}: ") and "simulated forward" in why, why


def test_auto_step_follows_given_costs():
    # o_proj is 64 x 96 fp32 = 24576 B: at this bandwidth a transfer takes half a layer's compute
    given = {"bandwidth": 24576 / 0.5e-3, "latency_s": 0.0, "compute_s": 1e-3}
    assert [k for _, k, _, _ in run_ranks(_auto_case, 2, given)] == [1, 1]
    assert [k for _, k, _, _ in run_ranks(_auto_case, 2, dict(given, bandwidth=1e15))] == [0, 0]
    assert [k for _, k, _, _ in run_ranks(_auto_case, 2, dict(given, memory_budget=24576), False)] == [0, 0]
    # with wrap-around every step holds 2 layer buffers (the next forward's window and the one in use): none fits
    # a budget of one; the smallest step is taken, saying so
    for _, k, why, _ in run_ranks(_auto_case, 2, dict(given, memory_budget=24576)):
        assert k == 0 and "no step fits the memory budget" in why and "wrap_around=False" in why


def _auto_at_compile_case(rank, world, cost_model):
    torch._dynamo.reset()
    shape = StackShape(layers=4)
    model = build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))  # nothing measured
    fn = torch.compile(model, backend="ascend_compile",
                       options={"lowering": "aot_eager", "prefetch_step": "auto", "cost_model": cost_model})
    try:
        return torch.equal(fn(make_input(shape)), build_stack(shape)(make_input(shape)))
    except Exception as e:  # Dynamo wraps what a backend raises
        return str(e)


def test_auto_at_compile_time_needs_shard_time_measurements_or_given_costs():
    for msg in run_ranks(_auto_at_compile_case, 2, {"bandwidth": 1e9}):
        assert "options['prefetch_step']='auto' on a model sharded with a fixed prefetch_step" in msg
        assert "the missing ['latency_s', 'compute_s']" in msg
    given = {"bandwidth": 1e9, "latency_s": 0.0, "compute_s": 1e-3}
    assert run_ranks(_auto_at_compile_case, 2, given) == [True, True]


def _v3(**kw):
    from ascend_compile.passes.cost_model import StepInputs

    base = dict(series=(("o_proj", 16384, 7168), ("q_b_proj", 1536, 24576)), bytes_per_element=2, layers=61,
                ranks=8, link_bandwidth=56e9, memory_bandwidth=1.6e12, flops_per_s=120e12, latency_s=20e-6,
                params_per_layer=37e9 / 61)
    base.update(kw)
    return StepInputs(**base)


def test_slices_decode_reads_one_kth_of_each_weight_and_pays_per_collective():
    free_links = _v3(link_bandwidth=float("inf"), latency_s=0.0)
    rep, dec = free_links.replicated_layer_s(1), free_links.decode_layer_s(1)
    # memory-bound at one token: the saving is (K-1)/K of the series' weight read
    series_read = free_links.series_bytes() / free_links.memory_bandwidth
    assert rep - dec == pytest.approx(series_read * 7 / 8, rel=1e-9)
    # every series costs two collectives: their latency adds up
    slow = _v3(link_bandwidth=float("inf"), latency_s=1e-3)
    assert slow.decode_layer_s(1) - dec == pytest.approx(4 * 1e-3)
    assert slow.decode_threshold() == 0  # 4 ms a layer of collectives never beats gathering
    assert free_links.decode_threshold() > 1000


def test_gathering_slices_moves_one_kth_of_a_broadcast():
    s = _v3().steps(1, prefetch_step=1)
    assert s["slices gather"] < s["layers"]  # all links busy, not only the owner's
    assert _v3(ranks=16).steps(1)["slices gather"] <= _v3(ranks=8).steps(1)["slices gather"]
    assert set(s) == {"replicated", "layers", "slices gather", "slices decode"}


def _deepseek_o_proj(**kw):
    from ascend_compile.passes.cost_model import StepInputs

    return StepInputs(series=(("o_proj", 16384, 7168),), bytes_per_element=1, layers=61, ranks=8,
                      link_bandwidth=56e9, memory_bandwidth=1600e9, flops_per_s=120e12, latency_s=20e-6,
                      params_per_layer=37e9 / 61, **kw)


def test_share_sizes_cross_machines_above_a_machine_and_take_measured_latencies():
    from ascend_compile.passes.cost_model import Deployment, compare_share_sizes, recommend

    where = Deployment(4, 8, 56e9, 25e9, 20e-6, 50e-6)
    rows = compare_share_sizes(_deepseek_o_proj(), where, [2, 3, 4, 8, 16], 32, 4096)
    assert sorted({r["size"] for r in rows}) == [2, 4, 8, 16]  # 3 does not divide 32 devices
    by = {(r["size"], r["layout"]): r for r in rows}
    assert [by[(k, "layers")]["link"] for k in (2, 4, 8, 16)] == ["HCCS"] * 3 + ["RoCE"]
    layer = 16384 * 7168  # int8: one byte an element
    for k in (2, 4, 8, 16):  # (K-1)/K of the series, less the two buffers of prefetch_step=1
        assert by[(k, "slices")]["saved"] == by[(k, "layers")]["saved"] == layer * 61 * (k - 1) / k - 2 * layer
    # broadcasting whole layers over RoCE is slower than over HCCS at prefill
    assert by[(16, "layers")]["prefill_s"] > by[(8, "layers")]["prefill_s"]
    measured = compare_share_sizes(_deepseek_o_proj(), Deployment(4, 8, 56e9, 25e9, 20e-6, 50e-6, ((8, 2e-3),)),
                                   [8], 32, 4096)
    assert {r["latency"] for r in measured} == {"measured"} and all(r["latency"] == "modelled" for r in rows)
    assert measured[0]["decode_s"] > by[(8, "layers")]["decode_s"]  # 2 ms a collective instead of 20 us
    best, why = recommend(rows, memory_goal=5 * 2**30)
    assert best["saved"] >= 5 * 2**30
    assert best["decode_s"] == min(r["decode_s"] for r in rows if r["saved"] >= 5 * 2**30)
    assert why.startswith(f"share_size={best['size']}, layout={best['layout']!r}: the fastest decode step among those "
                          "saving >= 5.00 GiB")
    none, why = recommend(rows, memory_goal=100 * 2**30)
    assert none is None and re.match(r"no size saves 100.00 GiB per device; the most is \d+\.\d+ GiB \(share_size=16\)", why)
