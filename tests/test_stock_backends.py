"""A sharded model under plain Inductor is refused on every rank, before any broadcast: Inductor
reorders the shared-weight reads with its memory-reordering passes (all ``q_b_proj`` reads first:
every fetched weight alive at once, and an order that may differ between ranks that compile
different sizes) and with ``freezing`` folds them into constants at compile time (a collective at
compile time, the memory saving gone). Backends that run the traced graph as it is (``eager``,
``aot_eager``, ``torch._dynamo.explain``) keep program order: correct, and synchronous."""

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_fresh

SERIES = ["o_proj", "q_b_proj"]


def _stock_case(rank, world, backend, freezing):
    from torch._inductor import config as inductor_config

    torch._dynamo.reset()
    shape = StackShape(layers=2)
    ref, model = build_stack(shape), build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1, wrap_around=False))
    x = make_input(shape, tokens=3 + 2 * rank, seed=rank)
    eager = torch.equal(model(x), ref(x))
    with torch.no_grad(), inductor_config.patch(freezing=freezing, reorder_for_peak_memory=True,
                                                reorder_for_locality=True, fx_graph_cache=False):
        try:
            got = torch.compile(model, backend=backend, dynamic=False)(x)
        except Exception as e:  # noqa: BLE001 - the message is checked
            return {"eager": eager, "error": f"{type(e).__name__}: {e}"}
    return {"eager": eager, "error": None, "equal": torch.equal(got, ref(x))}


@pytest.mark.parametrize("freezing", [False, True])
def test_a_sharded_model_compiled_by_plain_inductor_is_refused_on_every_rank(freezing):
    for rank, r in enumerate(run_fresh(_stock_case, 2, "inductor", freezing, timeout=240)):
        assert r["eager"], rank
        assert r["error"] is not None, f"rank {rank}: plain Inductor ran a sharded model"
        assert "ForeignBackendError" in r["error"] and "a graph that Inductor compiled as a backend of its own" in r["error"]
        assert 'Compile a sharded model with backend="ascend_compile"' in r["error"]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_backends_that_run_the_traced_graph_as_it_is_stay_correct(backend):
    for rank, r in enumerate(run_fresh(_stock_case, 2, backend, False, timeout=240)):
        assert r["eager"] and r["error"] is None and r["equal"], (rank, r)
