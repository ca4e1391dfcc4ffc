"""Read tensor names, shapes and dtypes from safetensors headers (no data, no torch).

Feeds the lazy path: ``plan_canonical(read_shapes(model_dir), config)``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .errors import ArchError

__all__ = ["TensorInfo", "read_header", "read_shapes", "read_config"]

_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo(tuple):
    """``(shape, dtype, file)`` of one stored tensor; ``.shape`` / ``.dtype`` / ``.file``."""

    __slots__ = ()

    def __new__(cls, shape: tuple[int, ...], dtype: str, file: str) -> "TensorInfo":
        return super().__new__(cls, (shape, dtype, file))

    shape = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    file = property(lambda self: self[2])


def read_header(path: "str | os.PathLike[str]") -> dict[str, TensorInfo]:
    """Tensor infos of one ``.safetensors`` file (``__metadata__`` skipped)."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ArchError(f"{p}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ArchError(f"{p}: header length {n} is implausible")
            head = f.read(n)
    except OSError as e:
        raise ArchError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        meta = json.loads(head)
    except ValueError as e:
        raise ArchError(f"{p}: malformed safetensors header: {e}") from None
    out: dict[str, TensorInfo] = {}
    for k, v in meta.items():
        if k == "__metadata__":
            continue
        out[k] = TensorInfo(tuple(int(s) for s in v["shape"]), str(v["dtype"]), p)
    return out


def read_shapes(path: "str | os.PathLike[str]") -> dict[str, TensorInfo]:
    """Tensor infos of a checkpoint: a ``.safetensors`` file, or a folder with
    ``model.safetensors`` or ``model.safetensors.index.json`` (sharded) or ``*.safetensors``."""
    p = Path(path)
    if p.is_file():
        return read_header(p)
    index = p / "model.safetensors.index.json"
    files: list[Path]
    if index.is_file():
        try:
            weight_map: dict[str, Any] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ArchError(f"{index}: cannot read weight_map: {e}") from None
        files = [p / f for f in dict.fromkeys(weight_map.values())]
    elif (p / "model.safetensors").is_file():
        files = [p / "model.safetensors"]
    else:
        files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ArchError(f"{p}: no safetensors files found")
    out: dict[str, TensorInfo] = {}
    for f in files:
        out.update(read_header(f))
    return out


def read_config(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """``config.json`` of a model folder as a dict."""
    p = Path(path)
    cfg = p / "config.json" if p.is_dir() else p
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ArchError(f"cannot read {cfg}: {e}") from None
