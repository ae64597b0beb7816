"""Timing device work by waiting for it (``runtime/timing.py``): on a device a call only queues work,
so a clock around the call alone measures its launch. A stand-in device whose work completes at
``synchronize`` shows the difference."""

import json
import os
import subprocess
import sys
import time

import torch

from ascend_compile.runtime import timing
from ranks import run_fresh

QUEUED = 0.05  # seconds of device work each call queues on the stand-in device


class StandinDevice:
    """``torch.<type>`` of a device whose calls return at once and whose work runs at ``synchronize``."""

    type = "standin"

    def __init__(self):
        self.pending = 0.0

    def launch(self, seconds: float) -> None:
        self.pending += seconds

    def synchronize(self) -> None:
        time.sleep(self.pending)
        self.pending = 0.0


def test_time_call_waits_for_the_work_not_its_launch(monkeypatch):
    device = StandinDevice()
    monkeypatch.setattr(torch, "standin", device, raising=False)
    call = lambda: device.launch(QUEUED)  # noqa: E731
    start = time.perf_counter()
    call()
    launch = time.perf_counter() - start
    assert launch < QUEUED / 5  # what a clock around the call alone measures
    assert time_call_seconds(call, device) >= QUEUED * 0.9
    timing.synchronize("cpu")  # nothing to wait for, no error
    try:
        timing.synchronize("nodevice")
    except RuntimeError as e:
        assert "torch.nodevice.synchronize does not exist" in str(e)
    else:
        raise AssertionError("an unknown device type was timed without waiting for it")


def time_call_seconds(call, device):
    return timing.time_call(call, device, reps=3)


def _measure_on_a_slow_device(rank, world):
    """``slice_measure.measure_paths`` with a slices path whose work is queued on a stand-in device: the
    slices path's costs must include that work, so it must not win."""
    import ascend_compile as ac
    from ascend_compile.runtime import slice_measure
    from ascend_compile.runtime.groups import group_from_name

    device = StandinDevice()
    torch.standin = device
    real_decode = slice_measure.decode_linear
    real_sync = timing.synchronize

    def decode_linear(*args, **kwargs):  # returns at once; its work completes at synchronize
        device.launch(QUEUED)
        return real_decode(*args, **kwargs)

    slice_measure.decode_linear = decode_linear
    timing.synchronize = lambda d: device.synchronize()  # the model's device is the stand-in
    try:
        from ascend_compile.models import StackShape, build_stack

        model = build_stack(StackShape(layers=2))
        plan = ac.shard_model(model, ac.SharedWeightConfig(layers=["o_proj", "q_b_proj"], layout="slices",
                                                           decode_tokens=0))
        state = ac.runtime.state.of_model(model).slices
        layers = list(zip(state.layers, state.modules))
        costs = slice_measure.measure_paths(group_from_name(plan.group_name), layers, 1, reps=1)
    finally:
        slice_measure.decode_linear, timing.synchronize = real_decode, real_sync
        del torch.standin
    return {"slices": costs["slices"], "threshold": slice_measure.choose_threshold(costs)[0]}


def test_decode_threshold_measures_the_work_of_a_device_that_queues_it():
    for r in run_fresh(_measure_on_a_slow_device, 2, timeout=180):
        # two series, one decode_linear each per candidate: each queued QUEUED of work
        assert min(r["slices"].values()) >= 2 * QUEUED * 0.9, r["slices"]
        assert r["threshold"] == 0  # the slow slices path never wins


def test_decode_benchmark_runs_under_torchrun_on_the_process_groups_backend(tmp_path):
    """The runbook's step on a device: ``torchrun ... benchmarks/decode.py --device npu --backend hccl``.
    Here the same path with gloo on the CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", os.path.join(root, "benchmarks", "decode.py"),
                           "--device", "cpu", "--backend", "gloo", "--lowering", "aot_eager", "--hidden", "64", "--layers", "2",
                           "--rounds", "1",
                           "--configs", "replicated", "slices", "slices by shape", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("== hidden 64") == 1  # rank 0 reports
    assert "slices by shape" in proc.stdout
    report = json.loads((tmp_path / "decode.json").read_text())["sizes"]["64"]
    # the agreed path and the path fixed by the padded size: the same numbers, the same path
    assert report["paths"] == {"decode slices": "slices", "decode slices by shape": "slices (by shape)",
                               "prefill slices": "gather", "prefill slices by shape": "gather (by shape)"}
    assert max(report["max_rel_diff"].values()) <= 1e-5, report["max_rel_diff"]
    for phase in ("decode", "prefill"):  # the agreement's cost per forward, measured in the same run
        assert "agreement_ms_per_forward" in report["phases"][phase]
        assert f"{phase}: the in-op agreement costs" in proc.stdout
