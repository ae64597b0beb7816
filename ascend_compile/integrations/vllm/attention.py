"""Shared layers that an attention implementation reads inside its own op (vLLM-Ascend 0.23's MLA).

vLLM-Ascend 0.23 (``vllm_ascend/ops/mla.py``, ``attention/mla_v1.py``): ``AscendMultiHeadLatentAttention``
calls ``torch.ops.vllm.mla_forward``, an op Dynamo cannot see, which runs
``mla_attn.impl.forward(...)``; the impl (``AscendMLAImpl``, not a module) holds the model's
``q_b_proj`` (as ``q_proj``), ``o_proj`` and ``kv_b_proj`` and calls ``q_proj`` once per part of its
batch (decode tokens, then prefill tokens), reads ``o_proj.weight`` for a prefetch hint, calls
``o_proj`` once, and in a profile run or an idle rank's dummy batch (``attn_metadata is None``)
calls neither. Upstream vLLM calls these layers outside its attention op; there the compiled graph
sees them and nothing here applies.

- ``check_attention_readers`` (after the model is built, before loading; an error reaches every
  rank through the load exchange): refuses shared layers such an impl consumes at load, where a
  non-owner holds no values: ``kv_b_proj`` (``process_weights_after_loading`` builds ``W_UK``/``W_UV``
  from it) and, with ``enable_mlapo``, ``q_proj`` and ``fused_qkv_a_proj`` (folded into the fused
  preprocess op, their weights then set to None).
- ``fetch_in_attention_readers`` (after sharding): every impl holding shared layers runs its
  ``forward`` inside ``OpaqueReaders.enter`` (``fetch_layers`` with prefetch), so each such layer is
  fetched once per layer per forward on every rank, whatever each rank's batch: where the reference
  plugin calls ``reach_layer_for_shard_weight_series``, the layers of the next ``prefetch_step``
  attention ops are issued asynchronously, and waited for where those ops start.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

from ...config import ConfigError, SharedWeightConfig

log = logging.getLogger(__name__)

# what an attention impl consumes at load: attribute -> why ("" when only under enable_mlapo)
READ_AT_LOAD = {"kv_b_proj": "its process_weights_after_loading builds W_UK/W_UV from kv_b_proj's weight"}
FOLDED_BY_MLAPO = ("q_proj", "fused_qkv_a_proj")


def attention_readers(model) -> list:
    """``[(module name, impl, [(attribute, layer)])]``: every attention impl (an object under a module's
    ``impl`` that is not itself a module) and the layers of ``model`` it holds, in attribute order."""
    import torch.nn as nn

    names = {id(m): n for n, m in model.named_modules()}
    out, seen = [], set()
    for name, module in model.named_modules():
        impl = getattr(module, "impl", None)
        if impl is None or isinstance(impl, nn.Module) or id(impl) in seen:
            continue
        seen.add(id(impl))
        held = [(attr, v) for attr, v in vars(impl).items() if isinstance(v, nn.Module) and id(v) in names]
        if held:
            out.append((name, impl, held))
    return out


def check_attention_readers(model, cfg: SharedWeightConfig) -> None:
    """Refuse shared layers that an attention impl consumes at load (before any weight is read)."""
    from ...runtime.series import series_members

    shared = {id(m): (series, n) for series, members in series_members(model, cfg).items() for n, m, _ in members}
    for name, impl, held in attention_readers(model):
        for attr, layer in held:
            if id(layer) not in shared:
                continue
            series, member = shared[id(layer)]
            why = READ_AT_LOAD.get(attr)
            if why is None and attr in FOLDED_BY_MLAPO and getattr(impl, "enable_mlapo", False):
                why = (f"with enable_mlapo its weights are folded into the fused MLA preprocess op at load and "
                       f"{attr}.weight is set to None")
            if why is not None:
                raise ConfigError(
                    f"{member} (series {series!r}) is read at load by {type(impl).__name__} of {name} as {attr}: {why}, "
                    f"and a rank that does not own it has no values then. Remove {series!r} from "
                    "additional_config['ascend_compile']['shared_weight']['layers']"
                    + (" or turn enable_mlapo off" if attr in FOLDED_BY_MLAPO else "") + "."
                )


READERS_ATTR = "_ascend_compile_opaque_readers"


def fetch_in_attention_readers(model, dump_dir: Optional[str] = None) -> list:
    """Run each attention impl's ``forward`` inside ``OpaqueReaders.enter``: the shared layers it holds
    are fetched once where it starts (or were fetched ahead, at the start of the op ``prefetch_step``
    ops before it). Returns ``[(module name, [attribute])]`` of the impls changed; writes the
    schedule to ``<dump_dir>/rank_<global rank>/attention_ops.json``."""
    from ...runtime.marker import AUTO_STEP
    from ...runtime.opaque import OpaqueReaders, is_shared_layer
    from ...runtime.sharding import get_plan

    plan = get_plan(model)
    if plan is None or getattr(model, READERS_ATTR, None) is not None:
        return []
    found = []
    for name, impl, held in attention_readers(model):
        layers = [(attr, layer) for attr, layer in held if is_shared_layer(layer)]
        if layers:
            found.append((name, impl, layers))
    if not found:
        return []
    step = 1 if plan.prefetch_step == AUTO_STEP else plan.prefetch_step
    readers = OpaqueReaders([(name, [m for _, m in layers]) for name, _, layers in found], step)
    setattr(model, READERS_ATTR, readers)
    for pos, (name, impl, layers) in enumerate(found):
        forward = impl.forward

        @functools.wraps(forward)
        def fetching_forward(*args, __forward=forward, __pos=pos, **kwargs):
            with readers.enter(__pos):
                return __forward(*args, **kwargs)

        impl.forward = fetching_forward
    changed = [(name, [a for a, _ in layers]) for name, _, layers in found]
    log.info("ascend_compile: %d attention op(s) read shared layers inside (e.g. %s reads %s): each fetches them "
             "where it starts, the next %d op(s)' layers prefetched there", len(changed), changed[0][0],
             changed[0][1], step)
    if dump_dir:
        import json
        import os

        from ...runtime import groups

        rank_dir = os.path.join(dump_dir, f"rank_{groups.global_rank()}")
        os.makedirs(rank_dir, exist_ok=True)
        with open(os.path.join(rank_dir, "attention_ops.json"), "w") as f:
            json.dump({"prefetch_step": step, "ops": readers.schedule()}, f, indent=1)
    return changed
