"""Lowerings: hand the (rewritten, scheduled) graph to something that runs it.

Each module exposes ``compile(gm, example_inputs, pipeline, options)``; ``pipeline`` is None
when the graph has no shared weights (then the graph passes through unchanged).
NPU code (``torchair``) is imported only when that lowering is chosen.
"""

from __future__ import annotations

import importlib


def get_lowering(name: str):
    return importlib.import_module(f"{__name__}.{name}")
