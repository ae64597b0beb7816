"""share_size: blocks of the group share among themselves. 4 gloo ranks in blocks of 2: outputs equal
to the unsharded model in both layouts, each rank keeps what its block saves, no collective crosses
blocks (the blocks run different forwards), a rank that stops fails its block only, and the
refusals name the sizes that work."""

import os
import re

import pytest
import torch
import torch.distributed as dist

import ascend_compile as ac
from ascend_compile import cli
from ascend_compile.config import ConfigError
from ascend_compile.models import StackShape, build_stack, make_input
from ascend_compile.runtime import blocks, groups, state
from ranks import run_fresh, run_ranks

SERIES = ["o_proj", "q_b_proj"]


def _blocks_case(rank, world, layout, share_size, dump):
    """Shard over 4 ranks in blocks of 2; block 0 runs 2 forwards, block 1 runs 3 of other sizes
    (a collective that crossed blocks would hang). The default device is meta: a tensor that does not
    take the model's device fails."""
    torch._dynamo.reset()
    if share_size == "machine":
        os.environ["LOCAL_WORLD_SIZE"] = "2"  # what torchrun sets with 2 ranks a machine
    try:
        shape = StackShape(layers=4)
        ref, model = build_stack(shape), build_stack(shape)
        before = ac.parameter_storage_bytes(model)
        cfg = ac.SharedWeightConfig(layers=SERIES, layout=layout, share_size=share_size,
                                    **({"decode_tokens": 4} if layout == "slices" else {}))
        with torch.device("meta"):
            plan = ac.shard_model(model, cfg)
    finally:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
    after = ac.parameter_storage_bytes(model)
    ours = groups.group_from_name(plan.group_name)
    fn = torch.compile(model, backend="ascend_compile", options={"lowering": "aot_eager", "dump_dir": dump}, dynamic=False)
    tokens = [3, 16] if rank < 2 else [2, 16, 5]
    forwards = []
    for i, n in enumerate(tokens):
        x = make_input(shape, tokens=n, seed=10 * plan.block + i)  # the same input within a block
        want = ref(x)
        with torch.device("meta"):
            got = fn(x) if i else model(x)  # the first eagerly, the rest compiled
        forwards.append({"bitwise": torch.equal(got, want), "max_diff": (got - want).abs().max().item(),
                         "device": str(got.device),
                         "path": state.of_model(model).slices.path if layout == "slices" else None})
    return {"block": plan.block, "blocks": plan.blocks, "rank": plan.rank, "world": plan.world_size,
            "group": plan.group_name, "members": dist.get_process_group_ranks(ours), "saved": before - after,
            "planned": plan.saved_bytes(), "series": plan.series_bytes(), "forwards": forwards}


@pytest.mark.parametrize("layout,share_size", [("layers", 2), ("slices", "machine")])
def test_blocks_of_two_equal_the_unsharded_model_and_keep_their_blocks_memory(layout, share_size, tmp_path, capsys):
    results = run_ranks(_blocks_case, 4, layout, share_size, str(tmp_path))
    assert [r["block"] for r in results] == [0, 0, 1, 1]
    assert [r["rank"] for r in results] == [0, 1, 0, 1]
    assert {(r["blocks"], r["world"]) for r in results} == {(2, 2)}
    assert [r["members"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert results[0]["group"] == results[1]["group"] != results[2]["group"] == results[3]["group"]
    for rank, r in enumerate(results):
        # half of every series: what a block of 2 saves (the whole group of 4 would save 3/4); a stand-in
        # keeps one element
        assert r["planned"] == r["series"] // 2 and 0 <= r["planned"] - r["saved"] <= 4 * 4, (rank, r)
        assert len(r["forwards"]) == (2 if rank < 2 else 3)
        for f in r["forwards"]:
            assert f["device"] == "cpu"
            if layout == "layers":  # the owner's bytes, broadcast: bitwise
                assert f["bitwise"], (rank, f)
            else:  # the slices sum partial products in another order
                assert f["max_diff"] <= 1e-5, (rank, f)
    # explain names each rank's block; the blocks' graphs are never compared with each other's
    assert cli.main(["explain", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for rank in range(4):
        assert re.search(rf"== rank_{rank}/schedule.json\nrank {rank % 2} / world 2 \(global ranks "
                         rf"\[{rank // 2 * 2}, {rank // 2 * 2 + 1}\]\)", out), out
    if layout == "slices":  # a block agrees on its path alone: block 1's 5 tokens gather, block 0's 3 do not
        assert [f["path"] for f in results[2]["forwards"]] == ["slices", "gather", "gather"]
        assert [f["path"] for f in results[0]["forwards"]] == ["slices", "gather"]


def _stopping_block_case(rank, world):
    """Rank 3 dies inside its second forward; rank 2 (its block) must fail naming it; block 0 then runs
    forwards of its own and stays right."""
    torch._dynamo.reset()
    shape = StackShape(layers=4)
    ref, model = build_stack(shape), build_stack(shape)
    ac.shard_model(model, ac.SharedWeightConfig(layers=SERIES, prefetch_step=1, share_size=2, timeout=60))
    store = dist.distributed_c10d._get_default_store()
    x = make_input(shape, tokens=4)
    model(x)
    if rank == 3:
        model.layers[2].register_forward_pre_hook(lambda *_: os._exit(9))
        model(x)
        return "not reached"
    if rank == 2:
        try:
            model(x)
            msg = "no error"
        except ac.PeerError as e:
            msg = str(e)
        store.set("block 1 failed", "1")
        return msg
    store.wait(["block 1 failed"])  # block 0 goes on after its neighbour block failed
    outs = [torch.equal(model(make_input(shape, tokens=n, seed=n)), ref(make_input(shape, tokens=n, seed=n)))
            for n in (2, 7)]
    return outs


def test_a_rank_that_stops_fails_its_own_block_only():
    results = run_fresh(_stopping_block_case, 4, timeout=240, allow_dead=True)
    assert results[3] == ("died", 9)
    status, msg = results[2]
    assert status == "ok", results[2]
    assert re.search(r"the broadcast of (o_proj|q_b_proj)\.(weight|bias)\[\d\] from rank \d over process group", msg), msg
    for rank in (0, 1):
        assert results[rank] == ("ok", [True, True]), results[rank]


def _refusal_case(rank, world, case):
    kwargs = {"layers": SERIES}
    if case == "size 3":
        kwargs["share_size"] = 3
    elif case == "sizes differ":
        kwargs["share_size"] = 2 if rank == 0 else 4
    elif case == "machine spans":  # LOCAL_WORLD_SIZE says 4 a machine, but ranks 2, 3 report another host
        kwargs.update(share_size="machine", ranks_per_machine=4)
        blocks.machine_name = lambda: "host-a" if rank < 2 else "host-b"
    elif case == "no launcher":
        kwargs["share_size"] = "machine"
    try:
        ac.shard_model(build_stack(StackShape(layers=4)), ac.SharedWeightConfig(**kwargs))
    except (ConfigError, ac.RankMismatchError) as e:
        return type(e).__name__, str(e)
    return "no error", ""


@pytest.mark.parametrize("case,error,pattern", [
    ("size 3", "ConfigError", r"share_size=3 does not divide the 4 ranks of process group '\w+': use one of \[2, 4\]"),
    ("sizes differ", "RankMismatchError", r"sharding plan .* at blocks: 2 vs 1"),
    ("machine spans", "ConfigError",
     r"block 0 \(global ranks \[0, 1, 2, 3\]\) runs on machines \['host-a', 'host-b'\].*Sizes whose blocks each stay "
     r"on one machine: \[2\]"),
    ("no launcher", "ConfigError", r"share_size='machine' needs to know which ranks run on one machine"),
])
def test_share_sizes_that_do_not_fit_are_refused_on_every_rank(case, error, pattern):
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    results = run_fresh(_refusal_case, 4, case, timeout=240) if case == "machine spans" else \
        run_ranks(_refusal_case, 4, case)
    for rank, (name, msg) in enumerate(results):
        assert name == error, (rank, name, msg)
        assert re.search(pattern, msg, re.S), (rank, msg)


def test_blocks_split_consecutive_ranks_and_name_the_sizes_that_fit():
    assert blocks.split(range(8), 4).members == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert blocks.split([1, 3, 5, 7], None).members == ((1, 3, 5, 7),)
    # a data-parallel group of TP rank 1 (TP=2, 4 ranks a machine): its ranks 1, 3 on machine 0, 5, 7 on 1
    assert blocks.split([1, 3, 5, 7], "machine", per_machine=4).members == ((1, 3), (5, 7))
    with pytest.raises(ConfigError, match=r"share_size=4 does not divide the 6 ranks .* use one of \[2, 3, 6\]"):
        blocks.split(range(6), 4)
    with pytest.raises(ConfigError, match=r"not spread evenly .* machines \[0, 0, 0, 1, 1, 1, 2, 2\]"):
        blocks.split(range(8), "machine", per_machine=3)
    with pytest.raises(ConfigError, match=r"one rank on each machine, so there is nothing to share"):
        blocks.split([0, 2, 4, 6], "machine", per_machine=2)
    assert blocks.sizes_within_machines(["a", "a", "b", "b", "c", "c", "d", "d"]) == [2]
    with pytest.raises(ConfigError, match=r"share_size must be an int >= 2"):
        ac.SharedWeightConfig(layers=["o_proj"], share_size=1)


def test_the_runbooks_collective_benchmark_feeds_the_planner(tmp_path, capsys):
    """docs/npu_runbook.md's share_size step, on gloo: per-size collective costs, then ``plan`` with them."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "4",
                           os.path.join(root, "benchmarks", "collectives.py"), "--bytes", "65536", "--reps", "3",
                           "--sizes", "2", "3", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+(\d+\.\d) us\s+(\d+\.\d) us", proc.stdout, re.M)
    assert [int(k) for k, _, _ in rows] == [2, 4], proc.stdout  # 3 does not divide 4 ranks
    line = re.search(r"^ascend-compile plan (--measured-us 2=\d+ 4=\d+)$", proc.stdout, re.M)
    assert line, proc.stdout
    args = line.group(1).split()
    assert cli.main(["plan", "--machines", "1", "--devices-per-machine", "4", *args]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s+2\s+layers\s+HCCS\s+measured", out, re.M) and re.search(r"^\s+4\s+slices\s+HCCS\s+measured", out, re.M)


def test_machine_size_comes_from_torchrun_before_local_world_size(monkeypatch):
    # vLLM's CPU platform rewrites LOCAL_WORLD_SIZE to the TP size: torchrun's own count comes first
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert blocks.ranks_per_machine() == 4
    assert blocks.ranks_per_machine(8) == 8  # SharedWeightConfig(ranks_per_machine=8)
    monkeypatch.delenv("GROUP_WORLD_SIZE")
    assert blocks.ranks_per_machine() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert blocks.ranks_per_machine() is None
