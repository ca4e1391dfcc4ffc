"""Shared helpers for merge_fast benchmarks.

Two halves, both meant to be reused by every bench in this folder:

* **Synthetic models** -- Llama-shaped bf16 checkpoints in the Hugging Face layout
  (``config.json`` for ``LlamaForCausalLM``, sharded ``model-0000i-of-0000n.safetensors``
  plus ``model.safetensors.index.json``, transformers tensor names).  Values come from
  numpy's seeded PCG64, one independent stream per tensor (seeded from the model seed and a
  CRC of the tensor name), so any tensor can be regenerated alone.  A model can be a
  *fine-tune* of a base: ``base + delta_std * N(0, 1)`` where the base tensor is regenerated
  from ``base_seed`` -- that makes TIES / DARE / model_stock benches meaningful without ever
  loading the base.  Generation streams shard by shard (peak RAM ~ one shard + one tensor) and
  is cached: a folder whose ``bench_meta.json`` matches the request is reused as it is.

* **Measurement** -- :func:`run_measured` runs a command in a subprocess and reports its wall
  time and memory:

  - ``peak_rss_mb``: peak resident set size, from ``VmHWM`` in ``/proc/<pid>/status`` (the
    kernel's own high-water mark of the process's RSS since its ``exec``), polled every 10 ms
    and summed over the child and its descendants.  RSS counts *everything resident in the
    process's page tables*: anonymous memory **and file-backed pages of memory-mapped files**
    (so a tool that mmaps its inputs and touches all of them is charged for them here even
    though the kernel can drop those pages at will).  Growth in the last <= 10 ms before exit
    can be missed.  (``ru_maxrss`` from ``wait4`` is *not* used: Linux carries the forking
    parent's RSS into the child's ``ru_maxrss`` across ``exec``, so it reads >= the bench
    process's own RSS; it is kept as ``ru_maxrss_mb`` for reference.)
  - ``peak_anon_mb``: peak, over the same polls, of the summed ``RssAnon + RssShmem`` --
    private memory that cannot be reclaimed without swap (there is no swap here).  A spike
    shorter than the poll interval can be missed.
  - ``peak_tree_rss_mb``: the same poll, max of summed current ``VmRSS``.

Run ``python benches/_common.py generate --size 125m --out bench_data/x`` to generate by hand.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DATA = REPO_ROOT / "bench_data"
GENERATOR_VERSION = 1
MB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# Model shapes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """Shape of a Llama-style decoder (untied lm_head, GQA)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    shard_bytes: int  # max bytes per generated input shard (HF-style greedy packing)
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """(name, shape) in the order transformers saves them."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def n_params(self) -> int:
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def n_bytes(self) -> int:  # bf16 payload
        return 2 * self.n_params

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "bfloat16",
            "use_cache": True,
        }


SPECS: Dict[str, LlamaSpec] = {
    # smoke-test size: a few hundred KB, several shards so the multi-shard paths are exercised
    "tiny": LlamaSpec("tiny", hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2,
                      vocab=512, shard_bytes=96 * 1024, max_position_embeddings=256),
    # ~124.7M params (GPT-2-small-ish width, Llama block), 3 input shards of <= 100 MB
    "125m": LlamaSpec("125m", hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4,
                      vocab=32000, shard_bytes=100 * 1000 * 1000),
    # TinyLlama-1.1B shape: ~1.10B params, 2.2 GB bf16, 3 input shards of <= 1 GB
    "1.1b": LlamaSpec("1.1b", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4,
                      vocab=32000, shard_bytes=1000 * 1000 * 1000),
    # Llama-3.2-3B shape with its 128k vocabulary, embeddings untied: ~3.6B params, 7.2 GB bf16.
    # Three such inputs and an output exceed a 24 GB machine's page cache: the disk-bound regime
    "3b": LlamaSpec("3b", hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8,
                    vocab=128256, shard_bytes=2000 * 1000 * 1000, rope_theta=500000.0),
}


def get_spec(size: str) -> LlamaSpec:
    try:
        return SPECS[size.lower()]
    except KeyError:
        raise SystemExit(f"unknown size {size!r}; known: {', '.join(SPECS)}") from None


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _tensor_seed(seed: int, name: str) -> List[int]:
    return [int(seed), zlib.crc32(name.encode()) & 0xFFFFFFFF]


def _base_values(name: str, shape: Tuple[int, ...], seed: int):
    """f32 values of one base tensor: N(0, 0.02) weights, 1 + N(0, 0.02) norm gains."""
    import numpy as np

    rng = np.random.default_rng(_tensor_seed(seed, name))
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(0.02)
    if name.endswith("norm.weight"):
        x += np.float32(1.0)
    return x


# Stored dtypes of generated checkpoints, by their names in configs (numpy's too, bf16 from
# ml_dtypes). Fine-tunes on the hub come in all three; bf16 is the default and what the tables
# measure.
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}


def tensor_values(name: str, shape: Tuple[int, ...], seed: int,
                  base_seed: Optional[int] = None, delta_std: float = 0.0,
                  delta_corr: float = 0.0, frozen: Sequence[str] = (), dtype: str = "bf16"):
    """Values of one tensor, exactly as :func:`generate_model` writes them (``dtype``: a key of
    :data:`DTYPES`; bf16 from ml_dtypes), rounded once from float32.

    ``base_seed`` None: an independent model from ``seed``.  Otherwise a fine-tune of the base
    model ``base_seed``: base + ``delta_std`` * (sqrt(c) * S + sqrt(1 - c) * N) with
    c = ``delta_corr``, N ~ N(0, 1) drawn from ``seed`` and S ~ N(0, 1) shared by every
    fine-tune of that base (so two fine-tunes' deltas have correlation ~c: with c > 0 the
    TIES sign election has a majority to find). A fine-tune's tensors whose names contain one
    of ``frozen`` equal the base's (layers a fine-tune left unchanged, e.g. embeddings).
    """
    import ml_dtypes
    import numpy as np

    if base_seed is None or any(f in name for f in frozen):
        x = _base_values(name, shape, seed if base_seed is None else base_seed)
    else:
        x = _base_values(name, shape, base_seed)
        rng = np.random.default_rng(_tensor_seed(seed, "delta:" + name))
        d = rng.standard_normal(shape, dtype=np.float32)
        if delta_corr > 0.0:
            d *= np.float32((1.0 - delta_corr) ** 0.5)
            srng = np.random.default_rng(_tensor_seed(base_seed, "shared-delta:" + name))
            sh = srng.standard_normal(shape, dtype=np.float32)
            sh *= np.float32(delta_corr ** 0.5)
            d += sh
            del sh
        d *= np.float32(delta_std)
        x += d
        del d
    return x.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.dtype(DTYPES[dtype]))


def plan_shards(spec: LlamaSpec) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    """Greedy HF-style packing of tensors (in save order) into shards of <= shard_bytes."""
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in spec.tensors():
        n = 2
        for d in shape:
            n *= d
        if shards[-1] and used + n > spec.shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    return shards


def _meta(spec: LlamaSpec, seed: int, base_seed: Optional[int], delta_std: float,
          delta_corr: float = 0.0, frozen: Sequence[str] = (), dtype: str = "bf16") -> dict:
    m = {
        "generator_version": GENERATOR_VERSION,
        "spec": dataclasses.asdict(spec),
        "seed": seed,
        "base_seed": base_seed,
        "delta_std": delta_std if base_seed is not None else 0.0,
    }
    if base_seed is not None and delta_corr:
        m["delta_corr"] = delta_corr
    if base_seed is not None and frozen:
        m["frozen"] = list(frozen)
    if dtype != "bf16":
        m["dtype"] = dtype
    return m


def generate_model(out_dir: Path | str, spec: LlamaSpec, seed: int,
                   base_seed: Optional[int] = None, delta_std: float = 0.0,
                   delta_corr: float = 0.0, force: bool = False, verbose: bool = True,
                   frozen: Sequence[str] = (), dtype: str = "bf16") -> Path:
    """Write a Llama-shaped checkpoint (bf16 unless ``dtype`` says otherwise) to ``out_dir``
    (cached; see module doc)."""
    import safetensors.numpy

    out_dir = Path(out_dir)
    meta = _meta(spec, seed, base_seed, delta_std, delta_corr, frozen, dtype)
    meta_path = out_dir / "bench_meta.json"
    if not force and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return out_dir
        except (OSError, ValueError):
            pass
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    shards = plan_shards(spec)
    n = len(shards)
    weight_map: Dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            tensors[name] = tensor_values(name, shape, seed, base_seed, delta_std, delta_corr, frozen,
                                          dtype)
            weight_map[name] = fname
        safetensors.numpy.save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    size = spec.n_bytes * (2 if dtype == "f32" else 1)
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = dict(spec.hf_config(), dtype=DTYPES[dtype])
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n")
    meta_path_tmp = tmp / "bench_meta.json"
    meta_path_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(out_dir)
    if verbose:
        print(f"  generated {out_dir} ({spec.n_params / 1e6:.1f}M params, {n} shards) "
              f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return out_dir


def ensure_pair(size: str, root: Path | str = BENCH_DATA) -> Tuple[Path, Path]:
    """Two *independent* models A (seed 1) and B (seed 2) of one size.

    Independent random weights are nearly orthogonal, so slerp takes its trigonometric branch
    (not the |dot| > 0.9995 lerp fallback) on every tensor except the norm gains.
    """
    spec = get_spec(size)
    root = Path(root)
    a = generate_model(root / f"{spec.name}_A", spec, seed=1)
    b = generate_model(root / f"{spec.name}_B", spec, seed=2)
    return a, b


def ensure_model_set(size: str, n_finetunes: int = 2, delta_std: float = 0.002,
                     delta_corr: float = 0.0, base_seed: int = 100,
                     root: Path | str = BENCH_DATA,
                     frozen: Sequence[str] = (), dtype: str = "bf16") -> Tuple[Path, List[Path]]:
    """A base model and ``n_finetunes`` fine-tunes (base + delta_std * N(0, 1), seeds 101...).

    Default delta_std = 0.002 = 10% of the weights' std (0.02): deltas are small enough to be
    'fine-tunes' (cosine to the base ~0.995) yet far above bf16 rounding of the base (~1e-4).
    ``delta_corr`` > 0 correlates the fine-tunes' deltas (see :func:`tensor_values`); the
    tensors whose names contain one of ``frozen`` are the base's; ``dtype`` other than bf16
    (f16, f32) stores every model so, in folders of its own.
    For TIES / DARE / model_stock / task_arithmetic benches.
    """
    spec = get_spec(size)
    root = Path(root)
    sfx = "" if dtype == "bf16" else "_" + dtype
    base = generate_model(root / f"{spec.name}_base{base_seed}{sfx}", spec, seed=base_seed,
                          dtype=dtype)
    tag = f"{delta_std:g}".replace(".", "p")
    if delta_corr:
        tag += "_c" + f"{delta_corr:g}".replace(".", "p")
    if frozen:
        tag += "_frozen-" + "-".join(frozen)
    fts = [generate_model(root / f"{spec.name}_base{base_seed}_ft{k + 1}_d{tag}{sfx}", spec,
                          seed=base_seed + k + 1, base_seed=base_seed, delta_std=delta_std,
                          delta_corr=delta_corr, frozen=frozen, dtype=dtype)
           for k in range(n_finetunes)]
    return base, fts


# --------------------------------------------------------------------------------------------
# Checkpoint helpers
# --------------------------------------------------------------------------------------------


def shard_files(model_dir: Path | str) -> List[Path]:
    model_dir = Path(model_dir)
    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    return sorted(model_dir.glob("*.safetensors"))


def weight_map(model_dir: Path | str) -> Dict[str, Path]:
    """tensor name -> shard path (works with or without an index file)."""
    model_dir = Path(model_dir)
    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: model_dir / v for k, v in wm.items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            for k in h.keys():
                out[k] = f
    return out


def dir_bytes(model_dir: Path | str, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob(pattern))


def folder_digest(folder: Path | str) -> str:
    """A short digest of a merge output's bytes (its safetensors files in name order), for
    comparing builds."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def warm_page_cache(paths: Iterable[Path | str], block: int = 16 * MB) -> int:
    """Read every byte of ``paths`` once (so timed runs all read from the page cache)."""
    total = 0
    buf = bytearray(block)
    mv = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(mv)
                if not n:
                    break
                total += n
    return total


def parse_size(s: str) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '64KiB', '123' (bytes)."""
    s = s.strip().upper().replace(" ", "")
    units = [("KIB", 1024), ("MIB", 1024 ** 2), ("GIB", 1024 ** 3), ("TIB", 1024 ** 4),
             ("KB", 1000), ("MB", 1000 ** 2), ("GB", 1000 ** 3), ("TB", 1000 ** 4),
             ("K", 1000), ("M", 1000 ** 2), ("G", 1000 ** 3), ("B", 1)]
    for u, mult in units:
        if s.endswith(u):
            return int(float(s[: -len(u)]) * mult)
    return int(s)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    cmd: List[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float  # polled max of sum(VmHWM) over the tree (incl. file-backed mmap pages)
    peak_anon_mb: float  # polled max of sum(RssAnon + RssShmem) over the process tree
    peak_tree_rss_mb: float  # polled max of sum(VmRSS) over the process tree
    ru_maxrss_mb: float  # wait4 ru_maxrss of the child (polluted by the parent's RSS at fork)
    user_s: float
    sys_s: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _read_status(pid: int) -> Optional[Tuple[int, int, int]]:
    """(VmRSS, RssAnon + RssShmem, VmHWM) in kB, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rss = anon = hwm = 0
    for line in data.split(b"\n"):
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith(b"RssAnon:") or line.startswith(b"RssShmem:"):
            anon += int(line.split()[1])
    return rss, anon, hwm


def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        import psutil

        out = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        pass
    return out


def run_measured(cmd: Sequence[str], env: Optional[dict] = None, cwd: Optional[str] = None,
                 timeout: Optional[float] = None, poll_s: float = 0.01) -> RunResult:
    """Run ``cmd`` in a subprocess; wall time, peak RSS (see module doc), captured output."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=fo, stderr=fe, env=env, cwd=cwd)
        pid = proc.pid
        peak_rss = peak_anon = peak_hwm = 0
        tree: List[int] = []
        polls = 0
        status = 0
        ru = None
        while True:
            wpid, status, ru = os.wait4(pid, os.WNOHANG)
            if wpid == pid:
                break
            if polls % 10 == 0:  # rescan descendants every ~100 ms (scan is not free)
                tree = _children(pid)
            polls += 1
            rss = anon = hwm = 0
            for p in [pid] + tree:
                s = _read_status(p)
                if s is not None:
                    rss += s[0]
                    anon += s[1]
                    hwm += s[2]
            peak_rss = max(peak_rss, rss)
            peak_hwm = max(peak_hwm, hwm)
            peak_anon = max(peak_anon, anon)
            if timeout is not None and time.perf_counter() - t0 > timeout:
                for p in tree + [pid]:
                    try:
                        os.kill(p, 9)
                    except OSError:
                        pass
                _, status, ru = os.wait4(pid, 0)
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from re-waiting
        fo.seek(0)
        fe.seek(0)
        out = fo.read().decode(errors="replace")
        err = fe.read().decode(errors="replace")
    return RunResult(
        cmd=list(cmd), returncode=proc.returncode, wall_s=wall,
        peak_rss_mb=max(peak_hwm, peak_rss) / 1024.0, peak_anon_mb=peak_anon / 1024.0,
        peak_tree_rss_mb=peak_rss / 1024.0, ru_maxrss_mb=ru.ru_maxrss / 1024.0,
        user_s=ru.ru_utime, sys_s=ru.ru_stime,
        stdout=out, stderr=err)


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def compare_outputs(dir_a: Path | str, dir_b: Path | str,
                    names: Optional[Sequence[str]] = None) -> dict:
    """Compare two merged checkpoints tensor by tensor (bf16 -> f32).

    Returns names_equal (same tensor-name sets), shapes_equal, dtypes_equal, n_compared,
    max_abs (max |a - b|), n_diff (elements whose bit patterns differ), n_elems, max_ulp (max
    distance in bf16/f16 units in the last place, i.e. ordered-integer distance of the bits).
    max_rel is the max over tensors of max|a - b| / max|b|.
    ``names`` restricts the value comparison to a sample (the name sets are always compared).
    """
    import torch
    from safetensors import safe_open

    wa, wb = weight_map(dir_a), weight_map(dir_b)
    res = {"names_equal": set(wa) == set(wb), "only_a": sorted(set(wa) - set(wb))[:5],
           "only_b": sorted(set(wb) - set(wa))[:5], "shapes_equal": True, "dtypes_equal": True,
           "n_compared": 0, "max_abs": 0.0, "max_ulp": 0, "n_diff": 0, "n_elems": 0,
           "max_rel": 0.0, "worst_tensor": None}
    todo = [n for n in (names if names is not None else sorted(wa)) if n in wa and n in wb]

    def ordered(x: "torch.Tensor") -> "torch.Tensor":
        if x.dtype in (torch.bfloat16, torch.float16):
            i = x.view(torch.int16).to(torch.int32)
            return torch.where(i < 0, -32768 - i, i)
        i = x.to(torch.float32).view(torch.int32).to(torch.int64)
        return torch.where(i < 0, -(2 ** 31) - i, i)

    handles: dict = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for n in todo:
        a, b = get(wa[n], n), get(wb[n], n)
        if a.shape != b.shape:
            res["shapes_equal"] = False
            continue
        if a.dtype != b.dtype:
            res["dtypes_equal"] = False
        d = (a.to(torch.float32) - b.to(torch.float32)).abs().max().item() if a.numel() else 0.0
        if a.dtype == b.dtype:
            oa, ob = ordered(a), ordered(b)
            ulp = (oa - ob).abs().max().item() if a.numel() else 0
            nd = int((oa != ob).sum().item())
            del oa, ob
        else:
            ulp, nd = -1, int((a.to(torch.float32) != b.to(torch.float32)).sum().item())
        if d > res["max_abs"]:
            res["worst_tensor"] = n
        if a.numel():
            ref = b.to(torch.float32).abs().max().item()
            res["max_rel"] = max(res["max_rel"], d / ref if ref > 0 else (0.0 if d == 0 else
                                                                          float("inf")))
        res["max_abs"] = max(res["max_abs"], d)
        res["max_ulp"] = max(res["max_ulp"], ulp)
        res["n_diff"] += nd
        res["n_elems"] += a.numel()
        res["n_compared"] += 1
    res["dtype_a"] = str(get(wa[todo[0]], todo[0]).dtype) if todo else None
    res["dtype_b"] = str(get(wb[todo[0]], todo[0]).dtype) if todo else None
    return res


# --------------------------------------------------------------------------------------------
# I/O floor (run as a subprocess: ``python benches/_common.py io-floor ...``)
# --------------------------------------------------------------------------------------------


def io_floor(inputs: Sequence[Path | str], out_file: Path | str, out_bytes: int,
             block: int = 16 * MB, fsync: bool = False, direct: bool = False) -> dict:
    """The I/O floor of a merge: read every input byte once, then write ``out_bytes``.

    Sequential, single-threaded, 16 MB ``readinto`` into one reused buffer (data discarded),
    then ``out_bytes`` of that buffer written to ``out_file`` in 16 MB ``write`` calls; no
    fsync unless ``fsync`` (merge_fast fsyncs by default; see bench_methods). ``direct``:
    written with ``O_DIRECT`` (around the page cache, as merge_fast writes a durable output;
    the last block padded to 4 KiB, then cut), then fsynced.  Time = read + write, not
    overlapped.
    """
    t0 = time.perf_counter()
    nread = warm_page_cache(inputs, block)
    t1 = time.perf_counter()
    if direct:
        _write_direct(out_file, out_bytes, block)
    else:
        buf = bytearray(os.urandom(1024)) * (block // 1024)
        mv = memoryview(buf)
        left = out_bytes
        with open(out_file, "wb", buffering=0) as f:
            while left > 0:
                n = min(left, block)
                f.write(mv[:n])
                left -= n
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    t2 = time.perf_counter()
    return {"read_bytes": nread, "read_s": t1 - t0, "write_bytes": out_bytes,
            "write_s": t2 - t1}


def _write_direct(out_file: Path | str, out_bytes: int, block: int) -> None:
    """``out_bytes`` written with ``O_DIRECT`` in ``block``-sized writes from a page-aligned
    buffer (the last padded to 4 KiB, then cut), then fsynced."""
    import mmap

    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1024) * (block // 1024))
    mv = memoryview(buf)
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        pos = 0
        while pos < out_bytes:
            n = min(out_bytes - pos, block)
            pos += os.write(fd, mv[:-(-n // 4096) * 4096])
        os.ftruncate(fd, out_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
        mv.release()
        buf.close()


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate one synthetic model folder")
    g.add_argument("--size", required=True, choices=list(SPECS))
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--base-seed", type=int, default=None)
    g.add_argument("--delta-std", type=float, default=0.002)
    g.add_argument("--delta-corr", type=float, default=0.0)
    g.add_argument("--force", action="store_true")
    f = sub.add_parser("io-floor", help="read inputs once + write N bytes (timed by caller)")
    f.add_argument("--inputs", nargs="+", required=True)
    f.add_argument("--out-file", required=True)
    f.add_argument("--out-bytes", type=int, required=True)
    f.add_argument("--fsync", action="store_true")
    f.add_argument("--direct", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        generate_model(a.out, get_spec(a.size), a.seed, a.base_seed,
                       a.delta_std if a.base_seed is not None else 0.0, a.delta_corr,
                       force=a.force)
    else:
        print(json.dumps(io_floor(a.inputs, a.out_file, a.out_bytes, fsync=a.fsync, direct=a.direct)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())


# --------------------------------------------------------------------------------------
# Shared by the benchmark scripts: one row of results, output cleanup, formatting
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    size: str
    method: str
    contender: Any  # each benchmark's own Contender (key, label, kind, ...)
    runs: List[RunResult] = dataclasses.field(default_factory=list)
    status: str = "ok"  # ok | unavailable | failed | skipped
    note: str = ""
    extra: Dict[str, object] = dataclasses.field(default_factory=dict)

    def walls(self) -> List[float]:
        return [r.wall_s for r in self.runs if r.ok]

    @property
    def med(self) -> float:
        return median(self.walls())

    @property
    def cpu(self) -> float:
        return median([r.user_s + r.sys_s for r in self.runs if r.ok])

    @property
    def rss(self) -> float:
        xs = [r.peak_rss_mb for r in self.runs if r.ok]
        return max(xs) if xs else float("nan")

    @property
    def anon(self) -> float:
        xs = [r.peak_anon_mb for r in self.runs if r.ok]
        return max(xs) if xs else float("nan")


def clean(out: Path) -> None:
    for p in (out, Path(str(out) + ".bin")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    if out.parent.is_dir():  # temp folders a tool left beside its target
        for p in out.parent.iterdir():
            if out.name in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def out_shards(out: Path) -> str:
    files = sorted(out.glob("*.safetensors"))
    if not files:
        return "-"
    big = max(f.stat().st_size for f in files)
    return f"{len(files)} shard(s) <= " + (f"{big / 1e6:.0f} MB" if big >= 1e6 else
                                           f"{big / 1e3:.0f} kB")


def fnum(x: float, fmt: str = "{:.2f}") -> str:
    return "-" if x != x else fmt.format(x)  # NaN -> '-'

