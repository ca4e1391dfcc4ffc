"""The executor: runs a plan's text (made by :mod:`merge_fast.plan`) in the Rust engine (or
as Ray tasks) with the GIL released, into a staged output folder, then copies config and
tokenizer files and reports what was written."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

from ._errors import warn
from .distributed import run_plan
from ._output import staged_dir

PathLike = Union[str, "os.PathLike[str]"]
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


def run(
    text: str,
    out: PathLike,
    protected: Sequence[Any],
    *,
    side_files_from: PathLike,
    out_dtype: Optional[str] = None,
    threads: Optional[int] = None,
    progress: ProgressArg = False,
    extra_files: Optional[Callable[[Path], None]] = None,
    overwrite: bool = False,
    fsync: bool = True,
) -> MergeResult:
    """Runs plan `text` into `out` atomically (`protected`: the paths it must not touch)."""
    out = Path(out).absolute()
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
