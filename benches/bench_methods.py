#!/usr/bin/env python
"""Methods benchmark: every merge method, merge_fast vs its I/O floor and mergekit.

For each size a synthetic Llama-shaped bf16 *model set* is used (see ``_common.py``
``ensure_model_set``; ``--dtype f16|f32`` stores it so instead): a base (seed 100) and two
fine-tunes ``base + 0.002 * delta`` whose deltas are correlated (``--delta-corr``, default 0.5,
so TIES sign election has a majority to find and model_stock's cosine -- hence its interpolation
factor t = 2c/(1+c) -- is far from 0). The Fisher methods also read one positive bf16 "Fisher"
per fine-tune (``ensure_fishers``). ``CASES`` lists
each method's inputs (a pair method reads two models, a base-plus-two method three), its
merge_fast call and its mergekit config (both tools' defaults except the parameters written
there). Every contender runs ``--repeats`` times in its own subprocess, contenders interleaved
round-robin (repeat 1 of all, then repeat 2 of all, ...) so machine noise spreads over all:

* ``io-floor``        read every input byte of that method once + write one output-sized file
                      (16 MB blocks, one thread, no fsync); methods with the same inputs share
                      these runs;
* ``io-floor-fsync``  the same, fsyncing the output file (``dd conv=fsync``'s floor);
* ``io-floor-direct`` the same, written with ``O_DIRECT`` then fsynced (``dd oflag=direct``'s
                      floor: how merge_fast writes a durable output); informational, the
                      targets stay against ``io-floor-fsync``;
* ``merge_fast``      the Python API in a fresh ``python -c``, the models' dtype in and out, default
                      threads, 5GB shards, fsync on (merge_fast's default): compared with the
                      fsynced floor;
* ``merge_fast-nofsync``  the same with ``fsync=False``: compared with the plain floor;
* ``mergekit``        ``mergekit-yaml cfg.yml OUT --lazy-unpickle --no-copy-tokenizer --quiet``
                      (CPU, ``dtype:`` the models', default threads, ``--random-seed`` for the
                      stochastic methods); never fsyncs; compared with the plain floor.

Caching, timing and memory are as in ``bench_engine.py``: inputs are read into the page cache
before timing (never dropped: shared machine), ``os.sync()`` before every timed run, wall time
is the subprocess's (imports included), ``peak RSS`` = polled ``VmHWM`` summed over the process
tree (*includes file-backed pages of memory-mapped inputs*), ``anon`` = polled peak
RssAnon+RssShmem (private memory).

Agreement, on the repeat-1 outputs (a sample of tensors: embeddings, lm_head, final norm, every
projection + a norm of the first and last layer; all tensors for tiny or ``--check-all``):
deterministic methods: merge_fast vs mergekit, max |diff|, max bf16 ulp, elements that differ
(ties and model_stock also against a float32 reference rounded once); stochastic ones
(dare_ties, dare_linear, della: the tools' RNGs differ): per tool, the fraction of elements
bit-equal to the base, mean |out - base| and the sign agreement of (out - base) with the
fine-tunes' mean delta.

Targets (issue 11, on the 1.1b set): every method within 1.3x its I/O floor (model_stock
1.05x; procrustes_absorb has its own target in ``bench_crossarch.py``); merge_fast peak RSS
<= 1.5 GB; >= 5x faster than mergekit (informational).

    python benches/bench_methods.py --sizes tiny                  # smoke test, ~30 s without mergekit
    python benches/bench_methods.py --sizes 1.1b --markdown       # the full table
    python benches/bench_methods.py --sizes 1.1b --only ties,sce --repeats 1
    python benches/bench_methods.py --sizes 1.1b --repeats 3 --mergekit-repeats 1  # mergekit once
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import Row, clean, fnum, out_shards  # noqa: E402

HERE = Path(__file__).resolve().parent
WEIGHTS = (0.5, 0.5)
DENSITY = 0.5

TARGET_SPEEDUP = 5.0
TARGET_RSS_MB = 1536.0  # 1.5 GB
TARGET_FLOOR = 1.3  # issue 11: every method within 1.3x of its I/O floor
TARGET_FLOOR_ONE_PASS = {"model_stock": 1.05}
NO_FLOOR_TARGET = ("procrustes_absorb",)  # its target (SVD time included): bench_crossarch.py


@dataclasses.dataclass(frozen=True)
class Case:
    """One method's bench: the inputs it reads (keys of the model set: base, ft1, ft2,
    fisher1, fisher2), merge_fast's call and mergekit's config (None: mergekit lacks it).
    ``{opts}`` is replaced by the shared keyword options; model keys by their paths."""
    inputs: Tuple[str, ...]
    mf: str
    mk: Optional[dict] = None


_W = [("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.5})]
_WD = [(k, dict(p, density=DENSITY)) for k, p in _W]
CASES: Dict[str, Case] = {
    "linear": Case(("ft1", "ft2"), "mf.linear([{ft1}, {ft2}], [0.5, 0.5], {opts})",
                   {"models": _W}),
    "task_arithmetic": Case(("base", "ft1", "ft2"),
                            "mf.task_arithmetic({base}, [{ft1}, {ft2}], [0.5, 0.5], {opts})",
                            {"base": "base", "models": _W}),
    "slerp": Case(("base", "ft1"), "mf.slerp({base}, {ft1}, 0.5, {opts})",
                  {"base": "base", "models": [("base", {}), ("ft1", {})], "params": {"t": 0.5}}),
    "ties": Case(("base", "ft1", "ft2"),
                 "mf.ties({base}, [{ft1}, {ft2}], [0.5, 0.5], density=0.5, {opts})",
                 {"base": "base", "models": _WD, "params": {"normalize": True}}),
    "dare_ties": Case(("base", "ft1", "ft2"),
                      "mf.dare_ties({base}, [{ft1}, {ft2}], [0.5, 0.5], density=0.5, "
                      "seed={seed}, {opts})", {"base": "base", "models": _WD}),
    "dare_linear": Case(("base", "ft1", "ft2"),
                        "mf.dare_linear({base}, [{ft1}, {ft2}], [0.5, 0.5], density=0.5, "
                        "seed={seed}, {opts})", {"base": "base", "models": _WD}),
    "breadcrumbs": Case(("base", "ft1", "ft2"),
                        "mf.breadcrumbs({base}, [{ft1}, {ft2}], [0.5, 0.5], density=0.9, "
                        "gamma=0.01, {opts})",
                        {"base": "base", "models": [(k, dict(p, density=0.9, gamma=0.01))
                                                    for k, p in _W]}),
    "della": Case(("base", "ft1", "ft2"),
                  "mf.della({base}, [{ft1}, {ft2}], [0.5, 0.5], density=0.5, epsilon=0.1, "
                  "seed={seed}, {opts})",
                  {"base": "base", "models": [(k, dict(p, epsilon=0.1)) for k, p in _WD]}),
    "sce": Case(("base", "ft1", "ft2"), "mf.sce({base}, [{ft1}, {ft2}], select_topk=0.5, {opts})",
                {"base": "base", "models": [("ft1", {}), ("ft2", {})],
                 "params": {"select_topk": 0.5}}),
    "model_stock": Case(("base", "ft1", "ft2"), "mf.model_stock({base}, [{ft1}, {ft2}], {opts})",
                        {"base": "base", "models": [("ft1", {}), ("ft2", {})]}),
    "nuslerp": Case(("base", "ft1", "ft2"),
                    "mf.nuslerp([{ft1}, {ft2}], [0.5, 0.5], base={base}, {opts})",
                    {"base": "base", "models": _W}),
    "multislerp": Case(("base", "ft1", "ft2"),
                       "mf.multislerp([{ft1}, {ft2}], [0.5, 0.5], base={base}, {opts})",
                       {"base": "base", "models": _W}),
    "karcher": Case(("ft1", "ft2"), "mf.karcher([{ft1}, {ft2}], {opts})",
                    {"models": [("ft1", {}), ("ft2", {})]}),
    "nearswap": Case(("base", "ft1"), "mf.nearswap({base}, {ft1}, 0.001, {opts})",
                     {"base": "base", "models": [("base", {}), ("ft1", {})],
                      "params": {"t": 0.001}}),
    "ram": Case(("base", "ft1", "ft2"), "mf.ram({base}, [{ft1}, {ft2}], {opts})",
                {"base": "base", "models": [("ft1", {}), ("ft2", {})]}),
    "arcee_fusion": Case(("base", "ft1"), "mf.arcee_fusion({base}, {ft1}, {opts})",
                         {"base": "base", "models": [("base", {}), ("ft1", {})]}),
    "passthrough": Case(("base",), "mf.passthrough({base}, {opts})",
                        {"models": [("base", {})]}),
    "fisher_weighted": Case(("ft1", "ft2", "fisher1", "fisher2"),
                            "mf.fisher_weighted([{ft1}, {ft2}], [{fisher1}, {fisher2}], {opts})"),
    "fisher_dampened": Case(("base", "ft1", "ft2", "fisher1"),
                            "mf.fisher_dampened({base}, [{ft1}, {ft2}], {fisher1}, scale=0.3, "
                            "{opts})"),
    # cross-architecture entry point: its own options (no threads/progress keywords)
    "procrustes_absorb": Case(("base", "ft1", "ft2"),
                              "mf.procrustes_absorb({base}, [{ft1}, {ft2}], out={out}, "
                              "max_shard_size='5GB'{fsync_kw})"),
}
METHODS = tuple(CASES)
# Stochastic methods: their RNGs differ from mergekit's, so only statistics are compared.
STOCHASTIC = ("dare_ties", "dare_linear", "della")


@dataclasses.dataclass
class Contender:
    key: str
    label: str
    kind: str  # io-floor | merge_fast | mergekit
    fsync: bool = False
    direct: bool = False  # io-floor only: O_DIRECT writes


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------


MF_ENV: Dict[str, str] = {}


def mf_available(python: str) -> tuple[bool, str]:
    code = ("import merge_fast as mf; mf.ties; mf.dare_ties; mf.model_stock; "
            "print(getattr(mf, '__version__', '?'), getattr(mf, '__file__', '?'))")
    in_tree = str(C.REPO_ROOT / "python")
    last = "?"
    for extra in ({}, {"PYTHONPATH": os.pathsep.join(
            [in_tree] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}):
        try:
            p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, **extra), cwd="/")
        except Exception as e:  # noqa: BLE001
            return False, f"{type(e).__name__}: {e}"
        if p.returncode == 0:
            MF_ENV.clear()
            MF_ENV.update(extra)
            return True, p.stdout.strip() + (" (via PYTHONPATH=python/)" if extra else "")
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
    return False, last


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def mf_cmd(python: str, method: str, paths: Dict[str, Path], out: Path, args,
           fsync: bool) -> List[str]:
    fsync_kw = "" if fsync else ", fsync=False"
    opts = (f"out={str(out)!r}, threads={args.threads!r}, max_shard_size='5GB', "
            f"progress=False{fsync_kw}")
    call = CASES[method].mf.format(opts=opts, seed=args.seed, out=repr(str(out)),
                                   fsync_kw=fsync_kw,
                                   **{k: repr(str(v)) for k, v in paths.items()})
    code = ("import json, merge_fast as mf\n"
            f"r = {call}\n"
            "print(json.dumps({k: getattr(r, k, None) for k in ('tensors_written', "
            "'bytes_read', 'bytes_written', 'seconds')}))\n")
    return [python, "-c", code]


def mergekit_yaml(method: str, paths: Dict[str, Path], dtype: str = "bf16") -> str:
    mk = CASES[method].mk
    assert mk is not None
    lines = [f"merge_method: {method}"]
    if mk.get("base"):
        lines.append(f"base_model: {paths[mk['base']]}")
    lines.append("models:")
    for key, params in mk["models"]:
        lines.append(f"  - model: {paths[key]}")
        if params:
            lines.append("    parameters:")
            lines += [f"      {k}: {v}" for k, v in params.items()]
    if mk.get("params"):
        lines.append("parameters:")
        lines += [f"  {k}: {str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in mk["params"].items()]
    lines.append(f"dtype: {C.DTYPES[dtype]}")
    return "\n".join(lines) + "\n"


def build_cmd(c: Contender, method: str, paths: Dict[str, Path], out: Path, args,
              work: Path) -> List[str]:
    if c.kind == "io-floor":
        ins = [f for k in CASES[method].inputs for f in C.shard_files(paths[k])]
        return [sys.executable, str(HERE / "_common.py"), "io-floor", "--inputs",
                *map(str, ins), "--out-file", str(out) + ".bin",
                "--out-bytes", str(C.dir_bytes(paths["base"]))] + (["--fsync"] if c.fsync else []) \
            + (["--direct"] if c.direct else [])
    if c.kind == "merge_fast":
        return mf_cmd(args.mf_python, method, paths, out, args, c.fsync)
    if c.kind == "mergekit":
        cfg = work / f"mergekit_{method}.yml"
        cfg.write_text(mergekit_yaml(method, paths, args.dtype))
        cmd = [args.mergekit, str(cfg), str(out), "--lazy-unpickle", "--no-copy-tokenizer",
               "--quiet"]
        if method in STOCHASTIC:
            cmd += ["--random-seed", str(args.seed)]
        if args.threads:
            cmd += ["-j", str(args.threads)]
        return cmd
    raise ValueError(c.kind)


def ensure_fishers(size: str, fts: List[Path], root: Path) -> List[Path]:
    """A positive diagonal 'Fisher' per fine-tune with its names and shards: (50·θ)² + 0.01,
    in bf16. The bench needs a Fisher file's size and layout, not real statistics; a real one
    is float32 (twice the bytes), and the floor reads the same files, so ratios still hold."""
    import torch
    from safetensors.torch import load_file, save_file

    out = []
    for k, ft in enumerate(fts):
        d = root / f"{get_spec_name(size)}_fisher{k + 1}"
        if not (d / "done").exists():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for f in C.shard_files(ft):
                ts = load_file(str(f))
                save_file({n: ((t.float() * 50).square() + 0.01).to(torch.bfloat16)
                           for n, t in ts.items()}, str(d / f.name))
                del ts
            for extra in ft.glob("*.json"):
                shutil.copy(extra, d / extra.name)
            (d / "done").write_text("")
        out.append(d)
    return out


def get_spec_name(size: str) -> str:
    return C.get_spec(size).name


def sample_names(size: str, check_all: bool = False) -> Optional[List[str]]:
    if size == "tiny" or check_all:
        return None
    spec = C.get_spec(size)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for n in (0, spec.layers - 1):
        p = f"model.layers.{n}."
        names += [p + s for s in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight", "input_layernorm.weight")]
    return names


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------


AGREEMENT: List[dict] = []


def dare_stats(out_dir: Path, base: Path, fts: List[Path], names: Optional[List[str]]) -> dict:
    """Statistics of a dare_ties output: fraction of elements bit-equal to the base, mean
    |out - base|, and the fraction of changed elements whose delta has the sign of the
    fine-tunes' summed delta (the TIES-elected sign, up to DARE's drops)."""
    import torch
    from safetensors import safe_open

    wo, wb = C.weight_map(out_dir), C.weight_map(base)
    wfs = [C.weight_map(p) for p in fts]
    handles: dict = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    n_el = n_eq = n_changed = n_sign = 0
    sum_abs = 0.0
    todo = [n for n in (names if names is not None else sorted(wo)) if n in wo and n in wb]
    for n in todo:
        o, b = get(wo[n], n), get(wb[n], n)
        n_el += o.numel()
        n_eq += int((o.view(torch.int16) == b.view(torch.int16)).sum().item())
        d = o.to(torch.float32) - b.to(torch.float32)
        sum_abs += float(d.abs().sum(dtype=torch.float64).item())
        s = sum(get(w[n], n).to(torch.float32) for w in wfs) - len(wfs) * b.to(torch.float32)
        ch = d != 0
        n_changed += int(ch.sum().item())
        n_sign += int(((torch.sign(d) == torch.sign(s)) & ch).sum().item())
        del o, b, d, s, ch
    return {"n_tensors": len(todo), "n_elems": n_el, "frac_eq_base": n_eq / max(n_el, 1),
            "mean_abs_delta": sum_abs / max(n_el, 1),
            "sign_agree": n_sign / max(n_changed, 1)}


def _ulp_bf16(x):
    """bf16 unit in the last place at |x| (the ulp of the bf16 binade of x; min normal for 0)."""
    import torch

    ax = x.abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(ax)) - 7)


def reference(method: str, name: str, base_t, ft_ts):
    """f32 reference of mergekit 0.1.5's ties / model_stock formulas (f64 for the reductions),
    for one tensor; returns f32 (the bench rounds it to bf16 once)."""
    import torch

    b = base_t.to(torch.float32)
    ds = [f.to(torch.float32) - b for f in ft_ts]
    if method == "ties":
        trimmed = []
        for d in ds:
            n = d.numel()
            k = max(1, int(DENSITY * n))
            flat = d.reshape(-1)
            mag = flat.abs()
            # k-th largest magnitude; bf16 deltas take few distinct values, so many elements tie
            # at it: keep the lowest-index ones (merge_fast's documented rule; mergekit's
            # argsort leaves that order unspecified)
            thr = torch.topk(mag, k, sorted=False).values.min()
            keep = mag > thr
            at = mag == thr
            need = k - int(keep.sum().item())
            keep |= at & (torch.cumsum(at, 0) <= need)
            trimmed.append((flat * keep).reshape(d.shape))
        wd = torch.stack([t * w for t, w in zip(trimmed, WEIGHTS)])
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = torch.sign(wd) == sign
        mixed = (wd * mask).sum(0)
        div = (torch.tensor(WEIGHTS, dtype=torch.float32).view(-1, *[1] * b.dim()) * mask).sum(0)
        div[div == 0] = 1.0
        return b + mixed / div
    if method == "model_stock":
        x, y = ds[0].reshape(-1).double(), ds[1].reshape(-1).double()
        c = float((x @ y) / max(float(x.norm() * y.norm()), 1e-8))
        n = len(ds)
        t = n * c / (1 + (n - 1) * c)
        avg = sum(f.to(torch.float32) for f in ft_ts) / n
        return t * avg + (1 - t) * b
    raise ValueError(method)


def ref_check(out_dirs: Dict[str, Path], method: str, base: Path, fts: List[Path],
              names: Optional[List[str]]) -> dict:
    """Each tool's output vs the f32 reference rounded once to bf16: fraction of elements
    bit-equal, fraction more than 1 bf16 ulp (at the reference's magnitude) off, max |diff|."""
    import torch
    from safetensors import safe_open

    wb = C.weight_map(base)
    wfs = [C.weight_map(p) for p in fts]
    wos = {k: C.weight_map(d) for k, d in out_dirs.items()}
    handles: dict = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    acc = {k: {"n": 0, "eq": 0, "gt1": 0, "max_abs": 0.0} for k in out_dirs}
    todo = [n for n in (names if names is not None else sorted(wb))
            if all(n in w for w in wos.values())]
    for n in todo:
        r = reference(method, n, get(wb[n], n), [get(w[n], n) for w in wfs])
        rb = r.to(torch.bfloat16)
        u = _ulp_bf16(r)
        for k, w in wos.items():
            o = get(w[n], n)
            a = acc[k]
            a["n"] += o.numel()
            a["eq"] += int((o.view(torch.int16) == rb.view(torch.int16)).sum().item())
            e = (o.to(torch.float32) - r).abs()
            a["max_abs"] = max(a["max_abs"], float(e.max().item()))
            a["gt1"] += int((e > u).sum().item())
            del o, e
        del r, rb, u
    return {k: {"frac_eq_ref": a["eq"] / max(a["n"], 1), "frac_gt1ulp": a["gt1"] / max(a["n"], 1),
                "max_abs_vs_ref": a["max_abs"]} for k, a in acc.items()}


def agreement_check(size: str, method: str, paths: Dict[str, Path], rows: List[Row],
                    outs: Dict[str, Path], check_all: bool) -> None:
    base, fts = paths["base"], [paths["ft1"], paths["ft2"]]
    done = {r.contender.kind: outs[r.contender.key] for r in rows
            if r.status == "ok" and r.runs and r.runs[0].ok and r.contender.kind != "io-floor"
            and outs[r.contender.key].is_dir()}
    if "merge_fast" not in done or "mergekit" not in done:
        return
    names = sample_names(size, check_all)
    t0 = time.perf_counter()
    try:
        if method in STOCHASTIC:
            sm = dare_stats(done["merge_fast"], base, fts, names)
            sk = dare_stats(done["mergekit"], base, fts, names)
            res = {"kind": "stats", "merge_fast": sm, "mergekit": sk,
                   "rel_gap_mean_abs_delta": abs(sm["mean_abs_delta"] - sk["mean_abs_delta"])
                   / max(sk["mean_abs_delta"], 1e-30),
                   "gap_frac_eq_base": abs(sm["frac_eq_base"] - sk["frac_eq_base"])}
            # the names/shapes/dtypes part of the usual comparison still applies
            cmp = C.compare_outputs(done["merge_fast"], done["mergekit"],
                                    (names or [])[:1] if names else None)
            res.update(names_equal=cmp["names_equal"], shapes_equal=cmp["shapes_equal"],
                       dtypes_equal=cmp["dtypes_equal"], dtype_a=cmp.get("dtype_a"),
                       dtype_b=cmp.get("dtype_b"))
        else:
            res = {"kind": "values", **C.compare_outputs(done["merge_fast"], done["mergekit"],
                                                         names)}
            if method in ("ties", "model_stock"):
                res["vs_ref"] = ref_check(done, method, base, fts, names)
    except Exception as e:  # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {e}"}
    res.update(size=size, method=method, a="merge_fast", b="mergekit", sampled=names is not None)
    AGREEMENT.append(res)
    print(f"  check {size} {method}: " + fmt_agree(res)
          + f" ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)


def fmt_agree(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    if r.get("kind") == "stats":
        m, k = r["merge_fast"], r["mergekit"]
        s = (f"{m['n_tensors']} tensors{' (sample)' if r['sampled'] else ''}, "
             f"frac == base: merge_fast {m['frac_eq_base']:.4f} vs mergekit "
             f"{k['frac_eq_base']:.4f} (gap {r['gap_frac_eq_base']:.4f}); mean |out - base|: "
             f"{m['mean_abs_delta']:.4g} vs {k['mean_abs_delta']:.4g} (rel gap "
             f"{r['rel_gap_mean_abs_delta']:.2%}); sign(out - base) == sign(sum delta): "
             f"{m['sign_agree']:.4f} vs {k['sign_agree']:.4f}")
    else:
        s = (f"{r['n_compared']} tensors{' (sample)' if r['sampled'] else ''}, max|diff| "
             f"{r['max_abs']:.3g} (max|diff|/max|ref| {r.get('max_rel', 0):.2g}), max ordered-bits dist "
             f"{r['max_ulp']}, {r['n_diff']}/{r['n_elems']} elems differ "
             f"({r['n_diff'] / max(r['n_elems'], 1):.2e})")
        if r.get("worst_tensor"):
            s += f", worst {r['worst_tensor']}"
        for k, v in (r.get("vs_ref") or {}).items():
            s += (f"; {k} vs f32 reference: {v['frac_eq_ref']:.4%} bit-equal to it rounded "
                  f"once, {v['frac_gt1ulp']:.2e} more than 1 bf16 ulp (at the element's magnitude) "
                  f"off, max|diff| {v['max_abs_vs_ref']:.3g}")
        if not r["names_equal"]:
            s += f"; NAME SETS DIFFER (only merge_fast: {r['only_a']}, only mergekit: " \
                 f"{r['only_b']})"
    if not r.get("shapes_equal", True):
        s += "; SHAPES DIFFER"
    if not r.get("dtypes_equal", True):
        s += f"; DTYPES DIFFER ({r.get('dtype_a')} vs {r.get('dtype_b')})"
    return s


# --------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------


# I/O floors by (size, inputs, fsync): methods reading the same inputs share their runs.
FLOORS: Dict[tuple, List[C.RunResult]] = {}


def run_size_method(size: str, method: str, paths: Dict[str, Path],
                    contenders: List[Contender], args, work: Path,
                    unavailable: Dict[str, str], deadline: float) -> List[Row]:
    rows = [Row(size, method, c) for c in contenders]
    for row in rows:
        if row.contender.kind in unavailable:
            row.status, row.note = "unavailable", unavailable[row.contender.kind]
        elif row.contender.kind == "mergekit" and CASES[method].mk is None:
            row.status, row.note = "unavailable", "mergekit has no such method"
    outs = {r.contender.key: work / f"{size}_{method}_{r.contender.key}" for r in rows}
    for rep in range(args.repeats):
        if rep > 0 and time.perf_counter() > deadline:
            print(f"  {size} {method}: --max-minutes reached, stopping after {rep} repeat(s)",
                  file=sys.stderr, flush=True)
            for row in rows:
                if row.status == "ok":
                    row.extra["repeats_cut"] = rep
            break
        for row in rows:
            if row.status != "ok":
                continue
            c = row.contender
            if c.kind == "mergekit" and rep >= args.mergekit_repeats:
                continue
            out = outs[c.key]
            floor_key = (size, CASES[method].inputs, c.fsync, c.direct)
            if c.kind == "io-floor" and len(FLOORS.get(floor_key, [])) > rep:
                row.runs.append(FLOORS[floor_key][rep])  # measured for an earlier method
                continue
            clean(out)
            cmd = build_cmd(c, method, paths, out, args, work)
            os.sync()
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            if c.kind == "merge_fast":
                env.update(MF_ENV)
            r = C.run_measured(cmd, env=env, timeout=args.timeout)
            row.runs.append(r)
            if c.kind == "io-floor" and r.ok:
                FLOORS.setdefault(floor_key, []).append(r)
            tag = f"{size:>5} {method:<11} {c.label:<16} rep {rep + 1}/{args.repeats}"
            if not r.ok:
                row.status = "failed"
                tail = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines()
                        or ["?"])[-1]
                row.note = f"rc={r.returncode}: {tail[:200]}"
                print(f"  {tag}: FAILED {row.note}", file=sys.stderr, flush=True)
                if args.verbose:
                    print(r.stderr[-4000:], file=sys.stderr)
                continue
            print(f"  {tag}: {r.wall_s:7.2f} s  cpu {r.user_s + r.sys_s:6.1f} s  rss "
                  f"{r.peak_rss_mb:6.0f} MB  anon {r.peak_anon_mb:6.0f} MB  load "
                  f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            if rep == 0 and c.kind == "merge_fast":
                row.extra["shards"] = out_shards(out)
                try:
                    row.extra["api"] = json.loads(r.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    pass
            if rep == 0 and c.kind != "io-floor":
                continue  # keep repeat-1 outputs for the agreement check
            clean(out)
        if rep == 0:
            agreement_check(size, method, paths, rows, outs, args.check_all)
            for row in rows:
                clean(outs[row.contender.key])
    return rows


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def floor_of(rs: List[Row], fsync: bool) -> float:
    """The median I/O floor a contender is measured against: the fsynced floor for a merge
    that fsyncs (merge_fast's default), the plain one otherwise (mergekit never fsyncs)."""
    return next((r.med for r in rs if r.contender.kind == "io-floor" and not r.contender.direct
                 and r.contender.fsync == fsync and r.walls()), float("nan"))


def table(rows: List[Row], markdown: bool) -> str:
    hdr = ["contender", "size", "method", "runs", "median s", "min / max s", "CPU s",
           "peak RSS MB", "anon MB", "x I/O floor", "speedup vs mergekit", "note"]
    by: Dict[tuple, List[Row]] = {}
    for r in rows:
        by.setdefault((r.size, r.method), []).append(r)
    body = []
    for (size, method), rs in by.items():
        mk = next((r.med for r in rs if r.contender.kind == "mergekit"), float("nan"))
        for r in rs:
            w = r.walls()
            note = r.note if r.status != "ok" else ""
            if r.status == "ok" and "shards" in r.extra:
                note = f"out {r.extra['shards']}"
                api_s = (r.extra.get("api") or {}).get("seconds")
                if isinstance(api_s, (int, float)):
                    note += f"; in-process {api_s:.2f} s (rep 1)"
            if r.status != "ok" and not w:
                body.append([r.contender.label, size, method, "0", r.status, "", "", "", "",
                             "", "", note[:80]])
                continue
            body.append([
                r.contender.label, size, method, str(len(w)), fnum(r.med),
                f"{fnum(min(w))} / {fnum(max(w))}" if w else "-", fnum(r.cpu, "{:.1f}"),
                fnum(r.rss, "{:.0f}"), fnum(r.anon, "{:.0f}"),
                fnum(r.med / floor_of(rs, r.contender.fsync)) if r.contender.kind != "io-floor"
                else "1.00",
                fnum(mk / r.med) if r.contender.kind == "merge_fast" else "-",
                note[:80],
            ])
    lines = []
    if markdown:
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "|".join("---" if i in (0, 1, 2, 11) else "---:"
                                    for i in range(len(hdr))) + "|")
        for b in body:
            lines.append("| " + " | ".join(b) + " |")
    else:
        widths = [max(len(hdr[i]), *(len(b[i]) for b in body)) if body else len(hdr[i])
                  for i in range(len(hdr))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for b in body:
            lines.append("  ".join(x.ljust(w) for x, w in zip(b, widths)))
    return "\n".join(lines)


def targets(rows: List[Row]) -> List[str]:
    out = []
    by: Dict[tuple, List[Row]] = {}
    for r in rows:
        by.setdefault((r.size, r.method), []).append(r)
    for (size, method), rs in by.items():
        note = "" if size == "1.1b" else "  (targets are defined for 1.1b; informational)"
        mk = next((r for r in rs if r.contender.kind == "mergekit"), None)
        mf = next((r for r in rs if r.contender.kind == "merge_fast"), None)
        if mf is None or mf.status != "ok" or not mf.walls():
            why = mf.note if mf else "not run"
            out.append(f"{'N/A ' if mf is None or mf.status == 'unavailable' else 'FAIL'} "
                       f"{size} {method}: merge_fast {mf.status if mf else ''} ({why})")
            continue
        n = len(mf.walls())
        if mk and mk.walls():
            sp = mk.med / mf.med
            out.append(f"{'PASS' if sp >= TARGET_SPEEDUP else 'FAIL'} {size} {method}: "
                       f"{sp:.1f}x faster than mergekit ({mk.med:.2f} s vs {mf.med:.2f} s, "
                       f"median of {len(mk.walls())}/{n}); target >= {TARGET_SPEEDUP}x{note}")
        elif mk:
            out.append(f"N/A  {size} {method}: mergekit {mk.status} ({mk.note})")
        for r in rs:
            if r.contender.kind != "merge_fast" or not r.walls():
                continue
            fl = floor_of(rs, r.contender.fsync)
            if fl == fl and method not in NO_FLOOR_TARGET:
                goal = TARGET_FLOOR_ONE_PASS.get(method, TARGET_FLOOR)
                x = r.med / fl
                out.append(f"{'PASS' if x <= goal else 'FAIL'} {size} {method}: {r.contender.label} "
                           f"at {x:.2f}x its {'fsynced ' if r.contender.fsync else ''}I/O floor "
                           f"({r.med:.2f} s vs {fl:.2f} s); target <= {goal}x{note}")
        out.append(f"{'PASS' if mf.rss <= TARGET_RSS_MB else 'FAIL'} {size} {method}: "
                   f"merge_fast peak RSS {mf.rss:.0f} MB (VmHWM, incl. file-backed mmap pages, "
                   f"max of {n}); target <= {TARGET_RSS_MB:.0f} MB{note}")
        out.append(f"{'PASS' if mf.anon <= TARGET_RSS_MB else 'FAIL'} {size} {method}: "
                   f"merge_fast peak anon {mf.anon:.0f} MB (RssAnon+RssShmem, polled); "
                   f"target <= {TARGET_RSS_MB:.0f} MB{note}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sizes", default="125m,1.1b",
                    help=f"comma list of {','.join(C.SPECS)} (default 125m,1.1b)")
    ap.add_argument("--only", default=",".join(METHODS), help="methods: " + ",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per contender, median reported (default 3; 1 for --sizes tiny)")
    ap.add_argument("--contenders", default="io-floor,io-floor-fsync,merge_fast,mergekit",
                    help="subset of io-floor,io-floor-fsync,io-floor-direct,merge_fast (fsyncs its output, "
                         "the default),merge_fast-nofsync,mergekit")
    ap.add_argument("--mergekit-repeats", type=int, default=None,
                    help="run mergekit only on the first N repeats (default: all); its "
                         "median is then over N runs -- for when a mergekit run takes minutes")
    ap.add_argument("--mf-python", default=sys.executable,
                    help="interpreter that has merge_fast installed")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml") or "mergekit-yaml")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for merge_fast / mergekit (default: their default)")
    ap.add_argument("--seed", type=int, default=42, help="dare_ties seed (both tools)")
    ap.add_argument("--delta-std", type=float, default=0.002,
                    help="fine-tune delta std (weights' std is 0.02)")
    ap.add_argument("--delta-corr", type=float, default=0.5,
                    help="correlation of the two fine-tunes' deltas")
    ap.add_argument("--frozen", default="",
                    help="comma-separated parts of tensor names the fine-tunes leave equal to the base "
                         "(e.g. embed,lm_head,norm)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(C.DTYPES),
                    help="the models' stored dtype (fine-tunes on the hub come in all three)")
    ap.add_argument("--data", default=str(C.BENCH_DATA))
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the generated models (default: delete 1.1b inputs at the end)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="start no new repeat after this many minutes (repeat 1 always runs)")
    ap.add_argument("--check-all", action="store_true",
                    help="agreement check on every tensor (default: a sample, except tiny)")
    ap.add_argument("--markdown", action="store_true", help="also print a README-ready table")
    ap.add_argument("--json", default=None, help="write all raw results to this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        C.get_spec(s)
    if args.repeats is None:
        args.repeats = 1 if sizes == ["tiny"] else 3
    if args.mergekit_repeats is None:
        args.mergekit_repeats = args.repeats
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m}; known: {', '.join(METHODS)}")
    kinds = [k.strip() for k in args.contenders.split(",")]
    data = Path(args.data)
    work = data / "out_methods"
    work.mkdir(parents=True, exist_ok=True)
    deadline = (time.perf_counter() + 60 * args.max_minutes if args.max_minutes
                else float("inf"))

    unavailable: Dict[str, str] = {}
    if os.sep in args.mf_python:  # runs are started from another working directory
        args.mf_python = os.path.abspath(args.mf_python)
    ok, info = mf_available(args.mf_python)
    print(f"merge_fast: {'available ' + info if ok else 'UNAVAILABLE (' + info + ')'}",
          file=sys.stderr)
    if not ok:
        unavailable["merge_fast"] = f"unavailable: {info}"
    if shutil.which(args.mergekit) is None and not Path(args.mergekit).exists():
        unavailable["mergekit"] = "mergekit-yaml not found"

    contenders: List[Contender] = []
    if "io-floor" in kinds:
        contenders.append(Contender("io-floor", "I/O floor", "io-floor"))
    if "io-floor-fsync" in kinds:
        contenders.append(Contender("io-floor-fsync", "I/O floor, fsync", "io-floor", True))
    if "io-floor-direct" in kinds:
        contenders.append(Contender("io-floor-direct", "I/O floor, O_DIRECT", "io-floor", True, True))
    if "merge_fast" in kinds:
        contenders.append(Contender("merge_fast", "merge_fast", "merge_fast", True))
    if "merge_fast-nofsync" in kinds:
        contenders.append(Contender("merge_fast-nofsync", "merge_fast --no-fsync", "merge_fast"))
    if "mergekit" in kinds:
        label = "mergekit"
        try:
            import importlib.metadata as md
            label = f"mergekit {md.version('mergekit')}"
        except Exception:  # noqa: BLE001
            pass
        contenders.append(Contender("mergekit", label, "mergekit"))

    t_start = time.perf_counter()
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows: List[Row] = []
    generated: List[Path] = []
    for size in sizes:
        print(f"[{size}] preparing base + 2 fine-tunes in {data}", file=sys.stderr, flush=True)
        base, fts = C.ensure_model_set(size, 2, args.delta_std, args.delta_corr, root=data,
                                       frozen=tuple(f for f in args.frozen.split(",") if f),
                                       dtype=args.dtype)
        paths = {"base": base, "ft1": fts[0], "ft2": fts[1]}
        generated += [base, *fts]
        if any(k.startswith("fisher") for m in methods for k in CASES[m].inputs):
            fishers = ensure_fishers(size, fts, data)
            paths.update(fisher1=fishers[0], fisher2=fishers[1])
            generated += fishers
        nbytes = C.warm_page_cache([f for p in paths.values() for f in C.shard_files(p)])
        print(f"[{size}] warmed page cache ({nbytes / 1e9:.2f} GB read)", file=sys.stderr,
              flush=True)
        for method in methods:
            rows += run_size_method(size, method, paths, contenders, args, work,
                                    unavailable, deadline)

    total = time.perf_counter() - t_start
    print()
    print(f"# merge_fast methods bench  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"repeats={args.repeats}, total {total:.0f} s)")
    print(f"# load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(load at start: {load0})")
    print(f"# base + 2 fine-tunes (delta std {args.delta_std:g}, corr {args.delta_corr:g}"
          f"{', frozen ' + args.frozen if args.frozen else ''}); "
          f"ties/dare_ties density {DENSITY} weight {WEIGHTS[0]} each, dare_ties seed "
          f"{args.seed}; bf16 in/out")
    print("# wall = median subprocess wall time (imports included); CPU = median user+sys; "
          "inputs in page cache; merge_fast fsyncs (its default; x floor vs the fsynced "
          "floor), mergekit does not (x floor vs the plain floor); peak RSS = max over repeats of VmHWM (incl. "
          "file-backed mmap pages); anon = polled RssAnon+RssShmem")
    print(table(rows, markdown=False))
    if args.markdown:
        print()
        print(table(rows, markdown=True))
    print()
    print("Agreement (repeat 1 outputs, merge_fast vs mergekit):")
    for r in AGREEMENT:
        print(f"  {r['size']} {r['method']}: {fmt_agree(r)}")
    if not AGREEMENT:
        print("  (nothing to compare)")
    print()
    print("Targets:")
    for line in targets(rows):
        print("  " + line)

    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args),
            "rows": [{"size": r.size, "method": r.method, "contender": r.contender.key,
                      "status": r.status, "note": r.note, "extra": r.extra,
                      "runs": [{k: v for k, v in dataclasses.asdict(x).items()
                                if k not in ("stdout", "stderr")} for x in r.runs]}
                     for r in rows],
            "agreement": AGREEMENT, "targets": targets(rows)}, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    if not args.keep_data:
        for p in generated:
            if C.get_spec(p.name.split("_")[0]).n_bytes > 1e9:
                shutil.rmtree(p, ignore_errors=True)
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
