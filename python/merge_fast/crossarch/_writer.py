"""A model folder copied verbatim (``procrustes_absorb`` with β = 1: the anchor byte for
byte), atomically. Every other cross-architecture output is written by the engine
(:mod:`._engine`)."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import List, Union

from .._folders import copy_side_files
from .._output import check_output_dir, staged_dir


@dataclasses.dataclass
class WriteResult:
    path: Path
    tensors_written: int
    bytes_written: int
    files: List[Path]
    seconds: float


def copy_model_verbatim(src: Path, out: Union[str, Path], *, overwrite: bool = False) -> WriteResult:
    """Copies a model folder's weight files and side files unchanged (atomically)."""
    t0 = time.perf_counter()
    src = Path(src)
    check_output_dir(out, [src], overwrite=overwrite)
    out = Path(out).absolute()
    files = []
    nbytes = 0
    with staged_dir(out, [src], overwrite=overwrite) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and (f.suffix == ".safetensors" or f.name == "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
                files.append(out / f.name)
                nbytes += f.stat().st_size if f.suffix == ".safetensors" else 0
        copy_side_files(src, tmp, None)
    return WriteResult(out, 0, nbytes, files, time.perf_counter() - t0)
