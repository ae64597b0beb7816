"""The package's layout, read from the sources (imports inside functions included): the arrows point
down (run time never imports compile time, passes never import what lowers or integrates them), no
two modules import each other, each run-time module holds one concern, says which in its opening
line and stays under 400 lines, and run-time state lives in one place (``runtime/state.py``)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ascend_compile"


def imported(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> set:
    """The parts of the package a module imports, by their first name under it (``passes``, ...)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; an __init__'s is its own
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + [node.module])] if node.module else [".".join(base + [a.name]) for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            dotted = name.split(".")
            if dotted[0] == root.name and len(dotted) > 1:
                out.add(dotted[1])
    return out


@pytest.mark.parametrize("sub, forbidden", [
    ("runtime", {"passes", "lowering", "integrations", "backend", "debug"}),
    ("passes", {"integrations", "lowering", "backend"}),
])
def test_imports_point_down(sub, forbidden):
    found = {str(p.relative_to(PACKAGE)): sorted(imported(p) & forbidden) for p in sorted((PACKAGE / sub).rglob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_check_sees_upward_imports(tmp_path):
    root = tmp_path / "ascend_compile"
    (root / "runtime").mkdir(parents=True)
    module = root / "runtime" / "comm.py"
    module.write_text("from . import ops\nfrom .ops import x\n\ndef late():\n    from ..passes import graph\n"
                      "    import ascend_compile.lowering.inductor\n    from .. import backend\n")
    assert imported(module, root) == {"runtime", "passes", "lowering", "backend"}
    init = root / "runtime" / "__init__.py"
    init.write_text("from .comm import late\nfrom ..debug import dump\n")
    assert imported(init, root) == {"runtime", "debug"}


def test_the_marker_schema_is_marker_s_fields():
    """``Marker`` is the marker's schema; the op's signature and the torchair converter's must
    say the same (the op's is what torch.library reads, the converter's what torchair binds)."""
    import dataclasses
    import inspect

    import torch

    from ascend_compile.lowering import torchair as lowering
    from ascend_compile.runtime.marker import Marker

    fields = [f.name for f in dataclasses.fields(Marker)]
    schema = [a.name for a in torch.ops.ascend_compile.shared_weight.default._schema.arguments]
    assert schema == ["w"] + fields
    source = inspect.getsource(lowering.register_converters)
    spelled = source.split("def convert_shared_weight(")[1].split(")")[0]
    names = [p.split("=")[0].strip() for p in spelled.replace("\n", " ").split(",")]
    assert names == ["w"] + fields + ["meta_outputs"]
    weight, marker = Marker.from_call(("w", "o_proj.weight", 3, 1, "g", 2), {"generation": 5})
    assert weight == "w" and marker == Marker("o_proj.weight", 3, 1, "g", 2, generation=5)


def test_the_vllm_integration_knows_which_vllm_it_patches():
    from ascend_compile.integrations.vllm import vllm_version_problem

    for version in ("0.23.0", "0.23.0+cpu", "0.23.1rc1"):
        assert vllm_version_problem(version) is None, version
    for version in ("0.22.1", "0.24.0", "1.0.0", "unknown"):
        assert f"this is vLLM {version}: its shared weights are not installed" in vllm_version_problem(version)


def test_the_vllm_integration_checks_vllm_ascends_version_beside_vllms():
    from ascend_compile.integrations.vllm.patches import vllm_version_problem

    for ascend in (None, "0.23.0", "0.23.0rc2"):
        assert vllm_version_problem("0.23.0", ascend) is None, ascend
    for ascend in ("0.22.0", "0.24.0rc1", "0.12.0"):
        problem = vllm_version_problem("0.23.0", ascend)
        assert f"this is vLLM-Ascend {ascend}: its shared weights are not installed" in problem
        assert "written against vLLM-Ascend 0.23.x" in problem


def module_imports(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> set:
    """The package's modules a module imports (dotted names; ``from . import x`` is module ``x`` when
    there is one, else the package)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                is_module = (root.parent / sub.replace(".", "/")).with_suffix(".py").exists() or \
                    (root.parent / sub.replace(".", "/") / "__init__.py").exists()
                out.add(sub if is_module else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] == root.name}


def _module_name(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles(root: pathlib.Path = PACKAGE) -> list:
    """Pairs of modules that import each other (a package's ``__init__`` importing its own modules
    is how a package exposes them, and does not count)."""
    graph = {_module_name(p, root): module_imports(p, root) for p in root.rglob("*.py")}
    pairs = []
    for a, imports in sorted(graph.items()):
        for b in sorted(imports):
            if a < b and a in graph.get(b, ()) and not (b.startswith(a + ".") or a.startswith(b + ".")):
                pairs.append((a, b))
    return pairs


def test_no_two_modules_import_each_other():
    assert import_cycles() == []


def test_the_cycle_check_sees_a_cycle_through_a_late_import(tmp_path):
    root = tmp_path / "ascend_compile"
    (root / "runtime").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "runtime" / "__init__.py").write_text("from . import ops\n")
    (root / "runtime" / "ops.py").write_text("from . import windows\n")
    (root / "runtime" / "windows.py").write_text("def late():\n    from .ops import x\n")
    assert import_cycles(root) == [("ascend_compile.runtime.ops", "ascend_compile.runtime.windows")]


RUNTIME = sorted(p for p in (PACKAGE / "runtime").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", RUNTIME, ids=[p.name for p in RUNTIME])
def test_a_runtime_module_holds_one_concern_said_in_its_opening_line(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()[0]) > 20, f"{path.name}: no opening line saying what it is for"
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{path.name} has {lines} lines: split it by concern"


def module_state(path: pathlib.Path) -> list:
    """Names a module binds at its top level to a mutable container (dict, list, set, deque)."""
    mutable = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
    out = []
    for node in ast.parse(path.read_text()).body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        call = isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in (
            "dict", "list", "set", "deque", "defaultdict", "OrderedDict")
        if isinstance(value, mutable) or call:
            out += [t.id for t in targets if isinstance(t, ast.Name) and not t.id.startswith("__")]
    return out


def test_run_time_state_lives_in_one_place():
    """A sharding's run-time state is its ``state.Sharding``; the one table is ``state._LIVE`` (the ops,
    called with plain values, find their sharding there)."""
    found = {p.name: module_state(p) for p in RUNTIME}
    assert {k: v for k, v in found.items() if v} == {"state.py": ["_LIVE"]}
    probe = PACKAGE.parent / "probe_state.py"
    try:
        probe.write_text("_STATES: dict = {}\nNAMES = ('a',)\n_cache = dict()\n__all__ = ['x']\n")
        assert module_state(probe) == ["_STATES", "_cache"]  # a tuple cannot grow; __all__ is not state
    finally:
        probe.unlink()
