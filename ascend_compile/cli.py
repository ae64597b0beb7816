"""``ascend-compile``: run the demo, explain a dump."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys


def _demo(ns) -> int:
    from . import demo

    args = demo.DemoArgs(
        ranks=ns.ranks, layers=ns.layers, series=tuple(ns.series), prefetch_step=ns.prefetch_step,
        lowering=ns.lowering, dtype=ns.dtype, tokens=ns.tokens, dump_dir=ns.dump_dir or "",
    )
    text, ok = demo.report(*demo.run(args))
    print(text)
    return 0 if ok else 1


def _explain(ns) -> int:
    from .debug.dump import format_schedule

    paths = sorted(glob.glob(os.path.join(ns.dump_dir, "rank_*", "schedule.json")))
    if ns.all_graphs:
        paths = sorted(glob.glob(os.path.join(ns.dump_dir, "rank_*", "graph_*", "schedule.json")))
    if not paths:
        print(f"no rank_*/schedule.json under {ns.dump_dir!r}: compile with options={{'dump_dir': ...}} "
              "or ASCEND_COMPILE_DUMP=dir first", file=sys.stderr)
        return 2
    for p in paths:
        with open(p) as f:
            table = json.load(f)
        print(f"== {os.path.relpath(p, ns.dump_dir)}")
        print(format_schedule(table))
        print()
    return 0


def main(argv=None) -> int:
    from .config import LOWERINGS
    from .demo import DTYPES

    parser = argparse.ArgumentParser(prog="ascend-compile", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="shard + compile a DeepSeek-shaped stack on CPU ranks and check it")
    d.add_argument("--ranks", type=int, default=2)
    d.add_argument("--layers", type=int, default=8)
    d.add_argument("--series", nargs="+", default=["o_proj", "q_b_proj"])
    d.add_argument("--prefetch-step", type=int, default=1)
    d.add_argument("--lowering", choices=[x for x in LOWERINGS if x != "torchair"], default="inductor")
    d.add_argument("--dtype", choices=DTYPES, default="float32")
    d.add_argument("--tokens", type=int, default=16)
    d.add_argument("--dump-dir", default=None, help="where to write the graph dumps (default: a temp dir)")
    d.set_defaults(fn=_demo)

    e = sub.add_parser("explain", help="print the collective schedule of a dump directory")
    e.add_argument("dump_dir")
    e.add_argument("--all-graphs", action="store_true", help="every compiled graph, not only the latest")
    e.set_defaults(fn=_explain)

    ns = parser.parse_args(argv)
    return ns.fn(ns)


if __name__ == "__main__":
    sys.exit(main())
