"""What the backend reads from vLLM: the compile options and dump path of the config being loaded,
and the environment set before vLLM compiles (``prepare``)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from .config import _mode, check_config, settings, uses_our_backend

log = logging.getLogger(__name__)

_LOADED_CONFIG = None  # the config of the model this process loaded (one engine per process)

def compile_options() -> Optional[dict]:
    """Backend options from the current vLLM config, or None outside vLLM (never imports vLLM)."""
    if "vllm.config" not in sys.modules:
        return None
    from vllm.config import get_current_vllm_config

    try:
        vllm_config = get_current_vllm_config()
    except Exception:  # vLLM 0.23 calls the compiler outside its config context: the loader's config
        vllm_config = _LOADED_CONFIG
    if vllm_config is None:
        return None
    return compile_options_of(vllm_config)


def compile_options_of(vllm_config) -> dict:
    """``additional_config["ascend_compile"]["compile"]``, with vLLM's ``debug_dump_path`` as ``dump_dir``."""
    options = dict(settings(vllm_config).get("compile") or {})
    dump = getattr(vllm_config.compilation_config, "debug_dump_path", None)
    if dump and "dump_dir" not in options:
        options["dump_dir"] = os.path.join(str(dump), "ascend_compile")
    return options


def prepare(vllm_config) -> None:
    """Before the model is built: check the config; switch vLLM's AOT compile off when our backend
    compiles (with or without shared weights), unless the user chose.

    vLLM's AOT compile (``VLLM_USE_AOT_COMPILE``, on by default with torch >= 2.10) serialises
    what the backend returns and refuses a callable that is not torch's ``SerializableCallable``;
    ours are not serialisable (they hold a process group and per-rank schedules).
    """
    global _LOADED_CONFIG
    check_config(vllm_config)
    _LOADED_CONFIG = vllm_config
    cc = vllm_config.compilation_config
    if "shared_weight" in settings(vllm_config) and _mode(cc) == 3:
        from . import pieces

        pieces.register(vllm_config, compile_options_of(vllm_config))
    if not uses_our_backend(vllm_config):
        return
    if os.environ.get("VLLM_USE_AOT_COMPILE") is None:
        os.environ["VLLM_USE_AOT_COMPILE"] = "0"
        log.info("ascend_compile: VLLM_USE_AOT_COMPILE=0 (the ascend_compile backend's compiled graphs cannot be "
                 "serialised)")
    elif os.environ["VLLM_USE_AOT_COMPILE"] == "1":
        log.warning("ascend_compile: VLLM_USE_AOT_COMPILE=1 was set by you: vLLM will fail to serialise the graphs "
                    "our backend compiles; unset it or set it to 0")
