#!/usr/bin/env python
"""Per-tensor bookkeeping: memory of opening, planning and merging (linear) two checkpoints
that hold many tiny tensors (issue 8: 200k tensors cost ~5 KB each; target <= 1 KB).

Each stage runs in a fresh subprocess that does every step up to it, then reports its own
``VmHWM`` (peak RSS, includes the touched pages of the memory-mapped headers) and
``RssAnon`` (private memory now) from ``/proc/self/status``. "per tensor" is the growth over
the ``import`` stage divided by the tensor count.

    python benches/bench_many_tensors.py --tensors 200000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ["import", "open", "plan", "merge"]

CHILD = r"""
import json, sys
stage, a, b, out = sys.argv[1:5]
import merge_fast as mf
from merge_fast import plan as _plan
keep = []
if stage == "open":
    keep = [mf.Checkpoint(a), mf.Checkpoint(b)]
elif stage == "plan":
    keep = _plan.same_tensor_plan("linear", None, [a, b], lambda _n: {"weight": None}, None)
elif stage == "merge":
    mf.linear([a, b], out=out, threads=1)
st = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmHWM", "RssAnon"))}
print(json.dumps({"hwm_kb": st["VmHWM"], "anon_kb": st["RssAnon"]}))
"""


def write_model(path: Path, n: int, seed: int) -> None:
    import numpy as np

    import merge_fast as mf

    rng = np.random.default_rng(seed)
    vals = rng.standard_normal((n, 4)).astype(np.float32)
    # one array per tensor: views of one buffer make numpy's borrow checks quadratic
    tensors = [(f"model.layers.{i // 1000}.block_{i % 1000}.weight", vals[i].copy(), [4], "F32") for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    mf._core.save_file(str(path / "model.safetensors"), tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=200_000)
    args = ap.parse_args()
    n = args.tensors
    with tempfile.TemporaryDirectory() as tmp:
        a, b, out = Path(tmp) / "a", Path(tmp) / "b", Path(tmp) / "out"
        write_model(a, n, 1)
        write_model(b, n, 2)
        rows = {}
        for stage in STAGES:
            r = subprocess.run([sys.executable, "-c", CHILD, stage, str(a), str(b), str(out)],
                               check=True, capture_output=True, text=True)
            rows[stage] = json.loads(r.stdout.strip().splitlines()[-1])
        size = (a / "model.safetensors").stat().st_size
    base = rows["import"]
    print(f"{n} tensors per model, 2 models, file size {size / 1e6:.1f} MB each")
    print(f"{'stage':<8} {'peak RSS MB':>12} {'anon MB':>9} {'peak/tensor B':>14} {'anon/tensor B':>14}")
    for stage in STAGES:
        r = rows[stage]
        dh = (r["hwm_kb"] - base["hwm_kb"]) * 1024 / n
        da = (r["anon_kb"] - base["anon_kb"]) * 1024 / n
        print(f"{stage:<8} {r['hwm_kb'] / 1024:>12.1f} {r['anon_kb'] / 1024:>9.1f} {dh:>14.0f} {da:>14.0f}")


if __name__ == "__main__":
    main()
