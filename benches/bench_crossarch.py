"""Benchmark: full procrustes_absorb merge of a Llama-shaped anchor with two donors.

    python benches/bench_crossarch.py                 # ~1.1B (TinyLlama shape), bf16, 3 models
    python benches/bench_crossarch.py --size 125m     # smaller, quicker

Models come from ``benches/_common.py`` (cached under ``bench_data/``): the anchor is
``<size>_A`` (seed 1), the donors ``<size>_B`` (seed 2) and ``<size>_C`` (seed 3), all
independent random weights, so every delta is full-size and every tensor goes through
alignment, randomized top-k SVD and absorption. The merge runs in a subprocess measured by
``_common.run_measured`` (wall time, peak RSS = VmHWM incl. file-backed mmap pages, peak
anonymous memory). Target: peak RSS <= 2 GB at 1.1B.
"""
from __future__ import annotations

import argparse
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
    r = C.run_measured([sys.executable, "-c", code])
    if not r.ok:
        print(r.stdout, r.stderr, sep="\n")
        raise SystemExit(f"merge failed (rc {r.returncode})")
    print(f"# procrustes_absorb, anchor {spec.name} ({spec.n_params / 1e9:.2f}B params, bf16) + 2 donors; "
          f"beta={args.beta}, attn_rank={args.attn_rank}, mlp_rank={args.mlp_rank}, shard {args.shard}")
    print(f"{'size':<6} {'wall s':>8} {'user s':>8} {'peak RSS MB':>12} {'peak anon MB':>13} {'out MB':>8}")
    out_mb = C.dir_bytes(target) / 1e6
    print(f"{spec.name:<6} {r.wall_s:8.1f} {r.user_s:8.1f} {r.peak_rss_mb:12.0f} {r.peak_anon_mb:13.0f} {out_mb:8.0f}")
    print("engine:", r.stdout.strip().splitlines()[-1])
    ok = r.peak_rss_mb <= 2048
    print(f"{'PASS' if ok else 'FAIL'} peak RSS {r.peak_rss_mb:.0f} MB (target <= 2048 MB)")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
