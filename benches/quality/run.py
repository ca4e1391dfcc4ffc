"""Runs the merge-quality benchmark (see quality.py and README.md) and prints the tables.

    nice -n 10 python benches/quality/run.py --seeds 0,1,2 --workdir /tmp/mfq

Per seed: four fine-tunes of the cached generic base, their Fisher and Gram statistics, a
regime check, then every merge. Methods with a scale (task arithmetic's λ, TIES and
DARE-TIES' λ, TSV-M's α, Iso-C/Iso-CTS' scaling factor) take the value with the best mean
accuracy on the validation split; the test split is scored once, with that value. Results
go to WORKDIR/results.json and stdout (markdown).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics as st
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "python"))
import quality as q  # noqa: E402

# method -> (call(base, fts, fishers, grams, out, value, seed), grid of the tuned value or [None])
GRIDS = {
    "average": [None],
    "task_arithmetic": [0.2, 0.4, 0.6, 0.8, 1.0],
    "ties": [0.5, 1.0, 1.5],
    "dare_ties": [0.5, 1.0, 1.5],
    "fisher_weighted": [None],
    "regmean": [None],
    "tsv_merge": [0.5, 1.0, 1.5],
    "iso_c": [0.5, 1.0, 1.5, 2.0],
    "iso_cts": [0.5, 1.0, 1.5, 2.0],
}
LABEL = {"average": "average", "task_arithmetic": "task arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES",
         "fisher_weighted": "Fisher-weighted", "regmean": "RegMean", "tsv_merge": "TSV-M", "iso_c": "Iso-C",
         "iso_cts": "Iso-CTS"}
TIES_DENSITY, DARE_DENSITY = 0.2, 0.5


def merge(method, base, fts, fishers, grams, out, v, seed):
    import merge_fast as mf

    o = dict(out=str(out), overwrite=True, fsync=False)
    fts = [str(f) for f in fts]
    base = str(base)
    if method == "average":
        return mf.linear(fts, **o)
    if method == "task_arithmetic":
        return mf.task_arithmetic(base, fts, lam=v, **o)
    if method == "ties":
        return mf.ties(base, fts, density=TIES_DENSITY, lam=v, **o)
    if method == "dare_ties":
        return mf.dare_ties(base, fts, density=DARE_DENSITY, lam=v, normalize=True, seed=seed, **o)
    if method == "fisher_weighted":
        return mf.fisher_weighted(fts, [str(f) for f in fishers], **o)
    if method == "regmean":
        return mf.regmean(fts, [str(g) for g in grams], reduce_non_diagonal_ratio=0.9, **o)
    if method == "tsv_merge":
        return mf.tsv_merge(base, fts, alpha=v, **o)
    if method == "iso_c":
        return mf.iso_c(base, fts, scaling_factor=v, **o)
    if method == "iso_cts":
        return mf.iso_cts(base, fts, scaling_factor=v, **o)
    raise ValueError(method)


def run_seed(workdir: Path, seed: int, methods, log=print):
    t0 = time.perf_counter()
    base = q.pretrained_base(workdir, log)
    sd = workdir / f"seed{seed}"
    sd.mkdir(parents=True, exist_ok=True)
    fts, fishers, grams, stat_s = [], [], [], {}
    for t in q.TASKS:
        ft = q.finetune(base, t, seed, sd / f"ft_{t}")
        s0 = time.perf_counter()
        f, g = q.statistics(ft, t, seed, sd)
        stat_s[t] = time.perf_counter() - s0
        fts.append(ft)
        fishers.append(f)
        grams.append(g)
    res = {"base": q.scores(base)}
    for t, ft in zip(q.TASKS, fts):
        res[f"ft_{t}"] = q.scores(ft)
    indiv = {t: res[f"ft_{t}"][t] for t in q.TASKS}
    regime = {t: {"task_gain": indiv[t] - res["base"][t],
                  "copy_kept": res[f"ft_{t}"]["copy"] / res["base"]["copy"],
                  "text_loss_delta": res[f"ft_{t}"]["text_loss"] - res["base"]["text_loss"]} for t in q.TASKS}
    log(f"seed {seed}: fine-tunes ready ({time.perf_counter() - t0:.0f} s); regime: " +
        ", ".join(f"{t} +{r['task_gain']:.2f} acc, copy kept {r['copy_kept']:.2f}" for t, r in regime.items()))
    chosen, wall = {}, {}
    for m in methods:
        best = None
        for v in GRIDS[m]:
            out = sd / "merged" / f"{m}_{v}"
            s0 = time.perf_counter()
            merge(m, base, fts, fishers, grams, out, v, seed)
            dt = time.perf_counter() - s0
            if len(GRIDS[m]) > 1:
                val = q.scores(out, "val", seed=seed)
                score = st.mean(val[t] for t in q.TASKS)
            else:
                score = 0.0
            if best is None or score > best[0]:
                if best is not None:
                    shutil.rmtree(best[2], ignore_errors=True)
                best = (score, v, out, dt)
            else:
                shutil.rmtree(out, ignore_errors=True)
        _, v, out, dt = best
        res[m] = q.scores(out)
        chosen[m], wall[m] = v, dt
        shutil.rmtree(out, ignore_errors=True)
        log(f"  {m:16s} value={v} norm. mean {st.mean(res[m][t] / indiv[t] for t in q.TASKS):.3f} ({dt:.2f} s)")
    return {"seed": seed, "scores": res, "individual": indiv, "regime": regime, "chosen": chosen,
            "merge_seconds": wall, "stats_seconds": stat_s, "seconds": time.perf_counter() - t0}


def table(r, methods) -> str:
    indiv = r["individual"]
    head = "| row | " + " | ".join(q.TASKS) + " | mean (norm.) | copy | text loss | merge s |"
    lines = [head, "|" + "---|" * (len(q.TASKS) + 5)]

    def row(name, s, secs="", value=None):
        norm = [s[t] / indiv[t] for t in q.TASKS]
        label = name + (f" ({value})" if value is not None else "")
        cells = " | ".join(f"{s[t]:.3f} ({n:.2f})" for t, n in zip(q.TASKS, norm))
        return f"| {label} | {cells} | {st.mean(norm):.3f} | {s['copy']:.3f} | {s['text_loss']:.3f} | {secs} |"

    lines.append(row("base", r["scores"]["base"]))
    for t in q.TASKS:
        lines.append(row(f"fine-tune {t}", r["scores"][f"ft_{t}"]))
    for m in methods:
        lines.append(row(LABEL[m], r["scores"][m], f"{r['merge_seconds'][m]:.2f}", r["chosen"][m]))
    return "\n".join(lines)


def summary(results, methods) -> str:
    lines = ["| method | " + " | ".join(f"seed {r['seed']}" for r in results) + " | mean |",
             "|" + "---|" * (len(results) + 2)]
    rows = [("base", "base")] + [(f"ft_{t}", f"fine-tune {t}") for t in q.TASKS] + [(m, LABEL[m]) for m in methods]
    for key, label in rows:
        vals = [st.mean(r["scores"][key][t] / r["individual"][t] for t in q.TASKS) for r in results]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {st.mean(vals):.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workdir", default="/tmp/mfq")
    ap.add_argument("--methods", default=",".join(GRIDS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    ap.add_argument("--summarize", nargs="+", default=None, metavar="RESULTS_JSON",
                    help="print the tables of finished runs (e.g. seeds run in parallel) and exit")
    a = ap.parse_args(argv)
    if a.summarize:
        results = sorted((r for f in a.summarize for r in json.loads(Path(f).read_text())), key=lambda r: r["seed"])
        methods = [m for m in GRIDS if all(m in r["scores"] for r in results)]
        for r in results:
            print(f"\n**seed {r['seed']}** (token accuracy on the test split; in brackets ÷ the task's own fine-tune)\n")
            print(table(r, methods))
        print("\n**Normalized mean accuracy (merged ÷ individual fine-tune, mean over the 4 tasks)**\n")
        print(summary(results, methods))
        return
    torch.set_num_threads(a.threads)
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    methods = a.methods.split(",")
    results = []
    for s in [int(x) for x in a.seeds.split(",")]:
        r = run_seed(wd, s, methods)
        results.append(r)
        (wd / "results.json").write_text(json.dumps(results, indent=1))
        print(f"\n**seed {s}** (token accuracy on the test split; in brackets ÷ the task's own fine-tune)\n")
        print(table(r, methods), flush=True)
    print("\n**Normalized mean accuracy (merged ÷ individual fine-tune, mean over the 4 tasks)**\n")
    print(summary(results, methods))


if __name__ == "__main__":
    main()
