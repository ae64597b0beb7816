"""Our pass inside vLLM's own compile (compilation mode 3, VLLM_COMPILE).

vLLM splits the model's graph at attention and compiles each piece with its own backend; user
passes join its pass manager through ``inductor_compile_config[current_platform.pass_key]`` (a
``VllmInductorPass``; vLLM-Ascend's ``GraphFusionPassManager`` takes them under its own key the
same way). ``register`` puts ``SharedPieces`` there when weights are shared, and switches the
compile caches off (they cannot store a graph with effect tokens, and a cache hit would skip the
pass). On each piece, per layout:

- ``"slices"`` (``check_piece``): every ``sliced_linear`` call must still be ordered by its effect
  token (the collectives inside run in the same order on every rank); the piece's table goes to the
  dumps: its sliced layers, their cut, and with ``paths="by_shape"`` and a static size the path and
  collectives of each. A sliced layer read inside a piece compiled with this pass is accepted at run
  time (``runtime/opaque.py``); one in any other Inductor graph is still refused.
- ``"layers"`` (``schedule_piece``): our passes rewrite the piece's markers into broadcasts and
  schedule them inside the piece, as our backend does for a whole graph (rewrite, prefetch, pin the
  order, verify): a layer's broadcast is issued ``prefetch_step`` layers of its series ahead, and at
  the piece's start for the first ones. Nothing crosses a piece (no window is left in flight when a
  piece ends), so each piece can be captured as a graph of its own; the order is a function of the
  piece alone, the same on every rank.
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
    """``SharedPieces``, a ``VllmInductorPass`` (imported from vLLM when first needed)."""
    from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

    class SharedPieces(VllmInductorPass):
        """Schedules the whole layers and checks the sliced layers of every piece vLLM compiles; dumps them."""

        def __init__(self, config, options=None):
            super().__init__(config)
            self.options = dict(options or {})
            self.dump_dir = self.options.get("dump_dir")
            self.pieces = itertools.count()
            setattr(self, PIECES_PASS_MARK, True)

        def __call__(self, graph):
            piece_id = f"piece_{next(self.pieces)}"
            check_piece(graph, self.dump_dir, piece_id)
            schedule_piece(graph.owning_module, self.options, self.dump_dir, piece_id)

        def uuid(self) -> str:  # Inductor's cache key: this module's code
            with open(__file__, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()

    return SharedPieces


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


def schedule_piece(gm, options: dict, dump_dir=None, piece_id: str = "piece"):
    """Whole shared layers (``layout="layers"``) read in this piece: our passes on it, in place (its
    markers become broadcasts and waits scheduled inside the piece). Returns the piece's schedule
    table (also dumped), or None for a piece without shared layers."""
    from ...config import CompileOptions
    from ...debug.dump import GraphDumper, schedule_table
    from ...passes import PassPipeline, default_passes
    from ...passes.plan import marker_groups
    from ...passes.planning import plan_graph
    from ...passes.prefetch import collective_order
    from ...runtime import groups

    if not marker_groups(gm.graph):
        return None
    opts = CompileOptions.from_dict(options)
    # broadcast_ into fresh buffers, as our Inductor lowering
    plan, explanation = plan_graph(
        gm, opts, wraps=False, inplace=True,
        refuse_wrap="series {series} prefetch across forwards (wrap_around=True), but under compilation mode 3 each "
                    "piece of vLLM's graph is compiled (and captured) on its own, and a window cannot stay in flight "
                    "between pieces: drop shared_weight wrap_around (mode 3 defaults it to False)")
    dumper = GraphDumper(dump_dir, groups.global_rank(), graph_id=piece_id)
    pipeline = PassPipeline(plan, default_passes(plan.pin_order), observer=dumper.graph)
    pipeline(gm)
    table = schedule_table(plan, pipeline.final_schedule)
    table.update(piece=piece_id, global_rank=groups.global_rank(),
                 order=[str(c) for c in collective_order(pipeline.final_schedule)])
    if explanation:
        table["explain"] = explanation
    dumper.schedule(table)
    log.debug("ascend_compile: %s of vLLM's graph: %s", piece_id, ", ".join(table["order"]))
    return table


def register(vllm_config, options=None) -> None:
    """Put ``SharedPieces`` under the platform's pass key (once), with our compile ``options``
    (``options.compile_options_of``: its ``dump_dir`` is where the pieces are dumped); refuse if another
    pass is there."""
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
    config[key] = pass_class()(vllm_config, options)
    if "force_disable_caches" not in config:
        # torch's graph caches refuse graphs with effect tokens (with_effects is not cacheable), and vLLM's
        # compile cache then refuses the piece ("The compiled artifact is not serializable"); a hit would
        # also skip our pass, and with it the dumps
        config["force_disable_caches"] = True
        log.info("ascend_compile: shared layers are scheduled by a pass a cache hit would skip, and sliced layers keep "
                 "their order with effect tokens, which torch's compile caches cannot store: "
                 "inductor_compile_config['force_disable_caches'] = True (every start compiles)")
