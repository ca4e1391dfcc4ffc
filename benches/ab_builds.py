#!/usr/bin/env python
"""Interleaved A/B of builds of the extension on one method, on the methods bench's inputs.

    cargo build --profile quick -p merge_fast_py && cp target/quick/lib_core.so /tmp/new.so
    # (the build before the change, the same way, into /tmp/old.so)
    python benches/ab_builds.py --builds /tmp/old.so /tmp/new.so --method della --size 125m

This machine's speed drifts by 10-30% within the hour, so a change is judged by builds run
side by side, not against a table. Each build gets its own copy of ``python/merge_fast`` with
that library as its extension (the working tree is not touched). Each round runs every build
once, in an order that alternates from round to round, each in a fresh process that merges
``--merges`` times (the first merge of a process pays for its start). Prints every run's wall
and CPU seconds (the child's user + system), the medians, each build's ratio to the first,
and whether the builds wrote the same bytes.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_methods import CASES, ensure_fishers  # noqa: E402


def package_with(build: Path, root: Path) -> Path:
    """A copy of the Python package under ``root`` whose extension is ``build``."""
    pkg = root / "merge_fast"
    shutil.copytree(C.REPO_ROOT / "python" / "merge_fast", pkg,
                    ignore=shutil.ignore_patterns("_core*.so", "._core*", "*.pyd", "__pycache__"))
    shutil.copy2(build, pkg / "_core.abi3.so")
    return root


def run_once(python: str, pythonpath: Path, code: str) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([python, "-c", code], check=True, cwd="/",
                   env=dict(os.environ, PYTHONPATH=str(pythonpath)))
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builds", nargs="+", type=Path, required=True,
                    help="built extensions (target/<profile>/lib_core.so copies); the first is the baseline")
    ap.add_argument("--method", choices=sorted(CASES), required=True)
    ap.add_argument("--size", default="125m", help="model size of the methods bench (125m, 1.1b, ...)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--merges", type=int, default=5, help="merges per process")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--delta-std", type=float, default=0.002,
                    help="fine-tunes' delta std (weights' 0.02); 0.00003 leaves ~60%% of bf16 deltas zero, "
                         "as a fine-tune whose updates are mostly below the weights' unit in the last place")
    ap.add_argument("--frozen", default="",
                    help="comma-separated parts of tensor names the fine-tunes leave equal to the base "
                         "(e.g. embed,lm_head,norm: layers a fine-tune or a LoRA did not touch)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES),
                    help="the models' stored dtype (fine-tunes on the hub come in all three)")
    ap.add_argument("--data", type=Path, default=C.BENCH_DATA)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)
    for b in args.builds:
        if not b.is_file():
            ap.error(f"no build at {b}")

    frozen = tuple(f for f in args.frozen.split(",") if f)
    base, fts = C.ensure_model_set(args.size, 2, args.delta_std, 0.5, root=args.data, frozen=frozen,
                                   dtype=args.dtype)
    paths: Dict[str, Path] = {"base": base, "ft1": fts[0], "ft2": fts[1]}
    if any(k.startswith("fisher") for k in CASES[args.method].inputs):
        paths.update(zip(("fisher1", "fisher2"), ensure_fishers(args.size, fts, args.data)))
    C.warm_page_cache([f for p in paths.values() for f in C.shard_files(p)])

    with tempfile.TemporaryDirectory(prefix="ab_builds_") as tmp:
        root = Path(tmp)
        trees = [package_with(b, root / f"build{k}") for k, b in enumerate(args.builds)]
        outs = [root / f"out{k}" for k in range(len(args.builds))]
        wall: List[List[float]] = [[] for _ in args.builds]
        cpu: List[List[float]] = [[] for _ in args.builds]
        load0 = os.getloadavg()[0]
        for r in range(args.rounds):
            order = list(range(len(args.builds)))
            if r % 2:
                order.reverse()
            for k in order:
                opts = (f"out={str(outs[k])!r}, threads={args.threads!r}, max_shard_size='5GB', "
                        "progress=False, overwrite=True")
                call = CASES[args.method].mf.format(opts=opts, seed=args.seed, out=repr(str(outs[k])),
                                                    fsync_kw="", **{n: repr(str(p)) for n, p in paths.items()})
                code = f"import merge_fast as mf\nfor _ in range({args.merges}):\n    {call}\n"
                w, c = run_once(args.python, trees[k], code)
                wall[k].append(w)
                cpu[k].append(c)
                print(f"round {r + 1} build {k} ({args.builds[k].name}): {w:.2f} s wall, {c:.2f} s CPU",
                      file=sys.stderr, flush=True)
        digests = [C.folder_digest(o) for o in outs]

    print(f"# {args.method} at {args.size} ({args.dtype}, delta std {args.delta_std:g}"
          f"{', frozen ' + args.frozen if frozen else ''}): {args.rounds} rounds, {args.merges} merges per process, "
          f"load {load0:.1f} -> {os.getloadavg()[0]:.1f} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    print("| build | wall s (each round) | median wall s | × first | median CPU s | × first | output |")
    print("|---|---|---:|---:|---:|---:|---|")
    w0, c0 = statistics.median(wall[0]), statistics.median(cpu[0])
    for k, b in enumerate(args.builds):
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        print(f"| {b} | {' '.join(f'{x:.2f}' for x in wall[k])} | {w:.2f} | {w / w0:.3f} | {c:.2f} | "
              f"{c / c0:.3f} | {digests[k]} |")
    same = len(set(digests)) == 1
    print("outputs byte-identical across builds" if same else "OUTPUTS DIFFER across builds")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
