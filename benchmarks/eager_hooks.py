"""The eager hook runtime of the reference design, kept as the baseline benchmarks compare to.

Forward pre-hooks on each series layer: wait for the layer's broadcast, point its
parameters at the received window (``Tensor.data`` swap, the reference's ``set_``), and issue
the asynchronous broadcast of the layer ``k`` ahead. Works eagerly only: graph capture
cannot trace hooks that issue collectives, which is why the compiled version exists.
"""

from __future__ import annotations

from torch import nn

import torch.distributed as dist

from ascend_compile.config import SharedWeightConfig
from ascend_compile.runtime import groups
from ascend_compile.runtime.series import series_members, standin_like


class EagerHookSharing:
    """Share ``config.layers`` across the group with hooks. ``remove()`` detaches the hooks."""

    def __init__(self, model: nn.Module, config: SharedWeightConfig):
        if config.prefetch_step == "auto":
            raise ValueError("the eager hook baseline takes a fixed prefetch_step")
        self.pg = groups.resolve_group(config.group)
        self.rank, self.world = groups.group_rank(self.pg), groups.group_size(self.pg)
        self.k = config.prefetch_step
        self.series: dict = {}
        self.handles = []
        for name, members in series_members(model, config).items():
            layers = []
            for index, (_, module, params) in enumerate(members):
                owner = index % self.world
                real = {}
                for pname, p in params.items():
                    p.requires_grad_(False)
                    if owner == self.rank:
                        real[pname] = p
                    else:
                        module._parameters[pname] = standin_like(p)
                layers.append({"module": module, "owner": owner, "real": real, "names": list(params)})
                self.handles.append(module.register_forward_pre_hook(self._hook(name, index)))
            ref = members[0][2]
            windows = [{p: t.new_empty(t.shape) for p, t in ref.items()} for _ in range(self.k + 1)]
            self.series[name] = {"layers": layers, "windows": windows, "inflight": {}}

    def _issue(self, name: str, i: int) -> None:
        s = self.series[name]
        layer = s["layers"][i]
        if layer["owner"] == self.rank:
            bufs = layer["real"]
        else:
            bufs = s["windows"][i % (self.k + 1)]
        works = [dist.broadcast(bufs[p], group_src=layer["owner"], group=self.pg, async_op=True) for p in layer["names"]]
        s["inflight"][i] = (works, bufs)

    def _hook(self, name: str, i: int):
        def pre_hook(module, args):
            s = self.series[name]
            n = len(s["layers"])
            if i == 0:  # start of a forward: the first k layers (or this one) are not in flight yet
                for j in range(max(self.k, 1)):
                    if j < n and j not in s["inflight"]:
                        self._issue(name, j)
            if i not in s["inflight"]:
                self._issue(name, i)
            works, bufs = s["inflight"].pop(i)
            for w in works:
                w.wait()
            for p in s["layers"][i]["names"]:
                module._parameters[p].data = bufs[p]
            if self.k > 0 and i + self.k < n:
                self._issue(name, i + self.k)
        return pre_hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
