"""The 'naive baseline': the merge a user would write with safetensors + torch in 40 lines.

Tensor by tensor: ``safe_open(framework="pt").get_tensor`` from every input, compute in f32,
cast to bf16, collect one output shard (same shard layout as the first input) and write it with
``safetensors.torch.save_file``; then the index and config.  Single process, torch's default
intra-op threads.  Math follows DESIGN.md section 3 (same as mergekit).

    python benches/naive_merge.py linear A B --weights 0.5 0.5 -o OUT
    python benches/naive_merge.py slerp  A B --t 0.3 -o OUT
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * v0 + (math.sin(t * theta) / s) * v1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("method", choices=["linear", "slerp"])
    ap.add_argument("models", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--weights", type=float, nargs="*")
    ap.add_argument("--t", type=float, default=0.5)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    dirs = [Path(m) for m in a.models]
    out = Path(a.out)
    if a.method == "slerp" and len(dirs) != 2:
        raise SystemExit("slerp needs exactly two models")
    weights = a.weights or [1.0] * len(dirs)
    maps = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
            for d in dirs]
    # output shard layout = first model's
    shards: dict = {}
    for name, fname in maps[0].items():
        shards.setdefault(fname, []).append(name)
    tmp = out.with_name(out.name + ".naive_tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    handles: dict = {}

    def get(i: int, name: str) -> torch.Tensor:
        key = (i, maps[i][name])
        if key not in handles:
            handles[key] = safe_open(str(dirs[i] / maps[i][name]), framework="pt")
        return handles[key].get_tensor(name)

    wsum = sum(weights)
    total = 0
    for fname in sorted(shards):
        res = {}
        for name in shards[fname]:
            xs = [get(i, name).to(torch.float32) for i in range(len(dirs))]
            if a.method == "linear":
                acc = xs[0] * weights[0]
                for w, x in zip(weights[1:], xs[1:]):
                    acc.add_(x, alpha=w)
                acc.div_(wsum)
            else:
                acc = slerp(a.t, xs[0], xs[1])
            res[name] = acc.to(torch.bfloat16)
            total += res[name].numel() * 2
            del xs, acc
        save_file(res, str(tmp / fname), metadata={"format": "pt"})
        del res
    idx = {"metadata": {"total_size": total}, "weight_map": maps[0]}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    shutil.copy(dirs[0] / "config.json", tmp / "config.json")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes_written": total}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
