"""Our pass inside vLLM's own compile (compilation mode 3, VLLM_COMPILE).

vLLM splits the model's graph at attention and compiles each piece with its own backend; user
passes join its pass manager through ``inductor_compile_config[current_platform.pass_key]`` (a
``VllmInductorPass``; vLLM-Ascend's ``GraphFusionPassManager`` takes them under its own key the
same way). ``register`` puts ``SlicedPieces`` there when sliced layers are shared, and switches
the compile caches off (they cannot store a graph with effect tokens). On each piece
it checks that every ``sliced_linear`` call is still ordered by its effect token (the collectives
inside must run in the same order on every rank), and writes the piece's table to the dumps: its
sliced layers, their cut, and with ``paths="by_shape"`` and a static size the path and collectives
of each. A sliced layer read inside a piece compiled with this pass is accepted at run time
(``runtime/opaque.py``); one in any other Inductor graph is still refused.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging

from ...config import ConfigError
from ...runtime.opaque import PIECES_PASS_MARK

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def pass_class() -> type:
    """``SlicedPieces``, a ``VllmInductorPass`` (imported from vLLM when first needed)."""
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

    class SlicedPieces(VllmInductorPass):
        """Checks the order of the sliced layers of every piece vLLM compiles, and dumps them."""

        def __init__(self, config, dump_dir=None):
            super().__init__(config)
            self.dump_dir = dump_dir
            self.pieces = itertools.count()
            setattr(self, PIECES_PASS_MARK, True)

        def __call__(self, graph):
            check_piece(graph, self.dump_dir, f"piece_{next(self.pieces)}")

        def uuid(self) -> str:  # Inductor's cache key: this module's code
            with open(__file__, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()

    return SlicedPieces


def check_piece(graph, dump_dir=None, piece_id: str = "piece") -> list:
    """Refuse a piece whose sliced layers lost their effect order; dump its table. Returns the
    piece's sliced layers (``sliced_layers``)."""
    from ...debug.dump import GraphDumper, slices_table
    from ...passes.graph import is_sliced, sliced_layers, sliced_token_counts, sliced_targets
    from ...runtime import groups

    bare = [n.name for n in graph.nodes if is_sliced(n) and n.target in sliced_targets()]
    if bare:
        raise ConfigError(
            f"a piece vLLM compiled calls sliced_linear without its effect token ({bare[:3]}): a pass may reorder "
            "these calls, and ranks that issue their collectives in different orders hang. Report the vLLM passes "
            "in use (compilation_config.pass_config)"
        )
    layers = sliced_layers(graph)
    if layers:
        table = slices_table(layers, groups.global_rank(), sliced_token_counts(graph))
        table["piece"] = piece_id
        GraphDumper(dump_dir, groups.global_rank(), graph_id=piece_id).schedule(table)
        log.debug("ascend_compile: %s of vLLM's graph calls %d sliced layer(s) in order", piece_id, len(layers))
    return layers


def register(vllm_config, dump_dir=None) -> None:
    """Put ``SlicedPieces`` under the platform's pass key (once); refuse if another pass is there."""
    from vllm.platforms import current_platform

    config = vllm_config.compilation_config.inductor_compile_config
    key = current_platform.pass_key
    existing = config.get(key)
    if getattr(existing, PIECES_PASS_MARK, False):
        return
    if existing is not None:
        raise ConfigError(
            f"compilation_config.inductor_compile_config[{key!r}] already holds {type(existing).__name__}, and vLLM "
            "takes one pass there: ascend_compile's pass for sliced layers needs it"
        )
    config[key] = pass_class()(vllm_config, dump_dir)
    if "force_disable_caches" not in config:
        # torch's graph caches refuse graphs with effect tokens (with_effects is not cacheable), and vLLM's
        # compile cache then refuses the piece ("The compiled artifact is not serializable")
        config["force_disable_caches"] = True
        log.info("ascend_compile: sliced layers keep their order with effect tokens, which torch's compile caches "
                 "cannot store: inductor_compile_config['force_disable_caches'] = True (every start compiles)")
