"""The package's arrows point down: run time never imports compile time, passes never import
what lowers or integrates them (read from the sources, imports inside functions included)."""

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
