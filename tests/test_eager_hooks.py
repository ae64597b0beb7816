"""The eager hook baseline (reference design) is correct, so benchmarks compare like with like."""

import os
import sys

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ranks import run_ranks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from eager_hooks import EagerHookSharing  # noqa: E402  (the baseline lives beside the benchmarks)

SERIES = ["o_proj", "q_b_proj"]


def _hooks_case(rank, world, k):
    shape = StackShape(layers=5, bias=True)
    x = make_input(shape)
    ref = build_stack(shape)(x)
    model = build_stack(shape)
    before = ac.parameter_storage_bytes(model)
    EagerHookSharing(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=k))
    shared = before - ac.parameter_storage_bytes(model)
    outs = [model(x) for _ in range(2)]  # the second forward reuses the windows
    return [torch.equal(o, ref) for o in outs], shared, before - ac.parameter_storage_bytes(model)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_hook_baseline_is_bitwise(k):
    n, world = 5, 2
    layer = build_stack(StackShape(layers=1, bias=True)).layers[0].self_attn
    params = [p for name in SERIES for p in getattr(layer, name).parameters()]  # weight and bias of each series
    layer_bytes = sum(p.numel() * p.element_size() for p in params)
    for rank, (equal, shared, saved) in enumerate(run_ranks(_hooks_case, world, k)):
        assert equal == [True, True]
        not_owned = [i for i in range(n) if i % world != rank]  # owner of layer i: i % world
        # sharing: each parameter of a layer this rank does not own keeps one element of storage
        assert shared == len(not_owned) * (layer_bytes - sum(p.element_size() for p in params)), (rank, shared)
        # after the forwards those parameters point into the window they were received in, slot i % (k + 1)
        # (every series has its own windows): each slot used counts one layer's bytes again
        slots = {i % (k + 1) for i in not_owned}
        assert saved == (len(not_owned) - len(slots)) * layer_bytes, (rank, saved, slots)
