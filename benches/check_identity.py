#!/usr/bin/env python
"""Byte-identity check across builds: hashes the outputs of the methods whose kernels a
performance change touches (selection, one-pass statistics, output writing), on fixed inputs.

    python benches/check_identity.py --save /tmp/before.json     # with the old build
    python benches/check_identity.py --compare /tmp/before.json  # with the new one

Inputs (deterministic, written under ``--data``): float32 arrays (normal deltas; heavily tied
deltas with many exact zeros and subnormals; multi-chunk shapes) and a bf16 folder of a few
multi-chunk tensors. Each method runs with 1 and 2 threads (outputs must agree too).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

import merge_fast as mf
from _common import folder_digest

BF16 = np.dtype(ml_dtypes.bfloat16)

# method -> params (density etc. chosen so every selection path is partial).
METHODS = {
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.6, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.4, "epsilon": 0.2},
    "sce": {"select_topk": 0.4},
    "arcee_fusion": {},
    "model_stock": {},
    "model_stock/filter_wise": {"filter_wise": True},
    "nuslerp": {"weight": [0.3, 0.7]},
    "nuslerp/row_wise": {"weight": [0.3, 0.7], "nuslerp_row_wise": True, "nuslerp_flatten": False},
    "multislerp": {"weight": [0.4, 0.6]},
    "karcher": {},
    "slerp": {"t": 0.4},
    "task_arithmetic": {},
    "passthrough": {},
    "ram": {"epsilon": 1e-3},
    "ramplus_tl": {"epsilon": 1e-3},
}
SINGLE = {"arcee_fusion", "slerp", "passthrough"}  # one model only
BASELESS = {"passthrough"}  # takes no base


def arrays(seed: int, shape, kind: str, models: int = 2):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32) * 0.02
    fts = []
    for k in range(models):
        d = rng.standard_normal(shape).astype(np.float32) * 0.002
        if kind == "ties":
            # Few distinct magnitudes, many exact zeros, some subnormal deltas.
            d = np.round(d / 0.001) * 0.001
            d[rng.random(shape) < 0.2] = 0.0
            sub = rng.random(shape) < 0.01
            d[sub] = np.float32(1e-40) * (1 + (rng.random(sub.sum()) < 0.5))
            fts.append((base + d * (k + 1)).astype(np.float32))
        else:
            fts.append((base + d).astype(np.float32))
    return base, fts


def write_st(path: Path, tensors: dict) -> None:
    header, data, off = {}, [], 0
    for name, a in tensors.items():
        b = a.tobytes()
        dtype = "BF16" if a.dtype == BF16 else "F32"
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        data.append(b)
        off += len(b)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(data))


def folders(root: Path):
    shapes = {"embed.weight": (700, 400), "proj.weight": (256, 513), "norm.weight": (400,), "odd.weight": (3, 5, 7),
              # numbered layers: fisher_dampened's layer importance ranks them
              "model.layers.0.mlp.weight": (300, 200), "model.layers.1.mlp.weight": (300, 200),
              "model.layers.2.attn.weight": (64, 200)}
    rng = np.random.default_rng(7)
    base = {n: rng.standard_normal(s).astype(np.float32) * 0.02 for n, s in shapes.items()}
    dirs = []
    for k, name in enumerate(["base", "ft1", "ft2"]):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        t = {}
        for n, s in shapes.items():
            v = base[n] if k == 0 else base[n] + rng.standard_normal(s).astype(np.float32) * 0.002
            t[n] = v.astype(BF16)
        write_st(d / "model.safetensors", t)
        dirs.append(d)
    for k in range(2):  # positive float32 Fishers whose scale differs by layer
        d = root / f"fisher{k + 1}"
        d.mkdir(parents=True, exist_ok=True)
        write_st(d / "model.safetensors", {n: (rng.random(s) ** 4 * (1 + i)).astype(np.float32) for i, (n, s) in enumerate(shapes.items())})
        dirs.append(d)
    return dirs


def digest(x) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


def run(data: Path) -> dict:
    out = {}
    cases = [("normal_300x1000", arrays(1, (300, 1000), "normal")),
             ("ties_700x700", arrays(2, (700, 700), "ties")),
             ("normal_vec_200003", arrays(3, (200003,), "normal")),
             # over arcee_fusion's 1,000,000-element sampling threshold
             ("normal_1100x1000", arrays(4, (1100, 1000), "normal")),
             # three models: kernels with a per-model-count path (e.g. a division by n)
             ("three_normal_300x1000", arrays(5, (300, 1000), "normal", 3)),
             ("three_ties_700x700", arrays(6, (700, 700), "ties", 3))]
    for cname, (base, fts) in cases:
        for m, p in METHODS.items():
            method = m.split("/")[0]  # "name/variant": the method with other parameters
            if len(fts) > 2 and (method in SINGLE or "weight" in p):  # two-model methods or weights
                continue
            models = fts[:1] if method in SINGLE else fts
            for th in (1, 2):
                r = mf.merge(method, models, base=None if method in BASELESS else base, params=p, threads=th, seed=5)
                out[f"{cname}/{m}/t{th}"] = digest(r)
    b, f1, f2, fi1, fi2 = folders(data / "folders")
    fisher_cases = {
        "fisher_dampened": lambda o, th: mf.fisher_dampened(str(b), [str(f1), str(f2)], str(fi1), scale=0.3, threads=th, out=str(o)),
        "fisher_dampened/rank": lambda o, th: mf.fisher_dampened(str(b), [str(f1), str(f2)], str(fi1), normalization="rank",
                                                                 threads=th, out=str(o)),
        "fisher_weighted": lambda o, th: mf.fisher_weighted([str(f1), str(f2)], [str(fi1), str(fi2)], threads=th, out=str(o)),
    }
    for m, call in fisher_cases.items():
        for th in (1, 2):
            o = data / "out" / f"{m.replace('/', '_')}_t{th}"
            call(o, th)
            out[f"folder/{m}/t{th}"] = folder_digest(o)
    for m, p in METHODS.items():
        method = m.split("/")[0]
        models = [str(f1)] if method in SINGLE else [str(f1), str(f2)]
        for th in (1, 2):
            o = data / "out" / f"{m.replace('/', '_')}_t{th}"
            mf.merge(method, models, base=None if method in BASELESS else str(b), params=p, threads=th, seed=5, out=str(o), dtype="bfloat16")
            out[f"folder/{m}/t{th}"] = folder_digest(o)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/mf_identity")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save")
    g.add_argument("--compare")
    a = ap.parse_args()
    data = Path(a.data)
    import shutil
    shutil.rmtree(data, ignore_errors=True)
    got = run(data)
    if a.save:
        Path(a.save).write_text(json.dumps(got, indent=1, sort_keys=True))
        print(f"saved {len(got)} hashes to {a.save}")
        return 0
    want = json.loads(Path(a.compare).read_text())
    bad = [k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k)]
    for k in bad:
        print(f"DIFFERS {k}: before {want.get(k)} after {got.get(k)}")
    print(f"{len(got) - len(bad)}/{len(got)} outputs byte-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
