"""Benchmark: merge_fast SVD / top-k SVD / Procrustes vs torch.linalg and numpy.linalg.

    python benches/bench_linalg.py            # 7B-layer shapes: 4096x4096, 4096x11008
    python benches/bench_linalg.py --quick    # shapes scaled to 1024 (1024x1024, 1024x2752)

Prints one table: median wall time over ``--repeats`` runs (after one warm-up for the small
shapes), float32 throughout. ``batch`` rows time a stack of ``--batch`` matrices in one call
(merge_fast parallelizes across the stack; torch/numpy get the same stacked input).
Targets: exact SVD time ratio <= 1.0 vs the faster of torch/numpy; top-k (k <= 16) >= 20x
faster than merge_fast's exact SVD.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def _early_threads():
    # BLAS thread counts must be set before numpy is imported.
    if "--ref-threads" in sys.argv:
        n = sys.argv[sys.argv.index("--ref-threads") + 1]
        for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[v] = n


_early_threads()
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))
import merge_fast as mf  # noqa: E402


def timed(fn, repeats, warmup):
    if warmup:
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def decaying(m, n, seed):
    g = np.random.default_rng(seed)
    X = g.standard_normal((m, n)).astype(np.float32)
    # a plausible weight-delta spectrum: random matrix with a decaying low-rank part on top
    r = 32
    low = (g.standard_normal((m, r)) * (0.8 ** np.arange(r))) @ g.standard_normal((r, n))
    return np.ascontiguousarray(X * 0.01 + low.astype(np.float32))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shapes scaled down 4x (1024-based)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--ref-threads", type=int, default=None,
                    help="BLAS/torch threads for the numpy/torch references (default: their own)")
    ap.add_argument("--only", default=None, help="run only this shape, e.g. 4096x4096")
    args = ap.parse_args(argv)
    scale = 4 if args.quick else 1
    shapes = [(4096 // scale, 4096 // scale), (4096 // scale, 11008 // scale)]
    repeats = args.repeats or (3 if args.quick else 1)
    warm = args.quick
    torch = None
    if not args.no_torch:
        try:
            import torch  # noqa: F811
        except ImportError:
            torch = None
    if torch is not None and args.ref_threads:
        torch.set_num_threads(args.ref_threads)
    if args.only:
        shapes = [s for s in shapes if f"{s[0]}x{s[1]}" == args.only]
    print(f"# merge_fast {mf.__version__}, numpy {np.__version__}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "")
          + f", {os.cpu_count()} CPUs, median of {repeats}"
          + (f", reference BLAS threads {args.ref_threads}" if args.ref_threads else ""), flush=True)
    rows = []

    def add(op, shape, name, t):
        rows.append((op, shape, name, t))
        print(f"  {op:<22} {shape:<18} {name:<12} {t:9.3f} s", flush=True)

    for m, n in shapes:
        X = decaying(m, n, 0)
        sh = f"{m}x{n}"
        t_mf = timed(lambda: mf.svd(X), repeats, warm)
        add("svd exact", sh, "merge_fast", t_mf)
        t_np = timed(lambda: np.linalg.svd(X, full_matrices=False), repeats, warm)
        add("svd exact", sh, "numpy", t_np)
        if torch is not None:
            Xt = torch.from_numpy(X)
            t_t = timed(lambda: torch.linalg.svd(Xt, full_matrices=False), repeats, warm)
            add("svd exact", sh, "torch", t_t)
        t_k = timed(lambda: mf.svd(X, k=args.k), max(repeats, 3), True)
        add(f"svd top-{args.k}", sh, "merge_fast", t_k)
        if torch is not None:
            t_lr = timed(lambda: torch.svd_lowrank(Xt, q=args.k + 10, niter=2), max(repeats, 3), True)
            add(f"svd top-{args.k}", sh, "torch lowrank", t_lr)
        # Procrustes aligning the narrow side: A, B (max(m,n) x min(m,n)) -> R (min x min),
        # e.g. the residual-stream rotation read off an MLP weight's rows.
        Pa = np.ascontiguousarray(X if m >= n else X.T)
        Pb = np.ascontiguousarray(decaying(m, n, 1) if m >= n else decaying(m, n, 1).T)
        psh = f"{Pa.shape[0]}x{Pa.shape[1]}"
        add("procrustes", psh, "merge_fast", timed(lambda: mf.procrustes(Pa, Pb), repeats, warm))

        def np_proc():
            U, _, Vt = np.linalg.svd(Pb.T @ Pa, full_matrices=False)
            return U @ Vt

        add("procrustes", psh, "numpy", timed(np_proc, repeats, warm))
        if torch is not None:
            Ta, Tb = torch.from_numpy(Pa), torch.from_numpy(Pb)

            def t_proc():
                U, _, Vt = torch.linalg.svd(Tb.T @ Ta, full_matrices=False)
                return U @ Vt

            add("procrustes", psh, "torch", timed(t_proc, repeats, warm))
        if not args.skip_batch:
            S = np.stack([decaying(m, n, s) for s in range(args.batch)])
            shb = f"{args.batch}x{m}x{n}"
            add("svd exact batch", shb, "merge_fast", timed(lambda: mf.svd(S), 1, False))
            add("svd exact batch", shb, "numpy", timed(lambda: np.linalg.svd(S, full_matrices=False), 1, False))
            if torch is not None:
                St = torch.from_numpy(S)
                add("svd exact batch", shb, "torch", timed(lambda: torch.linalg.svd(St, full_matrices=False), 1, False))
            add(f"svd top-{args.k} batch", shb, "merge_fast", timed(lambda: mf.svd(S, k=args.k), 3, True))

    print()
    print(f"{'op':<22} {'shape':<18} {'impl':<14} {'median s':>9} {'vs best ref':>11}")
    best = {}
    for op, sh, name, t in rows:
        if name in ("numpy", "torch"):
            best[(op, sh)] = min(best.get((op, sh), float("inf")), t)
    exact = {sh: t for op, sh, name, t in rows if op == "svd exact" and name == "merge_fast"}
    exact_b = {sh: t for op, sh, name, t in rows if op == "svd exact batch" and name == "merge_fast"}
    for op, sh, name, t in rows:
        ref = best.get((op, sh))
        ratio = f"{t / ref:10.2f}x" if ref and name not in ("numpy", "torch") else ""
        print(f"{op:<22} {sh:<18} {name:<14} {t:9.3f} {ratio:>11}")
    print()
    for op, sh, name, t in rows:
        if op.startswith("svd top") and name == "merge_fast":
            base = exact_b.get(sh) if "batch" in op else exact.get(sh)
            if base:
                print(f"top-{args.k} speed-up over exact ({sh}): {base / t:.1f}x (target >= 20x)")
    for sh, t in exact.items():
        ref = best.get(("svd exact", sh))
        if ref:
            print(f"exact SVD ratio vs faster of torch/numpy ({sh}): {t / ref:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
