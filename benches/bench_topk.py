#!/usr/bin/env python
"""Selection micro-bench: the methods that rank or threshold each delta (ties, breadcrumbs,
della, sce) on a base + 2 fine-tunes folder set (``_common.ensure_model_set``, bf16, deltas
correlated 0.5), page cache warm. Two builds of the package (``--builds NAME=PYTHONPATH,...``;
an empty path means the installed one) run interleaved -- repeat r of every method and build
before repeat r+1 -- each merge in its own process, timed inside it (imports excluded): wall
time and the process's CPU time (all threads). Medians of ``--repeats``; the load average is
printed before and after (the machine may be shared: CPU seconds vary less than wall time).

    PYTHONPATH= python benches/bench_topk.py --builds before=/tmp/mf_base,after= --size 125m
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
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


def one(size: str, method: str, threads) -> dict:
    """One timed merge in this process (the package on sys.path)."""
    import merge_fast as mf

    base, fts = _common.ensure_model_set(size, delta_corr=0.5)
    out = Path(tempfile.mkdtemp(prefix="bench_topk_")) / "out"
    # Builds without durable output have no fsync option (and do not fsync).
    opts = {"fsync": False} if "fsync" in inspect.signature(mf.merge).parameters else {}
    try:
        os.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        mf.merge(method, [str(f) for f in fts], base=str(base), params=METHODS[method], out=str(out),
                 dtype="bfloat16", threads=threads, seed=1, **opts)
        return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def measure(size: str, methods, repeats: int, threads, builds: dict) -> dict:
    base, fts = _common.ensure_model_set(size, delta_corr=0.5)
    _common.warm_page_cache(_common.shard_files(base) + [f for d in fts for f in _common.shard_files(d)])
    res = {"size": size, "load_before": os.getloadavg(), "runs": {b: {m: [] for m in methods} for b in builds}}
    for r in range(repeats):
        for m in methods:
            for b, path in builds.items():
                env = dict(os.environ, PYTHONPATH=path)
                cmd = [sys.executable, __file__, "--one", m, "--size", size]
                if threads:
                    cmd += ["--threads", str(threads)]
                got = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
                res["runs"][b][m].append(got)
                print(f"repeat {r + 1} {m:12s} {b:8s} wall {got['wall']:7.2f}s cpu {got['cpu']:7.2f}s", flush=True)
    res["load_after"] = os.getloadavg()
    return res


def table(res: dict) -> str:
    builds = list(res["runs"])
    head = " | ".join(f"{b} wall (s) | {b} CPU (s)" for b in builds)
    rows = [f"| method | {head} | wall speed-up | CPU speed-up |", "|---" * (1 + 2 * len(builds) + 2) + "|"]
    for m in res["runs"][builds[0]]:
        med = {b: {k: statistics.median(x[k] for x in res["runs"][b][m]) for k in ("wall", "cpu")} for b in builds}
        cells = " | ".join(f"{med[b]['wall']:.2f} | {med[b]['cpu']:.2f}" for b in builds)
        f, l = med[builds[0]], med[builds[-1]]
        rows.append(f"| {m} | {cells} | {f['wall'] / l['wall']:.2f}x | {f['cpu'] / l['cpu']:.2f}x |")
    la = lambda x: "/".join(f"{v:.1f}" for v in x)  # noqa: E731
    rows.append(f"\nsize {res['size']}, medians of {len(next(iter(res['runs'][builds[0]].values())))}; "
                f"load average (1/5/15 min) {la(res['load_before'])} before, {la(res['load_after'])} after")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="125m")
    ap.add_argument("--methods", default="ties,breadcrumbs,della,sce")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--builds", default="installed=", help="NAME=PYTHONPATH,... (empty path: the installed package)")
    ap.add_argument("--json", help="write the measurements here")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.size, a.one, a.threads)))
        return 0
    builds = dict(b.split("=", 1) for b in a.builds.split(","))
    res = measure(a.size, a.methods.split(","), a.repeats, a.threads, builds)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
