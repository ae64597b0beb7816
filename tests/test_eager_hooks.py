"""The eager hook baseline (reference design) is correct, so benchmarks compare like with like."""

import pytest
import torch

import ascend_compile as ac
from ascend_compile.models import StackShape, build_stack, make_input
from ascend_compile.runtime.eager_hooks import EagerHookSharing
from ranks import run_ranks


def _hooks_case(rank, world, k):
    shape = StackShape(layers=5, bias=True)
    x = make_input(shape)
    ref = build_stack(shape)(x)
    model = build_stack(shape)
    before = ac.parameter_storage_bytes(model)
    EagerHookSharing(model, ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], prefetch_step=k))
    outs = [model(x) for _ in range(2)]  # the second forward reuses the windows
    return [torch.equal(o, ref) for o in outs], before - ac.parameter_storage_bytes(model)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_hook_baseline_is_bitwise(k):
    for equal, saved in run_ranks(_hooks_case, 2, k):
        assert equal == [True, True]
