"""What exists at run time, outside the graph: the marker op, sharding, process groups."""

from . import ops  # noqa: F401  (registers ascend_compile::shared_weight)
