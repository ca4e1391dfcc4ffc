"""Benchmark: full procrustes_absorb merge of a Llama-shaped anchor with two donors.

    python benches/bench_crossarch.py                 # ~1.1B (TinyLlama shape), bf16, 3 models
    python benches/bench_crossarch.py --size 125m     # smaller, quicker

Models come from ``benches/_common.py`` (cached under ``bench_data/``): the anchor is
``<size>_A`` (seed 1), the donors ``<size>_B`` (seed 2) and ``<size>_C`` (seed 3), all
independent random weights, so every delta is full-size and every tensor goes through
alignment, randomized top-k SVD and absorption. The merge runs in a subprocess measured by
``_common.run_measured`` (wall time, peak RSS = VmHWM incl. file-backed mmap pages, peak
anonymous memory). In the same run: the I/O floor (read the three models once, write the
anchor's size, fsynced as the merge is) and the SVDs alone (the randomized top-k SVD of two
random matrices of every absorbed tensor's shape at its group's rank, as the kernel does per
donor). Targets (issue 11): peak RSS <= 1 GB and wall <= 2 x (floor + SVDs), medians of
``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common as C  # noqa: E402

CODE = """
import sys, json, time
sys.path.insert(0, {py!r})
import merge_fast as mf
t0 = time.perf_counter()
r = mf.procrustes_absorb({anchor!r}, {donors!r}, out={out!r}, beta={beta}, attn_rank={ar}, mlp_rank={mr},
                         attn_tol={at}, mlp_tol={mt}, max_shard_size={shard!r})
print(json.dumps({{"seconds": time.perf_counter() - t0, "tensors": r.tensors_written, "bytes": r.bytes_written,
                  "methods": r.alignment_methods, "absorbed": len(r.absorbed)}}))
"""

# The kernel's SVD work on its own: per absorbed tensor, the top-k SVD of each donor's delta.
SVD_CODE = """
import sys, json, time
sys.path.insert(0, {py!r})
import numpy as np
import merge_fast as mf
rng = np.random.default_rng(0)
total = 0.0
for shape, k in {jobs!r}:
    x = rng.standard_normal((2, *shape), dtype=np.float32)
    t0 = time.perf_counter()
    mf.svd(x, k=k, oversample=10, power_iters=2, seed=0)
    total += time.perf_counter() - t0
print(json.dumps({{"seconds": total}}))
"""

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def svd_jobs(spec, attn_rank: int, mlp_rank: int):
    """(shape, rank) of every tensor procrustes_absorb filters (embeddings are not absorbed)."""
    jobs = []
    for name, shape in spec.tensors():
        k = attn_rank if any(r in name for r in ATTN) else mlp_rank if any(r in name for r in MLP) else 0
        if k and len(shape) == 2 and k < min(shape):
            jobs.append((tuple(shape), k))
    return jobs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--attn-rank", type=int, default=64)
    ap.add_argument("--mlp-rank", type=int, default=128)
    ap.add_argument("--attn-tol", type=float, default=0.05)
    ap.add_argument("--mlp-tol", type=float, default=0.01)
    ap.add_argument("--shard", default="128MB")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    spec = C.get_spec(args.size)
    a, b = C.ensure_pair(args.size)
    c = C.generate_model(C.BENCH_DATA / f"{spec.name}_C", spec, seed=3)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_crossarch_", dir=C.BENCH_DATA))
    target = out / "merged"
    C.warm_page_cache(C.shard_files(a) + C.shard_files(b) + C.shard_files(c))
    code = CODE.format(py=str(C.REPO_ROOT / "python"), anchor=str(a), donors=[str(b), str(c)], out=str(target),
                       beta=args.beta, ar=args.attn_rank, mr=args.mlp_rank, at=args.attn_tol, mt=args.mlp_tol,
                       shard=args.shard)
    load0 = os.getloadavg()[0]
    runs, floors, svds = [], [], []
    ins = C.shard_files(a) + C.shard_files(b) + C.shard_files(c)
    jobs = svd_jobs(spec, args.attn_rank, args.mlp_rank)
    svd_code = SVD_CODE.format(py=str(C.REPO_ROOT / "python"), jobs=jobs)
    for _ in range(args.repeats):
        shutil.rmtree(target, ignore_errors=True)
        r = C.run_measured([sys.executable, "-c", code])
        if not r.ok:
            print(r.stdout, r.stderr, sep="\n")
            raise SystemExit(f"merge failed (rc {r.returncode})")
        runs.append(r)
        fl = C.io_floor(ins, out / "floor.bin", C.dir_bytes(a), fsync=True)
        (out / "floor.bin").unlink()
        floors.append(fl["read_s"] + fl["write_s"])
        sv = C.run_measured([sys.executable, "-c", svd_code])
        if not sv.ok:
            raise SystemExit(f"SVD timing failed: {sv.stderr}")
        svds.append(json.loads(sv.stdout.strip().splitlines()[-1])["seconds"])
    wall, floor, svd = C.median([r.wall_s for r in runs]), C.median(floors), C.median(svds)
    rss = max(r.peak_rss_mb for r in runs)
    print(f"# procrustes_absorb, anchor {spec.name} ({spec.n_params / 1e9:.2f}B params, bf16) + 2 donors; "
          f"beta={args.beta}, attn_rank={args.attn_rank}, mlp_rank={args.mlp_rank}, shard {args.shard}; "
          f"medians of {args.repeats}; load at start {load0:.1f}")
    print(f"{'size':<6} {'wall s':>8} {'user s':>8} {'peak RSS MB':>12} {'peak anon MB':>13} {'out MB':>8} "
          f"{'floor s':>8} {'SVDs s':>7} {'x (floor+SVDs)':>15}")
    out_mb = C.dir_bytes(target) / 1e6
    user = C.median([r.user_s for r in runs])
    anon = max(r.peak_anon_mb for r in runs)
    print(f"{spec.name:<6} {wall:8.1f} {user:8.1f} {rss:12.0f} {anon:13.0f} {out_mb:8.0f} "
          f"{floor:8.1f} {svd:7.1f} {wall / (floor + svd):15.2f}")
    print(f"({len(jobs)} tensors x 2 donors through the SVD)")
    print("engine:", runs[-1].stdout.strip().splitlines()[-1])
    ok_rss, ok_wall = rss <= 1024, wall <= 2 * (floor + svd)
    print(f"{'PASS' if ok_rss else 'FAIL'} peak RSS {rss:.0f} MB (target <= 1024 MB)")
    print(f"{'PASS' if ok_wall else 'FAIL'} wall {wall:.1f} s (target <= 2 x (floor + SVDs) = {2 * (floor + svd):.1f} s)")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
