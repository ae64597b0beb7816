"""Predicates and small helpers shared by the passes (kept here once, imported everywhere).

Nodes this project creates carry ``node.meta["ascend_compile"]`` =
``{"role": "issue" | "wait" | "next" | "buffer", "series", "index", "owner", "bytes", "window"}`` so
later passes, the verifier and the dumps can find them even after a lowering wrapped them
(``control_deps``). ``"next"`` is the broadcast of a layer for the next forward (wrap-around);
``"window": True`` marks the issue/wait of a layer that comes from a window (runtime/windows.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional

import torch
from torch import fx

from ..runtime.marker import Marker
from ..runtime.ops import shared_weight_targets
from ..runtime.slices import sliced_targets
from ..runtime.windows import window_targets

TAG = "ascend_compile"
ISSUE, WAIT, NEXT, BUFFER = "issue", "wait", "next", "buffer"

_c10d = torch.ops._c10d_functional
_windows = window_targets()
BROADCAST_TARGETS = (_c10d.broadcast, _c10d.broadcast.default, _c10d.broadcast_, _c10d.broadcast_.default,
                     _windows["fetch"])
WAIT_TARGETS = (_c10d.wait_tensor, _c10d.wait_tensor.default, _windows["wait"])
NEXT_TARGETS = (_windows["next"],)

# Ops that only re-view their input: a weight's window is alive while any of these is used.
VIEW_TARGETS = {
    torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.transpose.int,
    torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.expand.default,
    torch.ops.aten.reshape.default, torch.ops.aten.alias.default, torch.ops.aten.as_strided.default,
}


@dataclasses.dataclass(frozen=True)
class MarkerArgs(Marker):
    """A marker node's ``Marker`` and the node of the weight it reads."""

    weight: Optional[fx.Node] = None


def _control_deps():
    try:
        from torch._inductor.fx_passes.control_dependencies import control_deps
    except ImportError:  # pragma: no cover - older torch
        return None
    return control_deps


def inner_target(node: fx.Node):
    """The op a node runs, looking through a ``control_deps`` wrapper."""
    cd = _control_deps()
    if cd is not None and node.op == "call_function" and node.target is cd:
        sub = node.args[1]
        gm = getattr(node.graph.owning_module, sub.target) if isinstance(sub, fx.Node) else sub
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        return calls[0].target if len(calls) == 1 else None
    return node.target if node.op == "call_function" else None


def is_view(node: fx.Node) -> bool:
    """The node only re-views its input (``t``, ``view``, ``unsqueeze``, ``slice``, ...): it reads
    the same memory and runs no kernel of its own. Known views, plus any aten op whose schema
    says its output aliases an input without writing it."""
    target = inner_target(node)
    if target in VIEW_TARGETS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        returns = target._schema.returns
        return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    return False


def is_marker(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in shared_weight_targets()


def is_sliced(node: fx.Node) -> bool:
    """A call of ``sliced_linear`` (``layout="slices"``), bare or inside AOTAutograd's ``with_effects``."""
    if node.op != "call_function":
        return False
    if node.target in sliced_targets():
        return True
    return getattr(node.target, "__name__", "") == "with_effects" and len(node.args) > 1 \
        and node.args[1] in sliced_targets()


def sliced_layers(graph: fx.Graph) -> list:
    """``[(series, index, group_name, generation)]`` of the sliced layers a graph calls, in graph order."""
    out = []
    for n in graph.nodes:
        if is_sliced(n):
            args = n.args[2:] if n.target not in sliced_targets() else n.args
            out.append(tuple(args[3:7]))
    return out


def sliced_token_counts(graph: fx.Graph) -> list:
    """The token count of each sliced layer's input, in graph order (as ``sliced_layers``): an int
    where the graph's shapes are static (a compiled or captured size), None where it varies."""
    out = []
    for n in graph.nodes:
        if is_sliced(n):
            x = (n.args[2:] if n.target not in sliced_targets() else n.args)[0]
            meta = x.meta if isinstance(x, fx.Node) else {}
            shape = getattr(meta.get("example_value", meta.get("val")), "shape", None)
            static = shape is not None and all(isinstance(d, int) for d in shape[:-1])
            out.append(math.prod(shape[:-1]) if static else None)
    return out


def marker_args(node: fx.Node) -> MarkerArgs:
    weight, marker = Marker.from_call(node.args, node.kwargs)
    return MarkerArgs(weight=weight, **dataclasses.asdict(marker))


def is_broadcast(node: fx.Node) -> bool:
    return inner_target(node) in BROADCAST_TARGETS


def is_wait(node: fx.Node) -> bool:
    return inner_target(node) in WAIT_TARGETS


def is_next(node: fx.Node) -> bool:
    return inner_target(node) in NEXT_TARGETS


def tag(node: fx.Node) -> Optional[dict]:
    return node.meta.get(TAG)


def role(node: fx.Node) -> Optional[str]:
    t = tag(node)
    return t["role"] if t else None


def is_ours(node: fx.Node) -> bool:
    return tag(node) is not None


def layer_key(node: fx.Node) -> tuple:
    t = tag(node)
    return (t["series"], t["index"])


def describe(node: fx.Node) -> str:
    t = tag(node)
    where = f" ({t['role']} of {t['series']}[{t['index']}])" if t else ""
    return f"node {node.name!r}{where}"


def positions(graph: fx.Graph) -> dict:
    return {n: i for i, n in enumerate(graph.nodes)}


def reads(user: fx.Node, node: fx.Node) -> bool:
    """``user`` reads ``node``'s value; a ``control_deps`` node that takes it only as an ordering
    dependency (its first argument) does not, nor does a ``window_prefetch`` placed after it."""
    if role(user) == NEXT and user.op == "call_function" and user.target in NEXT_TARGETS:
        return user.args[0] is node  # its second argument only orders it after that weight's wait
    cd = _control_deps()
    if cd is not None and user.op == "call_function" and user.target is cd:
        inputs: list = []
        fx.node.map_arg((user.args[2:], user.kwargs), inputs.append)
        return node in inputs
    return True


def value_users(node: fx.Node) -> list:
    """Users of ``node`` and, transitively, of views of it: everything that reads its memory
    (ordering-only dependencies excluded)."""
    out, todo = [], [u for u in node.users if reads(u, node)]
    while todo:
        u = todo.pop()
        out.append(u)
        if is_view(u):
            todo.extend(v for v in u.users if reads(v, u))
    return out


def first_user(node: fx.Node, pos: dict) -> Optional[fx.Node]:
    users = [u for u in node.users if reads(u, node)]
    return min(users, key=pos.__getitem__) if users else None


def collective_pairs(graph: fx.Graph) -> dict:
    """``{(series, index): {"issue": node, "wait": node[, "next": node]}}`` for every tagged collective."""
    pairs: dict = {}
    for n in graph.nodes:
        t = tag(n)
        if t and t["role"] in (ISSUE, WAIT, NEXT):
            pairs.setdefault((t["series"], t["index"]), {})[t["role"]] = n
    return pairs


def entry_point(graph: fx.Graph) -> fx.Node:
    """The last node that is an input (placeholder / get_attr) at the head of the graph."""
    last = None
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            last = n
        else:
            break
    if last is None:
        raise ValueError("graph has no inputs; nothing to schedule")
    return last


def nodes_between(a: fx.Node, b: fx.Node) -> Iterable[fx.Node]:
    n = a.next
    while n is not b and n.op != "root":
        yield n
        n = n.next
