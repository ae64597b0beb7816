"""Weight reloads of a sharded model: shared layers look as they did at load time while vLLM's
layerwise reload runs (``unshare_for_reload``), then are shared again with the same objects."""

from __future__ import annotations

from .loading import wrap_processing

def unshare_for_reload(model, plan) -> list:
    """Before vLLM's layerwise reload: shared layers look as they did at load time.

    ``initialize_layerwise_reload`` deletes each layer's parameters and registers its load-time
    ones again on meta (``register_parameter``), which a parametrized layer refuses: its class
    has a property of that name (``KeyError: "attribute 'weight' already exists"``). So each
    shared layer gets its plain class back (the one ``parametrize`` derived from); an owner's
    real tensor goes back under the parameter name (the reload copies the new values into it,
    keeping the tensor); a non-owner's stand-in stays hidden in its parametrization, and its
    quant method processes without values (``_process_without_values``) as at load. Every
    object is kept, so the modules and classes compiled graphs guard on are the same ones after
    ``reshare_after_reload`` (mode 1 does not recompile). Returns what that function needs."""
    modules = dict(model.named_modules())
    by_module: dict = {}
    for sp in plan.params:
        by_module.setdefault(sp.module, []).append(sp)
    state = []
    for mname, sps in by_module.items():
        module, names, owned = modules[mname], [sp.param for sp in sps], sps[0].owner == plan.rank
        cls, plists = module.__class__, module._modules.pop("parametrizations")
        module.__class__ = cls.__bases__[0]  # what parametrize derived the class from
        if owned:
            for pname in names:
                module._parameters[pname] = plists[pname]._parameters.pop("original")
        qm = wrap_processing(module, mname, names, owned)
        state.append((module, qm, cls, plists, names, owned))
    return state


def reshare_after_reload(state: list) -> None:
    """After the reload: the same parametrizations, classes and quant methods as before it."""
    for module, qm, cls, plists, names, owned in state:
        if qm is not None:
            module.quant_method = qm
        for pname in names:
            p = module._parameters.pop(pname, None)  # an owner's tensor, which vLLM put back
            if owned:
                plists[pname]._parameters["original"] = p
        module._modules["parametrizations"] = plists
        module.__class__ = cls
