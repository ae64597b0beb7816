"""Imported once, by the forkserver every test rank is forked from (``tests/ranks.py``).

A rank started with ``spawn`` imports torch, ascend_compile and Inductor itself, and Inductor probes
the CPU's vector ISAs (building and loading test kernels in new processes) the first time the rank
compiles: seconds of a 2-core machine for every rank of every pool. Forked from a server that did
it once, a rank starts with all of it done. Nothing here starts a thread or touches a device, so
forking after it is safe; the ranks set up their own process groups.
"""

import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torch._inductor.compile_fx  # noqa: F401
import torch.distributed  # noqa: F401
from torch._inductor import cpu_vec_isa

import ascend_compile  # noqa: F401

cpu_vec_isa.pick_vec_isa()  # cached for the process: every forked rank inherits the answer
