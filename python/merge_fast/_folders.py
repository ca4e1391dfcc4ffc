"""Folder merges: open and validate every input, plan each output tensor, run the plan in
the Rust engine with the GIL released, then copy config and tokenizer files."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from . import _core
from ._errors import ConfigError, InvalidCheckpoint, TensorMismatch, warn
from .distributed import run_plan
from ._output import check_output_dir, check_threads, parse_size, staged_dir

PathLike = Union[str, Path]
ProgressArg = Union[bool, Callable[[int, int, int, int], Any], None]

# Files copied from the base (or first) model: everything a loader needs besides weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "fp32": "F32", "bf16": "BF16", "fp16": "F16"}


@dataclasses.dataclass
class MergeResult:
    """What a folder merge wrote."""

    path: Path
    tensors_written: int
    bytes_read: int
    bytes_written: int
    seconds: float
    files: List[Path] = dataclasses.field(default_factory=list)
    # what the user should know about the accepted merge (also warned, and in the metadata)
    notes: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        mb = self.bytes_written / 1e6
        return f"wrote {self.tensors_written} tensors ({mb:.1f} MB) to {self.path} in {self.seconds:.2f} s"


@dataclasses.dataclass
class TensorPlan:  # noqa: D101 - documented below
    """One output tensor: its sources (input index, tensor name) and its method parameters."""

    name: str
    method: str
    params: Dict[str, Any]
    base: Optional[Dict[str, Any]]
    inputs: List[Dict[str, Any]]
    dtype: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "method": self.method, "params": self.params, "inputs": self.inputs}
        if self.base is not None:  # absent means none: keeps the plan text short
            d["base"] = self.base
        if self.dtype:
            d["dtype"] = self.dtype
        return d


def plain(x: Any) -> Any:
    """Numpy scalars (``np.float32(0.5)``, ``np.int64(3)``) as Python numbers, in nested
    dicts and lists too: they are accepted wherever a number is."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if type(x).__module__ == "numpy" and hasattr(x, "item") and getattr(x, "ndim", None) == 0:
        return x.item()
    return x


def _non_finite(x: Any, path: str) -> Optional[str]:
    if isinstance(x, float) and not math.isfinite(x):
        return path
    if isinstance(x, dict):
        return next((p for k, v in x.items() if (p := _non_finite(v, k if not path else f"{path}.{k}"))), None)
    if isinstance(x, (list, tuple)):
        return next((p for i, v in enumerate(x) if (p := _non_finite(v, f"{path}[{i}]"))), None)
    return None


def plan_json(obj: Any) -> str:
    """JSON for the engine; a NaN or infinite parameter is a ConfigError naming it (JSON has
    no such numbers, and no merge parameter may be one)."""
    obj = plain(obj)
    bad = _non_finite(obj, "")
    if bad is not None:
        raise ConfigError(f"config error: parameter '{bad.split('.')[-1]}' must be a finite number ({bad})")
    # compact: on 200k-tensor models the plan text is held during the whole merge
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


def open_checkpoint(path: PathLike) -> "_core.Checkpoint":
    p = Path(path)
    if not p.exists():
        raise InvalidCheckpoint(f"invalid checkpoint {p}: no such file or folder")
    return _core.Checkpoint(str(p))


def out_dtype_code(dtype: str, out_dtype: Optional[str]) -> Optional[str]:
    """Validates `dtype`/`out_dtype` and returns the safetensors dtype to write, or None for
    'keep each tensor's input dtype'. Computation is always float32: a bfloat16/float16
    compute dtype (mergekit's `dtype`) only sets the default output dtype."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"config error: dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    if out_dtype is None:
        return None if dtype == "float32" else OUT_DTYPES[dtype]
    if out_dtype not in OUT_DTYPES:
        raise ConfigError(f"config error: out_dtype must be one of float32, bfloat16, float16, got {out_dtype!r}")
    return OUT_DTYPES[out_dtype]


def same_tensor_plan(
    method: str,
    base: Optional[PathLike],
    models: Sequence[PathLike],
    params_for: Callable[[str], Dict[str, Any]],
    out_dtype: Optional[str],
) -> tuple[List[str], List[TensorPlan]]:
    """Plans a merge of models that share tensor names: every tensor of the reference model
    (the base, else the first) from the same name in each input. Name sets must agree."""
    paths = ([str(base)] if base is not None else []) + [str(m) for m in models]
    names = _common_names(paths)
    return paths, _SameNamePlans(names, method, params_for, len(paths), base is not None, out_dtype)


def _common_names(paths: List[str]) -> List[str]:
    """The reference's tensor names, after checking every input has the same set. The
    checkpoints are closed on return (the engine opens its own)."""
    ckpts = [open_checkpoint(p) for p in paths]
    ref = ckpts[0]
    ref_names = ref.names()
    ref_set = set(ref_names)
    for p, c in zip(paths[1:], ckpts[1:]):
        names = set(c.names())
        missing = sorted(ref_set - names)
        extra = sorted(names - ref_set)
        if missing or extra:
            what = []
            if missing:
                what.append(f"{len(missing)} tensor(s) of {paths[0]} missing from {p}, e.g. {missing[:3]}")
            if extra:
                what.append(f"{len(extra)} tensor(s) of {p} not in {paths[0]}, e.g. {extra[:3]}")
            tensor = (missing or extra)[0]
            raise TensorMismatch(f"tensor mismatch for '{tensor}': " + "; ".join(what))
    return ref_names


class _SameNamePlans(Sequence[TensorPlan]):
    """The plans of a same-name merge, made on demand from the tensor names: holding a
    TensorPlan (and its source dicts) per tensor costs ~1 KB each on 100k-tensor models."""

    def __init__(self, names: List[str], method: str, params_for: Callable[[str], Dict[str, Any]],
                 n_paths: int, has_base: bool, dtype: Optional[str]):
        self.names, self.method, self.params_for = names, method, params_for
        self.n_paths, self.has_base, self.dtype = n_paths, has_base, dtype

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        name = self.names[i]
        src = [{"kind": "tensor", "input": k} for k in range(self.n_paths)]  # same name: implied
        first = 1 if self.has_base else 0
        return TensorPlan(name=name, method=self.method, params=self.params_for(name),
                          base=src[0] if self.has_base else None, inputs=src[first:], dtype=self.dtype)


def _progress_callback(progress: ProgressArg, desc: str):
    if callable(progress):
        return progress, None
    if not progress:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True)

    def cb(done: int, total: int, bytes_done: int, bytes_total: int) -> None:
        if bar.total != bytes_total:
            bar.total = bytes_total
        bar.set_postfix_str(f"{done}/{total} tensors", refresh=False)
        bar.update(bytes_done - bar.n)

    return cb, bar


def remote_code_files(src: Path) -> List[str]:
    """Python modules of the folder named by config.json's ``auto_map`` (custom code loaded
    with ``trust_remote_code``; entries pointing at another repo, ``repo--module.Class``, skipped)."""
    try:
        auto = json.loads((src / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return []
    refs: List[str] = []
    for v in auto.values() if isinstance(auto, dict) else []:
        refs += [x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, str)]
    out: List[str] = []
    for ref in refs:
        if "--" in ref or "." not in ref:
            continue
        name = ref.rsplit(".", 1)[0].replace(".", "/") + ".py"
        if "/" not in name and (src / name).is_file() and name not in out:
            out.append(name)
    return out


def copy_side_files(src: Path, dst: Path, out_dtype: Optional[str]) -> None:
    if src.is_file():
        src = src.parent
    for name in SIDE_FILES:
        f = src / name
        if f.is_file():
            shutil.copy2(f, dst / name)
    for name in remote_code_files(src):  # custom architectures load with trust_remote_code
        shutil.copy2(src / name, dst / name)
    cfg = dst / "config.json"
    if out_dtype and cfg.is_file():
        # Say what is now stored, so loaders pick the right default dtype.
        data = json.loads(cfg.read_text())
        torch_name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[out_dtype]
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = torch_name
        cfg.write_text(json.dumps(data, indent=2) + "\n")


def execute(
    paths: Sequence[str],
    plans: Sequence[TensorPlan],
    out: PathLike,
    *,
    recipe: Dict[str, Any],
    side_files_from: PathLike,
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    extra_files: Optional[Callable[[Path], None]] = None,
    overwrite: bool = False,
    inputs: Sequence[PathLike] = (),
    fsync: bool = True,
) -> MergeResult:
    """Runs planned tensors into `out` atomically and returns what was written (fsynced
    before the final rename unless ``fsync=False``, for scratch merges). `inputs`: folders
    read besides `paths` (model folders of adapters, tokenizer sources), which the output
    must not touch either."""
    protected = [*paths, side_files_from, *inputs]
    check_output_dir(out, protected, overwrite=overwrite)
    out = Path(out).absolute()
    threads = check_threads(threads)
    try:
        shard = parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError(f"config error: {e}") from None
    plan = {
        "inputs": list(paths),
        "seed": int(seed),
        "max_shard_size": shard,
        "metadata": {"merge_fast": json.dumps(plain(recipe), sort_keys=True)},
    }
    # The tensor list is serialized one tensor at a time (no list of per-tensor dicts), and
    # parameter sets are shared by reference: both matter on 100k-tensor models.
    param_ids: Dict[str, int] = {}

    def tensor_json(t: TensorPlan) -> str:
        d = t.to_json()
        p = plan_json(d.pop("params"))
        d["params_id"] = param_ids.setdefault(p, len(param_ids))
        return plan_json(d)

    # Appended to one buffer: a list of per-tensor strings (what `join` builds) would cost
    # ~200 B per tensor on top of the text.
    buf = bytearray()
    for i, t in enumerate(plans):
        buf += (tensor_json(t) if i == 0 else "," + tensor_json(t)).encode()
    sets = ",".join(param_ids)  # insertion order = id order
    text = plan_json(plan)[:-1] + f',"param_sets":[{sets}],"tensors":[{buf.decode()}]}}'
    del buf, param_ids
    cb, bar = _progress_callback(progress, f"merging into {out.name}")
    t0 = time.perf_counter()
    try:
        with staged_dir(out, protected, overwrite=overwrite, fsync=fsync) as tmp:
            stats = run_plan(text, tmp, threads, cb)  # local engine or Ray tasks
            copy_side_files(Path(side_files_from), tmp, out_dtype)
            if extra_files is not None:
                extra_files(tmp)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    notes = list(stats.get("notes", []))
    for note in notes:
        warn(f"merge-fast: {note}")
    return MergeResult(
        notes=notes,
        path=out,
        tensors_written=stats["tensors_written"],
        bytes_read=stats["bytes_read"],
        bytes_written=stats["bytes_written"],
        seconds=seconds,
        files=[out / Path(f).name for f in stats["files"]],
    )


def merge_folders(
    method: str,
    base: Optional[PathLike],
    models: Sequence[PathLike],
    params: Dict[str, Any],
    out: PathLike,
    *,
    dtype: str = "float32",
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    max_shard_size: Union[int, str] = "5GB",
    progress: ProgressArg = False,
    seed: int = 0,
    overwrite: bool = False,
    cache_dir: Optional[PathLike] = None,
    fsync: bool = True,
) -> MergeResult:
    check_output_dir(out, [base, *models], overwrite=overwrite)
    check_threads(threads)
    code = out_dtype_code(dtype, out_dtype)
    from .hub import merged_adapter, resolve_paths

    refs = ([base] if base is not None else []) + list(models)
    local, hub_inputs = resolve_paths(refs, cache_dir=cache_dir, progress=progress is True)
    read = [x for pa in local for x in pa if x is not None]  # the folders the output must not touch
    check_output_dir(out, read, overwrite=overwrite)
    # A `model+adapter` is read through a cached copy with the adapter merged in (as configs
    # and merge_fast.lora.apply compute it).
    folders = [p if a is None else str(merged_adapter(p, a, cache_dir)) for p, a in local]
    lbase = folders[0] if base is not None else None
    paths, plans = same_tensor_plan(method, lbase, folders[1 if base is not None else 0:],
                                    lambda _name: params, code)
    recipe = {
        "merge_fast_version": _core.__version__,
        "method": method,
        "base_model": str(base) if base is not None else None,
        "models": [str(m) for m in models],
        "parameters": params,
        "dtype": dtype,
        "out_dtype": out_dtype,
        "seed": seed,
    }
    if hub_inputs:
        recipe["hub_inputs"] = [h.to_json() for h in hub_inputs]
    return execute(
        paths,
        plans,
        out,
        recipe=recipe,
        side_files_from=paths[0],
        out_dtype=code,
        threads=threads,
        max_shard_size=max_shard_size,
        progress=progress,
        seed=seed,
        overwrite=overwrite,
        inputs=read,
        fsync=fsync,
    )
