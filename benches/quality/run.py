#!/usr/bin/env python
"""Merge-quality benchmark: build (or reuse) the two-task setup, merge the two fine-tunes with
each method, evaluate every model on both tasks' held-out sets, print a table.

    python benches/quality/run.py --setup random|pretrained --seeds 0,1,2
                                  [--workdir /tmp/mf_quality] [--steps 200] [--json out.json]
                                  [--methods average,task_arithmetic_0.5,task_arithmetic,ties,fisher]

MERGE CALL POINT: every merge goes through one callable
``merge(method_name, dirs, fisher_paths, out_dir)`` where ``dirs[0]`` is the base model folder,
``dirs[1:]`` the fine-tuned folders and ``fisher_paths`` the Fisher safetensors files aligned
with ``dirs[1:]``; it must write a loadable model folder at ``out_dir``. By default this is
``run.merge_fast_merge`` (merge_fast's public API, ``--engine merge_fast``, the default);
``--engine reference`` uses ``quality.reference_merge`` (torch, f32; no TIES).
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

import merge_fast as _mf  # noqa: E402

# task_arithmetic = λ 1.0; task_arithmetic_0.5 = λ 0.5; ties only when merge_fast has it
DEFAULT_METHODS = ("average", "task_arithmetic_0.5", "task_arithmetic") + \
    (("ties",) if hasattr(_mf, "ties") else ()) + ("fisher",)
TIES_DENSITY = 0.2  # TIES paper default (keep the top-20% |Δ| per task vector), λ = 1


def merge_fast_merge(method_name, dirs, fisher_paths, out_dir):
    """MERGE CALL POINT (Rust engine): the merges through merge_fast's public API. Must match
    quality.reference_merge numerically (TIES has no torch reference here)."""
    import merge_fast as mf

    base, models = dirs[0], list(dirs[1:])
    if method_name == "average":
        mf.linear(models, out=out_dir, overwrite=True)
    elif method_name == "task_arithmetic" or method_name.startswith("task_arithmetic_"):
        lam = 1.0 if method_name == "task_arithmetic" else float(method_name.split("_")[-1])
        mf.task_arithmetic(base, models, lam=lam, out=out_dir, overwrite=True)
    elif method_name == "ties":
        mf.ties(base, models, density=TIES_DENSITY, lam=1.0, out=out_dir, overwrite=True)
    elif method_name == "fisher":
        mf.fisher_weighted(models, list(fisher_paths), epsilon=1e-8, out=out_dir, overwrite=True)
    else:
        raise ValueError(f"merge_fast_merge: unknown method {method_name!r}")
    return out_dir


def run(workdir, seed=0, steps=200, methods=DEFAULT_METHODS, merge=None, rebuild=False,
        n_eval=512, setup_kwargs=None, verbose=True):
    merge = merge or quality.reference_merge
    wd = Path(workdir)
    log = print if verbose else (lambda *a, **k: None)
    t0 = time.time()
    want = (setup_kwargs or {}).get("setup", "random")
    if (wd / "setup.json").exists() and not rebuild:
        setup = quality.QualitySetup.load(wd)
        if setup.setup != want or setup.seed != seed:
            raise SystemExit(f"{wd} holds setup={setup.setup} seed={setup.seed}, not "
                             f"setup={want} seed={seed}; pass --rebuild or another --workdir")
        log(f"reusing setup in {wd}")
    else:
        log(f"building setup in {wd} (setup={want}, seed={seed}, steps={steps}) ...")
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
    log("")
    log(f"setup={setup.setup} seed={seed}")
    log(format_table(results, setup.tasks))
    log(f"\nsetup {t_setup:.1f}s; merges: " + ", ".join(f"{k} {v:.2f}s" for k, v in merge_times.items()))
    if "merged_fisher" in results and "merged_average" in results:
        fa, av = results["merged_fisher"]["mean_loss"], results["merged_average"]["mean_loss"]
        log(f"fisher-weighted vs plain average, mean held-out loss: {fa:.4f} vs {av:.4f} -> "
            f"{'fisher better' if fa < av else 'fisher NOT better'}")
    return {"setup": setup.__dict__, "results": results, "merge_s": merge_times,
            "setup_s": t_setup}


def format_table(results, tasks):
    """Markdown table: loss / teacher-forced token acc / exact-match seq acc per task."""
    hdr = "| model | " + " | ".join(f"{t} loss | {t} tok% | {t} seq%" for t in tasks) + \
        " | mean loss | mean tok% |"
    lines = [hdr, "|" + "---|" * (1 + 3 * len(tasks) + 2)]
    for name, r in results.items():
        cells = [name]
        for t in tasks:
            cells += [f"{r[t]['loss']:.4f}", f"{100 * r[t]['token_acc']:.1f}",
                      f"{100 * r[t]['seq_acc']:.1f}"]
        cells += [f"{r['mean_loss']:.4f}", f"{100 * r['mean_token_acc']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(per_seed, setup_name):
    """Mean held-out loss (mean over the two tasks) per method and seed."""
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]]["results"])
    lines = [f"| {setup_name}: mean held-out loss | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean |", "|" + "---|" * (len(seeds) + 2)]
    for n in names:
        v = [per_seed[s]["results"][n]["mean_loss"] for s in seeds]
        lines.append(f"| {n} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {sum(v) / len(v):.4f} |")
    if all("merged_fisher" in per_seed[s]["results"] for s in seeds):
        wins = sum(per_seed[s]["results"]["merged_fisher"]["mean_loss"]
                   < per_seed[s]["results"]["merged_average"]["mean_loss"] for s in seeds)
        lines.append(f"\nfisher-weighted < plain average (mean held-out loss) on {wins}/{len(seeds)} seeds")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/mf_quality",
                   help="setups go to WORKDIR/<setup>_seed<seed>")
    p.add_argument("--setup", choices=quality.SETUPS, default="random")
    p.add_argument("--seeds", default=None, help="comma-separated, e.g. 0,1,2 (default: --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per task")
    p.add_argument("--lr", type=float, default=None,
                   help="fine-tuning lr (default 2e-3 random, 1e-3 pretrained)")
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=None,
                   help="default 4 for random (the literal setup's numbers were measured with "
                        "run.py's default of 4 layers, 1.06 M params), 2 for pretrained (as "
                        "pre-registered, 0.53 M params)")
    p.add_argument("--n-fisher", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--engine", choices=["reference", "merge_fast"], default="merge_fast")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    merge = quality.reference_merge if a.engine == "reference" else merge_fast_merge
    methods = [m for m in a.methods.split(",") if m]
    if a.engine == "reference" and "ties" in methods:
        print("note: no torch reference for ties; skipped with --engine reference")
        methods.remove("ties")
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    if a.layers is None:
        a.layers = 4 if a.setup == "random" else 2
    kw = {"hidden": a.hidden, "layers": a.layers, "n_fisher": a.n_fisher, "setup": a.setup,
          "lr": a.lr, "threads": a.threads}
    if a.setup == "pretrained":
        kw.update(pretrain_steps=a.pretrain_steps, pretrain_lr=a.pretrain_lr)
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run(Path(a.workdir) / f"{a.setup}_seed{seed}", seed, a.steps, methods,
                             merge, a.rebuild, a.n_eval, kw)
        print()
    if len(seeds) > 1:
        print(format_summary(per_seed, a.setup))
    if a.json:
        Path(a.json).write_text(json.dumps({str(k): v for k, v in per_seed.items()}, indent=2,
                                           default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
