#!/usr/bin/env python
"""Ray executor overhead: the ties merge of a base and two fine-tunes (``_common.ensure_model_set``)
run by the local engine, then as Ray tasks on a local Ray cluster of 1 and of 2 worker CPUs
(``ray.init(num_cpus=N)``, one task per CPU, output shards balanced by bytes). Reports wall
time (median of ``--repeats``), Ray's overhead over the local engine (target: <= 10% at
1.1B), each task's peak RSS (worker ``ru_maxrss``), and checks the Ray output is
byte-identical to the local one. Needs ``pip install merge-fast[ray]``.

    python benches/bench_ray.py --size 1.1b --repeats 3
    python benches/bench_ray.py --size tiny --repeats 1     # smoke run, seconds
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1.1b", help="tiny, 125m or 1.1b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="Ray cluster sizes (CPUs) to run")
    ap.add_argument("--shard-size", default="500MB", help="output shard size (tasks split by shard)")
    ap.add_argument("--work", default=None, help="output folder (default: a temp dir next to the data)")
    args = ap.parse_args(argv)

    import ray

    import merge_fast as mf
    from merge_fast.distributed import _RUNNER
    from merge_fast.distributed._ray import RayRunner

    base, fts = C.ensure_model_set(args.size, delta_corr=0.5)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_ray_", dir=C.BENCH_DATA))
    work.mkdir(parents=True, exist_ok=True)
    C.warm_page_cache([*C.shard_files(base), *(f for ft in fts for f in C.shard_files(ft))])

    def merge(out: Path) -> float:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        mf.ties(base, fts, weights=[0.5, 0.5], density=0.5, out=out, max_shard_size=args.shard_size)
        return time.perf_counter() - t0

    local_out = work / "local" / "out"
    local = [merge(local_out) for _ in range(args.repeats)]
    t_local = statistics.median(local)
    print(f"{args.size} ties local: {t_local:.2f} s (runs {', '.join(f'{x:.2f}' for x in local)})")
    for n in [int(x) for x in args.workers.split(",")]:
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
        runner = RayRunner(tasks=n)
        token = _RUNNER.set(runner)
        try:
            out = work / f"ray{n}" / "out"
            runs = [merge(out) for _ in range(args.repeats)]
        finally:
            _RUNNER.reset(token)
            ray.shutdown()
        same = sorted(os.listdir(out)) == sorted(os.listdir(local_out)) and all(
            filecmp.cmp(out / f, local_out / f, shallow=False) for f in os.listdir(local_out))
        t = statistics.median(runs)
        rss = [round(r["peak_rss_mb"]) for r in runner.last["results"]]
        print(f"{args.size} ties ray x{n}: {t:.2f} s (runs {', '.join(f'{x:.2f}' for x in runs)}), "
              f"overhead {100 * (t / t_local - 1):+.1f}% vs local, task peak RSS MB {rss}, "
              f"groups {runner.last['groups']}, byte-identical: {same}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
