#!/usr/bin/env python
"""Merge-quality benchmark: build (or reuse) the two-task setup, merge the two fine-tunes with
each method, evaluate every model on both tasks' held-out sets, print a table.

    python benches/quality/run.py --workdir /tmp/mf_quality [--seed 0] [--steps 200]
                                  [--methods average,task_arithmetic,fisher] [--json out.json]

MERGE CALL POINT: every merge goes through one callable
``merge(method_name, dirs, fisher_paths, out_dir)`` where ``dirs[0]`` is the base model folder,
``dirs[1:]`` the fine-tuned folders and ``fisher_paths`` the Fisher safetensors files aligned
with ``dirs[1:]``; it must write a loadable model folder at ``out_dir``. By default this is
``quality.reference_merge`` (torch, f32). To benchmark the Rust engine, pass a callable
that calls merge_fast (see ``merge_fast_merge`` below, to be filled in by the lead) with
``--engine merge_fast``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import quality  # noqa: E402

DEFAULT_METHODS = ("average", "task_arithmetic", "fisher")


def merge_fast_merge(method_name, dirs, fisher_paths, out_dir):
    """MERGE CALL POINT (Rust engine): the same three merges through merge_fast's public API
    (lead: adjust if the API changes). Must match quality.reference_merge numerically."""
    import merge_fast as mf

    base, models = dirs[0], list(dirs[1:])
    if method_name == "average":
        mf.linear(models, out=out_dir)
    elif method_name == "task_arithmetic":
        mf.task_arithmetic(base, models, lam=1.0, out=out_dir)
    elif method_name == "fisher":
        mf.fisher_weighted(models, list(fisher_paths), epsilon=1e-8, out=out_dir)
    else:
        raise ValueError(f"merge_fast_merge: unknown method {method_name!r}")
    return out_dir


def run(workdir, seed=0, steps=200, methods=DEFAULT_METHODS, merge=None, rebuild=False,
        n_eval=512, setup_kwargs=None, verbose=True):
    merge = merge or quality.reference_merge
    wd = Path(workdir)
    log = print if verbose else (lambda *a, **k: None)
    t0 = time.time()
    if (wd / "setup.json").exists() and not rebuild:
        setup = quality.QualitySetup.load(wd)
        log(f"reusing setup in {wd}")
    else:
        log(f"building setup in {wd} (seed={seed}, steps={steps}) ...")
        setup = quality.make_quality_setup(wd, seed=seed, steps=steps, verbose=verbose,
                                           **(setup_kwargs or {}))
    t_setup = time.time() - t0
    rows = {"base": setup.base}
    for task, d in zip(setup.tasks, setup.models):
        rows[f"ft_{task}"] = d
    merge_times = {}
    for m in methods:
        out = wd / f"merged_{m}"
        t1 = time.time()
        # ---- MERGE CALL POINT -------------------------------------------------------------
        merge(m, setup.dirs, setup.fishers, str(out))
        # -----------------------------------------------------------------------------------
        merge_times[m] = time.time() - t1
        rows[f"merged_{m}"] = str(out)
    results = {}
    for name, d in rows.items():
        model = quality.load_model(d)
        results[name] = {t: quality.evaluate_model(model, t, n=n_eval, seed=seed)
                         for t in setup.tasks}
        results[name]["mean_loss"] = sum(results[name][t]["loss"] for t in setup.tasks) / len(setup.tasks)
        results[name]["mean_token_acc"] = sum(results[name][t]["token_acc"] for t in setup.tasks) / len(setup.tasks)
    # table
    hdr = f"{'model':24s}" + "".join(f"{t + ' loss':>14s}{t + ' tok%':>14s}{t + ' seq%':>13s}" for t in setup.tasks) + f"{'mean loss':>11s}{'mean tok%':>11s}"
    log("")
    log(hdr)
    log("-" * len(hdr))
    for name, r in results.items():
        line = f"{name:24s}"
        for t in setup.tasks:
            line += f"{r[t]['loss']:14.4f}{100 * r[t]['token_acc']:14.1f}{100 * r[t]['seq_acc']:13.1f}"
        line += f"{r['mean_loss']:11.4f}{100 * r['mean_token_acc']:11.1f}"
        log(line)
    log(f"\nsetup {t_setup:.1f}s; merges: " + ", ".join(f"{k} {v:.2f}s" for k, v in merge_times.items()))
    if "fisher" in results and "average" in results:
        fa, av = results["merged_fisher"]["mean_loss"], results["merged_average"]["mean_loss"]
        log(f"fisher-weighted vs plain average, mean held-out loss: {fa:.4f} vs {av:.4f} -> "
            f"{'fisher better' if fa < av else 'fisher NOT better'}")
    return {"setup": setup.__dict__, "results": results, "merge_s": merge_times,
            "setup_s": t_setup}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/mf_quality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--n-fisher", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--engine", choices=["reference", "merge_fast"], default="reference")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    merge = quality.reference_merge if a.engine == "reference" else merge_fast_merge
    res = run(a.workdir, a.seed, a.steps, [m for m in a.methods.split(",") if m], merge,
              a.rebuild, a.n_eval, {"hidden": a.hidden, "layers": a.layers, "n_fisher": a.n_fisher})
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
