"""Whole layers in one piece of a split graph: ``integrations/vllm/pieces.py:schedule_piece``, the pass
vLLM's pass manager runs on every piece under compilation mode 3, here on an aten graph traced outside
vLLM (the engine test, ``tests/test_vllm_mode3.py``, runs it inside vLLM's pieces). The piece's
markers become broadcasts scheduled inside it, and it computes what the unsharded model does; a
sharding that prefetches across forwards is refused, since nothing may stay in flight after a piece."""

import pytest
import torch

import ascend_compile as ac
from ascend_compile.config import ConfigError
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_ranks


def _piece_case(rank, world, wrap_around, pin_order=False):
    from torch.fx.experimental.proxy_tensor import make_fx

    from ascend_compile.integrations.vllm.pieces import schedule_piece
    from ascend_compile.passes.graph import is_broadcast, is_marker, is_wait

    shape = StackShape(layers=2)
    ref, model = build_stack(shape), build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1, wrap_around=wrap_around))
    x = make_input(shape, tokens=4, seed=rank)
    piece = make_fx(model)(x)  # an aten graph, as vLLM's pass manager gets a piece (its reads run once here)
    try:
        table = schedule_piece(piece, {"pin_order": pin_order}, None, "piece_1")
    except ConfigError as e:
        return str(e)
    pins = sum(getattr(n.target, "__name__", "") == "control_deps" for n in piece.graph.nodes)
    if pin_order:  # control_deps (the order stated for Inductor) runs only inside Inductor
        return {"pins": pins, "order": table["order"]}
    with torch.device("meta"):  # every tensor the piece makes takes its device from the model's
        out = piece(x)
    kinds = [("issue" if is_broadcast(n) else "wait") for n in piece.graph.nodes if is_broadcast(n) or is_wait(n)]
    return {"equal": torch.equal(out, ref(x)), "order": table["order"], "kinds": kinds, "pins": pins,
            "markers": sum(is_marker(n) for n in piece.graph.nodes), "piece": table["piece"],
            "rows": [(r["index"], r["issue"], r["wait"], r["first_use"]) for r in table["collectives"]]}


def test_a_piece_with_whole_layers_is_scheduled_inside_and_equals_the_unsharded_model():
    for r in run_ranks(_piece_case, 2, False):
        assert r["equal"] and r["markers"] == 0 and r["piece"] == "piece_1"
        assert [o.split()[0] for o in r["order"]] == ["o_proj.weight[0]", "o_proj.weight[1]"]
        # prefetch_step=1: layer 0 issued as the piece starts, layer 1 right after layer 0's wait
        assert r["kinds"] == ["issue", "wait", "issue", "wait"], r["kinds"]
        (i0, issue0, wait0, use0), (i1, issue1, wait1, use1) = r["rows"]
        assert issue0 < wait0 < issue1 < use0 < wait1 < use1, r["rows"]
        assert r["pins"] == 0
    for r in run_ranks(_piece_case, 2, False, True):  # the default, as vLLM's pieces get it
        assert r["pins"] >= 2 and [o.split()[0] for o in r["order"]] == ["o_proj.weight[0]", "o_proj.weight[1]"]


def test_a_piece_cannot_leave_a_window_in_flight():
    for said in run_ranks(_piece_case, 2, True):
        assert isinstance(said, str), said
        assert "prefetch across forwards (wrap_around=True), but under compilation mode 3 each piece" in said
        assert "drop shared_weight wrap_around" in said


if __name__ == "__main__":
    pytest.main([__file__, "-v"])
