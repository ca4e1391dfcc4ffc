#!/usr/bin/env python
"""Selection micro-bench: the methods that rank or threshold each delta (ties, breadcrumbs,
della, sce; dare_ties as a control without ranking) on a base + 2 fine-tunes folder set
(``_common.ensure_model_set``, bf16, deltas correlated 0.5), timed in-process (imports
excluded), page cache warm, medians of ``--repeats``. The load average is printed before and
after: the numbers are only comparable between runs on a similarly loaded machine.

Compare two builds by pointing ``PYTHONPATH`` at another copy of the package:

    python benches/bench_topk.py --size 125m --json /tmp/after.json
    PYTHONPATH=/tmp/mf_base python benches/bench_topk.py --size 125m --json /tmp/before.json
    python benches/bench_topk.py --table /tmp/before.json /tmp/after.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

METHODS = {
    "ties": {"density": 0.5, "weight": [0.5, 0.5]},
    "breadcrumbs": {"density": 0.8, "gamma": 0.01, "weight": [0.5, 0.5]},
    "della": {"density": 0.5, "epsilon": 0.1, "weight": [0.5, 0.5]},
    "sce": {"select_topk": 0.5},
    "dare_ties": {"density": 0.5, "weight": [0.5, 0.5]},
}


def measure(size: str, methods, repeats: int, threads) -> dict:
    import merge_fast as mf

    base, fts = _common.ensure_model_set(size, delta_corr=0.5)
    _common.warm_page_cache(_common.shard_files(base) + [f for d in fts for f in _common.shard_files(d)])
    res = {"size": size, "load_before": os.getloadavg(), "build": mf.__file__, "times": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench_topk_"))
    try:
        for m in methods:
            ts = []
            for r in range(repeats):
                out = tmp / f"{m}_{r}"
                os.sync()
                t0 = time.perf_counter()
                mf.merge(m, [str(f) for f in fts], base=str(base), params=METHODS[m], out=str(out),
                         dtype="bfloat16", threads=threads, seed=1)
                ts.append(time.perf_counter() - t0)
                shutil.rmtree(out)
            res["times"][m] = ts
            print(f"{m:12s} median {statistics.median(ts):7.2f}s  runs {['%.2f' % t for t in ts]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    return res


def table(before: dict, after: dict) -> str:
    rows = ["| method | before (s) | after (s) | speed-up |", "|---|---:|---:|---:|"]
    for m, tb in before["times"].items():
        ta = after["times"].get(m)
        if ta:
            b, a = statistics.median(tb), statistics.median(ta)
            rows.append(f"| {m} | {b:.2f} | {a:.2f} | {b / a:.2f}x |")
    la = lambda r: "/".join(f"{x:.1f}" for x in r["load_before"])  # noqa: E731
    rows.append(f"\nsize {after['size']}; load average before the runs: {la(before)} (before), {la(after)} (after)")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="125m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"), help="print a markdown table and exit")
    a = ap.parse_args()
    if a.table:
        print(table(*(json.loads(Path(p).read_text()) for p in a.table)))
        return 0
    res = measure(a.size, a.methods.split(","), a.repeats, a.threads)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
