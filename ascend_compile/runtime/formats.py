"""Storage formats of shared weights on Ascend: receive buffers in the owner's format.

On an NPU, ``process_weights_after_loading`` may cast a linear weight to ``FRACTAL_NZ`` (a
tiled layout; vLLM-Ascend does it for quantized methods, and for unquantized ones with
``VLLM_ASCEND_ENABLE_NZ``). A broadcast copies the owner's bytes, so a receive buffer must have
the owner's format: NZ bytes read as ND are wrong without any error. At shard time each owner
reports the format of what it owns (``torch_npu.get_npu_format``); the ranks agree on the table,
formats that cannot be reproduced are refused, and every receive buffer of a non-row-major
weight is allocated with ``torch_npu.empty_with_format`` (``ascend_compile::receive_buffer``).

NOT VERIFIED ON HARDWARE: tested against a fake ``torch_npu`` (tests/test_formats.py);
``docs/npu_runbook.md`` has the on-device check. ``torch_npu`` is imported only for tensors that
live on an NPU.
"""

from __future__ import annotations

import types
from typing import Optional

import torch

NPU_DEVICE_TYPE = "npu"
# aclFormat values
NCHW, NHWC, ND, FRACTAL_NZ = 0, 1, 2, 29
NAMES = types.MappingProxyType({0: "NCHW", 1: "NHWC", 2: "ND", 3: "NC1HWC0", 4: "FRACTAL_Z", 29: "FRACTAL_NZ"})
ROW_MAJOR = (NCHW, NHWC, ND)  # plain strided storage: a plain receive buffer holds the same bytes
REPRODUCIBLE = (FRACTAL_NZ,)  # allocated in that format with torch_npu.empty_with_format


def name(fmt: int) -> str:
    return NAMES.get(fmt, f"aclFormat {fmt}")


def storage_format(t: torch.Tensor) -> Optional[int]:
    """The NPU storage format of ``t`` (an aclFormat int), None off NPU."""
    if t.device.type != NPU_DEVICE_TYPE:
        return None
    import torch_npu

    return int(torch_npu.get_npu_format(t))


def special(fmt: Optional[int]) -> bool:
    """A format a plain receive buffer would not reproduce."""
    return fmt is not None and fmt not in ROW_MAJOR


def check_reproducible(layer: str, fmt: Optional[int]) -> None:
    if special(fmt) and fmt not in REPRODUCIBLE:
        from .errors import ShardingError

        raise ShardingError(
            f"{layer} is stored in format {name(fmt)} on its owner; receive buffers can only be made in "
            f"{[name(f) for f in ROW_MAJOR + REPRODUCIBLE]}, and bytes of another format read as those would be "
            "wrong. Leave this series out, or keep its processed weight in ND/FRACTAL_NZ."
        )


def empty_in_format(size, dtype, device, fmt: int) -> torch.Tensor:
    if not special(fmt):
        return torch.empty(size, dtype=dtype, device=device)
    import torch_npu

    return torch_npu.empty_with_format(size, dtype=dtype, device=device, acl_format=fmt)
