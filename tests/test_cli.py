"""The command line: the demo end to end, and explain on a dump."""

import json
import os
import re
import sys

from ascend_compile import cli
from ascend_compile.debug.dump import GraphDumper
from ascend_compile.passes import PassPipeline, default_passes
from ascend_compile.backend import schedule_table
from graphs import plan, stack_graph
from ranks import run_command


def test_explain_prints_the_schedule_of_every_rank(tmp_path, capsys):
    for rank in range(2):
        p = plan(rank=rank)
        dumper = GraphDumper(str(tmp_path), rank, "0_0")
        pipe = PassPipeline(p, default_passes(pin=False), observer=dumper.graph)
        pipe(stack_graph(3, ("o_proj",), 1))
        dumper.schedule(schedule_table(p, pipe.final_schedule))
    assert cli.main(["explain", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rank 0 / world 2  prefetch_step=1  collectives=3" in out
    assert "rank 1 / world 2" in out
    assert "o_proj.weight: at most 2 window(s) alive" in out
    table = json.loads((tmp_path / "rank_0" / "schedule.json").read_text())
    assert [c["index"] for c in table["collectives"]] == [0, 1, 2]
    assert set(table["collectives"][0]) >= {"series", "index", "owner", "bytes", "issue", "wait", "first_use"}


def test_explain_without_dump_says_how_to_make_one(tmp_path, capsys):
    assert cli.main(["explain", str(tmp_path)]) == 2
    assert "compile with options={'dump_dir': ...}" in capsys.readouterr().err


def test_demo_runs_and_checks_itself(tmp_path):
    trace = tmp_path / "trace"
    returncode, stdout, stderr = run_command(
        [sys.executable, "-m", "ascend_compile.cli", "demo", "--layers", "4", "--lowering", "aot_eager",
         "--dump-dir", str(tmp_path)],
        timeout=500, env=dict(os.environ, TORCH_TRACE=str(trace)),
    )
    assert returncode == 0, stdout + stderr
    assert "result: OK - sharded model matches the unsharded model" in stdout
    assert "50.0%" in stdout  # half of the series bytes freed on each of 2 ranks
    assert (tmp_path / "rank_1" / "schedule.json").exists()
    # the same dumps reach torch's structured trace (what tlparse reads), from every rank
    logs = list(trace.iterdir())
    assert len(logs) >= 2
    for log in logs:
        text = log.read_text()
        assert re.search(r'"name": "ascend_compile_graph_\d+_\d+_02_prefetch\.after"', text)
        assert re.search(r'"name": "ascend_compile_graph_\d+_\d+_schedule", "encoding": "json"', text)


def test_plan_at_deepseek_v3_scale(capsys):
    assert cli.main(["plan", "--ranks", "8", "--dtype", "bf16", "--compute-us", "10000"]) == 0
    out = capsys.readouterr().out
    # o_proj: 16384 x 7168 bf16 = 224 MiB per layer, 61 layers, 7/8 of it saved per device
    assert "o_proj        224.0 MiB/layer    13.34 GiB replicated  saved per device   11.68 GiB" in out
    assert "q_b_proj       72.0 MiB/layer" in out
    assert "prefetch_step: k=1" in out and "compute-bound" in out  # 10 ms of compute hides a 5.6 ms transfer


def test_plan_rejects_a_bad_series(capsys):
    assert cli.main(["plan", "--series", "o_proj=16384"]) == 2
    assert "use NAME=INxOUT" in capsys.readouterr().err
