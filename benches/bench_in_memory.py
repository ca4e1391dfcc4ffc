#!/usr/bin/env python
"""Read-once for methods that read a tensor twice (issue 11): model_stock, slerp and ties of a
1.1B base and two fine-tunes (``_common.ensure_model_set``, cached), run by the engine with the
plan's ``in_memory_budget`` at 0 (every tensor streamed twice, the behaviour before) and at
the default 256 MB (tensors that fit read once), against the I/O floor of the same inputs
and output size (``_common.io_floor``: read every input byte once, write the output; page
cache warm, no fsync on either side: the merges run with ``fsync`` off here). Medians of
``--repeats``; checks both budgets write the same bytes.

    python benches/bench_in_memory.py --size 1.1b --repeats 3
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = {"model_stock": {}, "slerp": {"t": 0.3}, "ties": {"weight": [0.5, 0.5], "density": [0.5, 0.5]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1.1b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=",".join(METHODS))
    args = ap.parse_args(argv)

    from merge_fast import _core
    from merge_fast.plan import plan_text, same_tensor_plan

    base, fts = C.ensure_model_set(args.size, delta_corr=0.5)
    work = Path(tempfile.mkdtemp(prefix="bench_inmem_", dir=C.BENCH_DATA))
    files = [*C.shard_files(base), *(f for ft in fts for f in C.shard_files(ft))]
    C.warm_page_cache(files)
    print(f"{args.size}, load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}")
    print(f"{'method':<12} {'floor s':>8} {'streamed twice s':>17} {'read once s':>12} {'x floor before':>15} "
          f"{'x floor after':>14} {'same bytes':>10}")
    for method in args.only.split(","):
        models = fts[:1] if method == "slerp" else fts
        paths, plans = same_tensor_plan(method, base, models, lambda _n: METHODS[method], None)
        text = plan_text(paths, plans, seed=0, max_shard_size=2_000_000_000, recipe={"method": method})
        in_bytes = sum(Path(f).stat().st_size for p in paths for f in C.shard_files(Path(p)))
        out_bytes = sum(Path(f).stat().st_size for f in C.shard_files(base))
        times = {}
        for budget in (0, 256 << 20):
            plan = json.loads(text)
            plan["in_memory_budget"] = budget
            pj = json.dumps(plan)
            runs = []
            for _ in range(args.repeats):
                out = work / f"{method}_{budget}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                t0 = time.perf_counter()
                _core.execute_plan(pj, str(out))
                runs.append(time.perf_counter() - t0)
            times[budget] = statistics.median(runs)
        floors = []
        for _ in range(args.repeats):
            r = C.io_floor([f for p in paths for f in C.shard_files(Path(p))], work / "floor.bin", out_bytes)
            floors.append(r["read_s"] + r["write_s"])
        floor = statistics.median(floors)
        a, b = work / f"{method}_0", work / f"{method}_{256 << 20}"
        same = all(filecmp.cmp(a / f, b / f, shallow=False) for f in os.listdir(a))
        print(f"{method:<12} {floor:>8.2f} {times[0]:>17.2f} {times[256 << 20]:>12.2f} {times[0] / floor:>15.2f} "
              f"{times[256 << 20] / floor:>14.2f} {str(same):>10}   (read {in_bytes / 1e9:.1f} GB, write {out_bytes / 1e9:.1f} GB)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
