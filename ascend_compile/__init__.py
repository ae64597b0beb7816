"""ascend_compile: share repeated linear-layer weights across ranks inside torch.compile graphs.

Layer ``i`` of a series keeps its weight on rank ``i % K`` only; the compiled graph
broadcasts it to the other ranks just in time, prefetched ``k`` layers ahead.

    import ascend_compile as ac
    ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj"], prefetch_step=1))
    torch.compile(model, backend="ascend_compile")(x)
"""

from .config import CompileOptions, ConfigError, SharedWeightConfig
from .runtime.errors import PeerError, RankMismatchError, ShardingError
from .runtime.opaque import ForeignBackendError, OpaqueReadError, fetch_layers
from .runtime.sharding import ShardPlan, drain_prefetch, get_plan, invalidate_prefetch, parameter_storage_bytes, shard_model
from .passes.verify import ScheduleError

__version__ = "0.1.0"


def backend(gm, example_inputs, **kwargs):
    """The Dynamo backend, for passing as an object: ``torch.compile(m, backend=ac.backend)``."""
    from .backend import ascend_compile_backend

    return ascend_compile_backend(gm, example_inputs, **kwargs)


__all__ = [
    "CompileOptions", "ConfigError", "ForeignBackendError", "OpaqueReadError", "PeerError", "RankMismatchError", "ScheduleError", "ShardPlan", "ShardingError",
    "SharedWeightConfig", "backend", "drain_prefetch", "fetch_layers", "get_plan", "invalidate_prefetch", "parameter_storage_bytes", "shard_model",
]
