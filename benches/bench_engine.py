#!/usr/bin/env python
"""Engine benchmark: merge_fast linear / slerp vs the I/O floor, a naive torch script, mergekit.

For each size (synthetic Llama-shaped bf16 pairs, see ``_common.py``) and method, every
contender runs ``--repeats`` times in its own subprocess, contenders interleaved round-robin
(repeat 1 of all, then repeat 2 of all, ...) so machine noise spreads over all of them:

* ``io-floor``         read every input byte once (16 MB reads, discarded) + write one file of the
                       output's size (16 MB writes, no fsync), sequential, one thread.
                       read() copies page-cache pages into a user buffer, which an
                       mmap-based engine does not, so on a slow-memcpy VM merge_fast can
                       come in slightly *under* this floor (ratio < 1);
* ``merge_fast``       ``merge_fast.linear`` / ``merge_fast.slerp`` (Python API in a fresh
                       ``python -c``; ``--mf-via cli`` uses the ``merge-fast`` CLI), once per
                       ``--mf-shard-sizes`` entry (default 5GB and 500MB);
* ``naive-torch``      ``benches/naive_merge.py``: safe_open(pt) + f32 math + save_file/shard;
* ``mergekit``         ``mergekit-yaml cfg.yml OUT --lazy-unpickle --no-copy-tokenizer --quiet``
                       (CPU, default threads, default 5B-param output shards).

Caching: inputs are read once before timing and again by every io-floor run, so *all
contenders read from the page cache* (the page cache is never dropped: shared machine).
``os.sync()`` runs before every timed run (outside the timing) so the previous contender's dirty
pages are not flushed on the next one's clock.  No contender fsyncs.

Wall time is the subprocess's (interpreter start and imports included -- what a user waits for).
Memory: ``peak RSS`` = the child's ``VmHWM`` (kernel high-water mark of RSS, polled every 10 ms,
summed over its process tree; *includes file-backed pages of memory-mapped inputs*);
``anon`` = polled peak of RssAnon+RssShmem over the process tree
(private memory only).  See ``_common.py``.

On repeat 1 the outputs are checked against each other (tensor names, shapes, dtype, max |diff|,
max bf16 ulp) so the timings compare the same merge.

    python benches/bench_engine.py --sizes tiny            # smoke test, < 1 min
    python benches/bench_engine.py --sizes 125m,1.1b       # the full bench
    python benches/bench_engine.py --sizes 1.1b --only slerp --repeats 5 --markdown
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
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import Row, clean, fnum, out_shards  # noqa: E402

HERE = Path(__file__).resolve().parent
LINEAR_WEIGHTS = (0.5, 0.5)
SLERP_T = 0.3

# targets (checked on the 1.1b pair)
TARGET_FLOOR_RATIO = 1.5
TARGET_SPEEDUP = 5.0
TARGET_RSS_MB = 1024.0


@dataclasses.dataclass
class Contender:
    key: str  # unique id, e.g. "merge_fast[500MB]"
    label: str
    kind: str  # io-floor | merge_fast | naive | mergekit
    shard: Optional[str] = None


# --------------------------------------------------------------------------------------------
# merge_fast availability
# --------------------------------------------------------------------------------------------


MF_ENV: Dict[str, str] = {}  # extra environment for merge_fast runs (PYTHONPATH fallback)


def mf_available(python: str, via: str) -> tuple[bool, str]:
    """Is merge_fast importable (installed, or in-tree under python/ with a built _core)?"""
    code = ("import merge_fast as mf; mf.linear; mf.slerp; "
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
            if via == "cli" and shutil.which("merge-fast") is None:
                return False, "merge-fast CLI not on PATH"
            return True, p.stdout.strip() + (" (via PYTHONPATH=python/)" if extra else "")
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
    return False, last


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def mf_cmd(python: str, via: str, method: str, a: Path, b: Path, out: Path, shard: str,
           threads: Optional[int]) -> List[str]:
    if via == "cli":
        cmd = ["merge-fast", method, str(a), str(b)]
        if method == "linear":
            cmd += ["--weights", *map(str, LINEAR_WEIGHTS)]
        else:
            cmd += ["--t", str(SLERP_T)]
        cmd += ["-o", str(out), "--out-shard-size", shard, "--quiet"]
        if threads:
            cmd += ["--threads", str(threads)]
        return cmd
    if method == "linear":
        call = (f"mf.linear([{str(a)!r}, {str(b)!r}], weights={list(LINEAR_WEIGHTS)!r}, "
                f"out={str(out)!r}, threads={threads!r}, max_shard_size={shard!r}, "
                f"progress=False)")
    else:
        call = (f"mf.slerp({str(a)!r}, {str(b)!r}, t={SLERP_T!r}, out={str(out)!r}, "
                f"threads={threads!r}, max_shard_size={shard!r}, progress=False)")
    code = ("import json, merge_fast as mf\n"
            f"r = {call}\n"
            "print(json.dumps({k: getattr(r, k, None) for k in ('tensors_written', "
            "'bytes_read', 'bytes_written', 'seconds')}))\n")
    return [python, "-c", code]


def mergekit_yaml(method: str, a: Path, b: Path) -> str:
    if method == "linear":
        return (f"merge_method: linear\nmodels:\n"
                f"  - model: {a}\n    parameters:\n      weight: {LINEAR_WEIGHTS[0]}\n"
                f"  - model: {b}\n    parameters:\n      weight: {LINEAR_WEIGHTS[1]}\n"
                f"dtype: bfloat16\n")
    return (f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
            f"parameters:\n  t: {SLERP_T}\ndtype: bfloat16\n")


def build_cmd(c: Contender, method: str, a: Path, b: Path, out: Path, args,
              work: Path) -> List[str]:
    if c.kind == "io-floor":
        out_bytes = C.dir_bytes(a)  # merged output has the inputs' tensors, dtype and size
        return [sys.executable, str(HERE / "_common.py"), "io-floor", "--inputs",
                *map(str, C.shard_files(a) + C.shard_files(b)),
                "--out-file", str(out) + ".bin", "--out-bytes", str(out_bytes)]
    if c.kind == "merge_fast":
        return mf_cmd(args.mf_python, args.mf_via, method, a, b, out, c.shard, args.threads)
    if c.kind == "naive":
        cmd = [sys.executable, str(HERE / "naive_merge.py"), method, str(a), str(b), "-o",
               str(out)]
        if method == "linear":
            return cmd + ["--weights", *map(str, LINEAR_WEIGHTS)]
        return cmd + ["--t", str(SLERP_T)]
    if c.kind == "mergekit":
        cfg = work / f"mergekit_{method}.yml"
        cfg.write_text(mergekit_yaml(method, a, b))
        cmd = [args.mergekit, str(cfg), str(out), "--lazy-unpickle", "--no-copy-tokenizer",
               "--quiet"]
        if args.threads:
            cmd += ["-j", str(args.threads)]
        return cmd
    raise ValueError(c.kind)


def sample_names(a: Path, size: str, check_all: bool = False) -> Optional[List[str]]:
    """None = compare all tensors (tiny, or --check-all); a representative sample otherwise
    (embeddings, lm_head, final norm, every projection and a norm of the first and last layer)."""
    if size == "tiny" or check_all:
        return None
    spec = C.get_spec(size)
    last = spec.layers - 1
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for n in (0, last):
        p = f"model.layers.{n}."
        names += [p + s for s in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                  "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight", "input_layernorm.weight")]
    return names


# --------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------


def run_size_method(size: str, method: str, a: Path, b: Path, contenders: List[Contender],
                    args, work: Path, unavailable: Dict[str, str]) -> List[Row]:
    rows = [Row(size, method, c) for c in contenders]
    for row in rows:
        if row.contender.kind in unavailable:
            row.status, row.note = "unavailable", unavailable[row.contender.kind]
    outs = {r.contender.key:
            work / f"{size}_{method}_{r.contender.key.replace('[', '_').strip(']')}"
            for r in rows}
    for rep in range(args.repeats):
        for row in rows:
            if row.status not in ("ok",):
                continue
            c = row.contender
            out = outs[c.key]
            clean(out)
            cmd = build_cmd(c, method, a, b, out, args, work)
            os.sync()
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            if c.kind == "merge_fast":
                env.update(MF_ENV)
            r = C.run_measured(cmd, env=env, timeout=args.timeout)
            row.runs.append(r)
            tag = f"{size:>5} {method:<6} {c.label:<24} rep {rep + 1}/{args.repeats}"
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
            if rep == 0:
                if c.kind == "merge_fast":
                    row.extra["shards"] = out_shards(out)
                    try:
                        row.extra["api"] = json.loads(r.stdout.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        pass
                if c.kind == "io-floor":
                    try:
                        row.extra["io"] = json.loads(r.stdout.strip().splitlines()[-1])
                    except (ValueError, IndexError):
                        pass
            if rep == 0 and c.kind != "io-floor":
                continue  # keep repeat-1 outputs for the agreement check
            clean(out)
        if rep == 0:
            agreement_check(size, method, a, rows, outs, args.check_all)
            for row in rows:
                clean(outs[row.contender.key])
    return rows


AGREEMENT: List[dict] = []


def agreement_check(size: str, method: str, a: Path, rows: List[Row], outs,
                    check_all: bool = False) -> None:
    done = {r.contender.key: outs[r.contender.key] for r in rows
            if r.status == "ok" and r.runs and r.runs[0].ok and r.contender.kind != "io-floor"
            and outs[r.contender.key].is_dir()}
    ref = "naive-torch" if "naive-torch" in done else None
    pairs = []
    keys = list(done)
    mf_keys = [k for k in keys if k.startswith("merge_fast")]
    if ref:
        pairs += [(k, ref) for k in keys if k != ref]
    if mf_keys and "mergekit" in done:
        pairs.append((mf_keys[0], "mergekit"))
    for k in mf_keys[1:]:
        pairs.append((k, mf_keys[0]))
    names = sample_names(a, size, check_all)
    for x, y in pairs:
        t0 = time.perf_counter()
        try:
            res = C.compare_outputs(done[x], done[y], names)
        except Exception as e:  # noqa: BLE001
            res = {"error": f"{type(e).__name__}: {e}"}
        res.update(size=size, method=method, a=x, b=y, sampled=names is not None)
        AGREEMENT.append(res)
        print(f"  check {size} {method}: {x} vs {y}: " + fmt_agree(res)
              + f" ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)


def fmt_agree(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    s = (f"{r['n_compared']} tensors{' (sample)' if r['sampled'] else ''}, max|diff| "
         f"{r['max_abs']:.3g} (max|diff|/max|ref| {r.get('max_rel', 0):.2g}), max ulp "
         f"{r['max_ulp']}, {r['n_diff']}/{r['n_elems']} elems differ")
    if r.get("worst_tensor"):
        s += f", worst {r['worst_tensor']}"
    if not r["names_equal"]:
        s += f"; NAME SETS DIFFER (only {r['a']}: {r['only_a']}, only {r['b']}: {r['only_b']})"
    if not r["shapes_equal"]:
        s += "; SHAPES DIFFER"
    if not r["dtypes_equal"]:
        s += f"; DTYPES DIFFER ({r.get('dtype_a')} vs {r.get('dtype_b')})"
    return s


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def table(rows: List[Row], markdown: bool) -> str:
    hdr = ["contender", "size", "method", "median s", "min / max s", "CPU s", "peak RSS MB",
           "anon MB", "x I/O floor", "speedup vs mergekit", "note"]
    lines = []
    by = {}
    for r in rows:
        by.setdefault((r.size, r.method), []).append(r)
    body = []
    for (size, method), rs in by.items():
        floor = next((r.med for r in rs if r.contender.kind == "io-floor"), float("nan"))
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
                body.append([r.contender.label, size, method, r.status, "", "", "", "", "",
                             "", note])
                continue
            body.append([
                r.contender.label, size, method, fnum(r.med),
                f"{fnum(min(w))} / {fnum(max(w))}" if w else "-", fnum(r.cpu, "{:.1f}"),
                fnum(r.rss, "{:.0f}"), fnum(r.anon, "{:.0f}"),
                fnum(r.med / floor) if r.contender.kind != "io-floor" else "1.00",
                fnum(mk / r.med) if r.contender.kind != "io-floor" else "-",
                note[:80],
            ])
    if markdown:
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "|".join("---" if i in (0, 1, 2, 10) else "---:"
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
    by = {}
    for r in rows:
        by.setdefault((r.size, r.method), []).append(r)
    for (size, method), rs in by.items():
        note = "" if size == "1.1b" else "  (targets are defined for 1.1b; informational)"
        floor = next((r for r in rs if r.contender.kind == "io-floor"), None)
        mk = next((r for r in rs if r.contender.kind == "mergekit"), None)
        mfs = [r for r in rs if r.contender.kind == "merge_fast"]
        if not mfs or all(r.status != "ok" or not r.walls() for r in mfs):
            why = mfs[0].note if mfs else "not run"
            out.append(f"N/A  {size} {method}: merge_fast unavailable ({why})")
            continue
        main = next(r for r in mfs if r.status == "ok" and r.walls())
        if floor and floor.walls():
            ratio = main.med / floor.med
            out.append(f"{'PASS' if ratio <= TARGET_FLOOR_RATIO else 'FAIL'} {size} {method}: "
                       f"{main.contender.label} median {main.med:.2f} s = {ratio:.2f} x I/O floor "
                       f"({floor.med:.2f} s); target <= {TARGET_FLOOR_RATIO}{note}")
        if mk and mk.walls():
            sp = mk.med / main.med
            out.append(f"{'PASS' if sp >= TARGET_SPEEDUP else 'FAIL'} {size} {method}: "
                       f"{sp:.1f}x faster than mergekit ({mk.med:.2f} s vs {main.med:.2f} s); "
                       f"target >= {TARGET_SPEEDUP}x{note}")
        for r in mfs:
            if r.status != "ok" or not r.walls():
                out.append(f"FAIL {size} {method}: {r.contender.label} {r.status}: {r.note}")
                continue
            out.append(f"{'PASS' if r.rss <= TARGET_RSS_MB else 'FAIL'} {size} {method}: "
                       f"{r.contender.label} peak RSS {r.rss:.0f} MB (VmHWM, incl. "
                       f"file-backed mmap pages); target <= {TARGET_RSS_MB:.0f} MB{note}")
            out.append(f"{'PASS' if r.anon <= TARGET_RSS_MB else 'FAIL'} {size} {method}: "
                       f"{r.contender.label} peak anon {r.anon:.0f} MB (RssAnon+RssShmem, "
                       f"polled); target <= {TARGET_RSS_MB:.0f} MB{note}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sizes", default="125m,1.1b",
                    help=f"comma list of {','.join(C.SPECS)} (default 125m,1.1b)")
    ap.add_argument("--only", default="linear,slerp", help="methods: linear,slerp")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per contender, median reported (default 3; 1 for --sizes tiny)")
    ap.add_argument("--contenders", default="io-floor,merge_fast,naive,mergekit",
                    help="subset of io-floor,merge_fast,naive,mergekit")
    ap.add_argument("--mf-shard-sizes", default="5GB,500MB",
                    help="merge_fast output shard sizes, one merge_fast row each")
    ap.add_argument("--mf-via", choices=["api", "cli"], default="api")
    ap.add_argument("--mf-python", default=sys.executable,
                    help="interpreter that has merge_fast installed")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml") or "mergekit-yaml")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for merge_fast / mergekit (default: their default)")
    ap.add_argument("--data", default=str(C.BENCH_DATA))
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the generated models (default: delete 1.1b inputs at the end)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per run, seconds")
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
    methods = [m.strip() for m in args.only.split(",") if m.strip()]
    for m in methods:
        if m not in ("linear", "slerp"):
            ap.error(f"unknown method {m}")
    kinds = [k.strip() for k in args.contenders.split(",")]
    data = Path(args.data)
    work = data / "out"
    work.mkdir(parents=True, exist_ok=True)

    unavailable: Dict[str, str] = {}
    ok, info = mf_available(args.mf_python, args.mf_via)
    print(f"merge_fast: {'available ' + info if ok else 'UNAVAILABLE (' + info + ')'}",
          file=sys.stderr)
    if not ok:
        unavailable["merge_fast"] = f"unavailable: {info}"
    if shutil.which(args.mergekit) is None and not Path(args.mergekit).exists():
        unavailable["mergekit"] = "mergekit-yaml not found"

    contenders: List[Contender] = []
    if "io-floor" in kinds:
        contenders.append(Contender("io-floor", "I/O floor", "io-floor"))
    if "merge_fast" in kinds:
        for sh in [s.strip() for s in args.mf_shard_sizes.split(",") if s.strip()]:
            contenders.append(Contender(f"merge_fast[{sh}]", f"merge_fast (shard {sh})",
                                        "merge_fast", sh))
    if "naive" in kinds:
        contenders.append(Contender("naive-torch", "naive torch+safetensors", "naive"))
    if "mergekit" in kinds:
        contenders.append(Contender("mergekit", "mergekit", "mergekit"))
    try:
        import importlib.metadata as md
        mk_ver = md.version("mergekit")
        for c in contenders:
            if c.kind == "mergekit":
                c.label = f"mergekit {mk_ver}"
    except Exception:  # noqa: BLE001
        pass

    t_start = time.perf_counter()
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows: List[Row] = []
    generated: List[Path] = []
    for size in sizes:
        print(f"[{size}] preparing inputs in {data}", file=sys.stderr, flush=True)
        a, b = C.ensure_pair(size, data)
        generated += [a, b]
        nbytes = C.warm_page_cache(C.shard_files(a) + C.shard_files(b))
        print(f"[{size}] warmed page cache ({nbytes / 1e9:.2f} GB read)", file=sys.stderr,
              flush=True)
        for method in methods:
            rows += run_size_method(size, method, a, b, contenders, args, work, unavailable)

    total = time.perf_counter() - t_start
    print()
    print(f"# merge_fast engine bench  ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"repeats={args.repeats}, total {total:.0f} s)")
    print(f"# load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(load at start: {load0})")
    print("# wall = median subprocess wall time (imports included); CPU = median user+sys; "
          "inputs in page cache; "
          "no fsync; peak RSS = max over repeats of VmHWM (incl. file-backed mmap pages); "
          "anon = polled RssAnon+RssShmem")
    print(table(rows, markdown=False))
    if args.markdown:
        print()
        print(table(rows, markdown=True))
    print()
    print("Agreement (repeat 1 outputs):")
    for r in AGREEMENT:
        print(f"  {r['size']} {r['method']}: {r['a']} vs {r['b']}: {fmt_agree(r)}")
    if not AGREEMENT:
        print("  (nothing to compare)")
    print()
    print("Targets:")
    for line in targets(rows):
        print("  " + line)

    if args.json:
        Path(args.json).write_text(json.dumps({
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
    failed = any(r.status == "failed" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
