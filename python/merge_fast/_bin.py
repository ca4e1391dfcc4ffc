"""``pytorch_model*.bin`` checkpoints (and ``adapter_model.bin``) read through a converted
safetensors copy: torch loads each file with ``weights_only=True`` (never arbitrary
unpickling; memory-mapped where the file format allows), the tensors are written one by one
into ``<bin cache>/<key>/``, and the merge reads that folder like any other. The key hashes
each source file's real path, size and mtime, so the next run reuses the conversion."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Dict, List

from ._errors import InvalidCheckpoint, config_error

_WEIGHT_BIN = re.compile(r"(pytorch_model.*|adapter_model)\.bin")
_BIN_INDEX = "pytorch_model.bin.index.json"
_DONE = ".merge-fast-converted"


def _bins(folder: Path) -> List[Path]:
    return sorted(f for f in folder.iterdir() if _WEIGHT_BIN.fullmatch(f.name) and f.is_file())


def as_safetensors(path: Path, cache_root: Path) -> Path:
    """`path` itself when it is safetensors (or holds any); else the converted copy."""
    if path.is_file():
        if not path.name.endswith(".bin"):
            return path
        return _convert([path], path.parent, cache_root, single=True)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return path
    bins = _bins(path)
    return _convert(bins, path, cache_root, single=False) if bins else path


def _st_name(name: str) -> str:
    if name.startswith("pytorch_model"):
        name = "model" + name[len("pytorch_model"):]
    return name[: -len(".bin")] + ".safetensors"


def _key(files: List[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()  # follows the hub cache's symlinks to the blob
        h.update(f"{os.path.realpath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _convert(bins: List[Path], folder: Path, cache_root: Path, single: bool) -> Path:
    try:
        import torch
    except ImportError:
        raise config_error(f"{folder} holds only pytorch .bin weights; reading them needs torch "
                          "(pip install torch), or convert the model to safetensors") from None
    dst = cache_root / _key(bins)
    if (dst / _DONE).is_file():
        return dst / _st_name(bins[0].name) if single else dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weight_map: Dict[str, str] = {}
        total = 0
        for b in bins:
            names, size = _convert_file(torch, b, tmp / _st_name(b.name))
            weight_map.update({n: _st_name(b.name) for n in names})
            total += size
        if not single:
            if len(bins) > 1 or (folder / _BIN_INDEX).is_file():
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for f in folder.iterdir():  # config, tokenizer, adapter_config.json ...
                if f.is_file() and not f.name.endswith((".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")) \
                        and f.stat().st_size < 64 * 2**20:
                    shutil.copyfile(f, tmp / f.name)
        (tmp / _DONE).write_text(json.dumps({"sources": [str(b) for b in bins]}) + "\n")
        try:
            os.rename(tmp, dst)
        except OSError:  # another process finished the same conversion first
            if not (dst / _DONE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst / _st_name(bins[0].name) if single else dst


def _load(torch: Any, src: Path) -> Any:
    import pickle

    try:
        try:
            return torch.load(str(src), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(str(src), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidCheckpoint(
            f"invalid checkpoint {src}: refused to unpickle it (torch.load with weights_only=True: {first}); "
            "only plain tensor checkpoints are read. Convert it to safetensors with a tool you trust") from None
    except Exception as e:
        raise InvalidCheckpoint(f"invalid checkpoint {src}: cannot read it with torch.load ({type(e).__name__}: {e})") from None


def _convert_file(torch: Any, src: Path, dst: Path) -> "tuple[List[str], int]":
    sd = _load(torch, src)
    if isinstance(sd, dict) and len(sd) == 1 and isinstance(next(iter(sd.values())), dict):
        sd = next(iter(sd.values()))  # {"state_dict": {...}} / {"model": {...}}
    if not isinstance(sd, dict):
        raise InvalidCheckpoint(f"invalid checkpoint {src}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    codes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    for n in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, n):
            codes[getattr(torch, n)] = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}[n]
    items = [(str(k), v) for k, v in sd.items() if isinstance(v, torch.Tensor)]
    header: Dict[str, Any] = {"__metadata__": {"format": "pt", "converted_from": src.name}}
    off = 0
    for k, t in items:
        if t.dtype not in codes:
            raise InvalidCheckpoint(f"invalid checkpoint {src}: tensor {k!r} has dtype {t.dtype}, which safetensors models do not use")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, t in items:  # one tensor in memory at a time
            if t.numel():
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return [k for k, _ in items], off
