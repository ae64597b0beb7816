"""The command line: the demo end to end, and explain on a dump."""

import json
import os
import re
import sys

from ascend_compile import cli
from ascend_compile.debug.dump import GraphDumper
from ascend_compile.passes import PassPipeline, default_passes
from ascend_compile.debug.dump import schedule_table
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
    assert "o_proj.weight: at most 2 layer buffer(s) alive" in out
    table = json.loads((tmp_path / "rank_0" / "schedule.json").read_text())
    assert [c["index"] for c in table["collectives"]] == [0, 1, 2]
    assert set(table["collectives"][0]) >= {"series", "index", "owner", "bytes", "issue", "wait", "first_use"}


def _dump(root, rank, graph_id, reverse=False, k=1):
    p = plan(rank=rank)
    dumper = GraphDumper(str(root), rank, graph_id)
    pipe = PassPipeline(p, default_passes(pin=True), observer=dumper.graph)
    pipe(stack_graph(3, ("o_proj",), k))
    table = schedule_table(p, pipe.final_schedule)
    if reverse:
        table["collectives"] = table["collectives"][::-1]
        for row, pos in zip(table["collectives"], sorted(r["issue"] for r in table["collectives"])):
            row["issue"] = pos
        table["collectives"].sort(key=lambda r: r["issue"])
    dumper.schedule(table)
    return table


def test_explain_is_quiet_on_a_good_dump_and_flags_what_looks_wrong(tmp_path, capsys):
    good = tmp_path / "good"
    for rank in range(2):
        _dump(good, rank, "0_0", k=2)
    assert cli.main(["explain", str(good)]) == 0
    assert "checked 2 graph(s): the same collective order on every rank" in capsys.readouterr().out

    bad = tmp_path / "bad"
    _dump(bad, 0, "0_0")
    _dump(bad, 1, "0_0", reverse=True)  # rank 1's graph issues the same layers in another order
    table = json.loads((bad / "rank_0" / "schedule.json").read_text())
    table["collectives"][2]["issue"] = table["collectives"][2]["first_use"] + 1  # issued after its use
    (bad / "rank_0" / "graph_0_0" / "schedule.json").write_text(json.dumps(table))
    assert cli.main(["explain", str(bad)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"PROBLEM: rank_0/graph_0_0 and rank_1/graph_0_0 fetch the same layers in different orders "
                     r"\(first difference at broadcast 0: o_proj.weight\[0\] owner=0 bytes=256 vs o_proj.weight\[2\]", out), out
    assert "PROBLEM: rank_0/graph_0_0: o_proj.weight[2] is broadcast" in out
    assert "at or after its first use" in out


def test_first_use_is_a_read_of_the_weight_not_an_ordering_edge():
    from ascend_compile.passes.graph import inner_target, positions

    for k in (1, 2):
        p = plan(k=k, pin=True)
        pipe = PassPipeline(p, default_passes(pin=True))
        gm = pipe(stack_graph(4, ("o_proj",), k))
        nodes = list(gm.graph.nodes)
        issues = {r["issue"] for r in pipe.final_schedule}
        for row in pipe.final_schedule:
            use = nodes[row["first_use"]]
            assert row["first_use"] not in issues, f"k={k}: first_use of layer {row['index']} is a broadcast"
            assert row["wait"] < row["first_use"] and row["issue"] < row["wait"]
            wait = nodes[row["wait"]]
            # the user reads the fetched weight (directly or through a view), as an argument
            assert inner_target(use) is not None
            assert wait in use.all_input_nodes or any(wait in a.all_input_nodes for a in use.all_input_nodes)
        assert len(positions(gm.graph)) == len(nodes)


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


def test_demo_with_slices(tmp_path):
    returncode, stdout, stderr = run_command(
        [sys.executable, "-m", "ascend_compile.cli", "demo", "--layers", "2", "--hidden", "256", "--layout", "slices",
         "--dump-dir", str(tmp_path)], timeout=500)
    assert returncode == 0, stdout + stderr
    assert "layout=slices" in stdout and "50.0%" in stdout
    assert re.search(r"decode forward \(2 tokens on rank 0, 1 on the others.*rank 0 \d\.\d+e-0[6-9], rank 1 ", stdout)
    assert "layout=slices  paths=agreed  sliced layers=4  slices path up to 8 tokens" in stdout
    assert "result: OK - sharded model matches the unsharded model" in stdout


def test_plan_at_deepseek_v3_scale(capsys):
    assert cli.main(["plan", "--ranks", "8", "--dtype", "bf16", "--compute-us", "10000"]) == 0
    out = capsys.readouterr().out
    # o_proj: 16384 x 7168 bf16 = 224 MiB per layer, 61 layers, 7/8 of it saved per device
    assert "o_proj        224.0 MiB/layer    13.34 GiB replicated  saved per device   11.68 GiB" in out
    assert "q_b_proj       72.0 MiB/layer" in out
    assert "prefetch_step: k=1" in out and "compute-bound" in out  # 10 ms of compute hides a 5.6 ms transfer


def test_plan_compares_the_layouts_per_step(capsys):
    assert cli.main(["plan", "--device", "a3", "--decode-tokens", "32", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "16 devices, 196 GB/s a link (full mesh)" in out and "20 us per collective" in out
    rows = {int(line.split()[0]): line for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)}
    assert sorted(rows) == [32, 4096]
    assert re.search(r"layout='slices' computes on the slices up to \d+ tokens per rank", out)
    assert cli.main(["plan", "--latency-us", "100000"]) == 0  # collectives this slow: never compute on slices
    assert "computes on the slices up to 0 tokens per rank" in capsys.readouterr().out


def test_plan_rejects_a_bad_series(capsys):
    assert cli.main(["plan", "--series", "o_proj=16384"]) == 2
    assert "use NAME=INxOUT" in capsys.readouterr().err


def test_explain_compares_only_graphs_of_one_sharding(tmp_path, capsys):
    """Two models over the same layer names, one with wrap-around and one without (each with its
    own sharding, so its own order key), fetch in different orders: no deadlock, as the runtime
    check's key says. Under one key the same two orders are a problem."""
    import dataclasses

    for key, expect in (("two", 0), ("one", 1)):
        root = tmp_path / key
        for rank in range(2):
            for graph_id, wrap in (("0_0", 0), ("1_0", 1)):
                p = dataclasses.replace(plan(rank=rank), wrap=(("o_proj.weight", 1),) if wrap else ())
                dumper = GraphDumper(str(root), rank, graph_id)
                pipe = PassPipeline(p, default_passes(pin=False), observer=dumper.graph)
                pipe(stack_graph(3, ("o_proj",), 1, wrap=wrap))
                table = schedule_table(p, pipe.final_schedule)
                table["order_key"] = f"ascend_compile/order/g/{graph_id if key == 'two' else 'same'}"
                dumper.schedule(table)
        assert cli.main(["explain", str(root), "--all-graphs"]) == expect, capsys.readouterr().out
        out = capsys.readouterr().out
        assert ("fetch the same layers in different orders" in out) == bool(expect), out


def test_plan_compares_share_sizes_for_a_deployment_and_recommends_one(capsys):
    args = ["plan", "--dtype", "int8", "--series", "o_proj=16384x7168", "--machines", "4", "--devices-per-machine", "8"]
    assert cli.main(args + ["--memory-goal-gib", "5", "--measured-us", "8=35"]) == 0
    out = capsys.readouterr().out
    assert "share_size for 4 machine(s) x 8 devices (a data-parallel group of 32)" in out
    rows = re.findall(r"^\s+(\d+)\s+(layers|slices)\s+(HCCS|RoCE)\s+(modelled|measured)\s+(\d+\.\d+) GiB", out, re.M)
    assert [(int(k), layout) for k, layout, *_ in rows] == [(k, lay) for k in (2, 4, 8, 16) for lay in ("layers", "slices")]
    assert {(int(k), link, src) for k, _, link, src, _ in rows} == {
        (2, "HCCS", "modelled"), (4, "HCCS", "modelled"), (8, "HCCS", "measured"), (16, "RoCE", "modelled")}
    assert re.search(r"recommended: share_size=(8|16), layout='(layers|slices)': the fastest decode step among those "
                     r"saving >= 5.00 GiB", out), out
    assert "anchor: vLLM-Ascend fine-grained TP of o_proj alone" in out and "5.8 GB per NPU at +1.5 ms TPOT" in out
    assert cli.main(args + ["--memory-goal-gib", "50"]) == 1  # no size saves that much: said, and exit 1
    assert "recommended: no size saves 50.00 GiB per device" in capsys.readouterr().out
    assert cli.main(args + ["--measured-us", "8"]) == 2
    assert "use SIZE=MICROSECONDS" in capsys.readouterr().err
