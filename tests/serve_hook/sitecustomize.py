"""TEST HARNESS ONLY, not part of ascend_compile: on ``PYTHONPATH``, gives vLLM 0.23's CPU
communicator the variable-size collectives its data-parallel MoE dispatch calls
(``all_gatherv`` / ``reduce_scatterv``, implemented only for CUDA and XPU), in every Python
process, the engine cores and workers vLLM spawns included (fresh interpreters that inherit
``PYTHONPATH`` and run ``sitecustomize`` again). Nothing is imported here: the patch is applied
right after ``vllm.distributed.device_communicators.cpu_communicator`` is first imported."""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_TARGET = "vllm.distributed.device_communicators.cpu_communicator"
_HERE = os.path.dirname(os.path.abspath(__file__))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            if _HERE not in sys.path:
                sys.path.append(_HERE)
            import cpu_vcollectives  # next to this file

            cpu_vcollectives.patch(module.CpuCommunicator)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _PatchAfterImport())

# chain to a sitecustomize later on sys.path, which this one shadows
_next = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _HERE])
if _next is not None and _next.loader is not None:
    _next.loader.exec_module(importlib.util.module_from_spec(_next))
