"""Atomic output folders: a merge writes into a hidden temporary folder beside the target
and renames it into place only when every file is complete, so an interrupted or failed
merge never leaves something that looks like a model at the target. With ``fsync`` (the
default) every file and the folder reach the disk before the rename, and the rename itself
after it, so a power cut after "done" cannot lose or truncate the merge."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_dir(target: Path, fsync: bool = True) -> Iterator[Path]:
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.merge-fast-tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_tree(tmp)
    _replace(tmp, target, tag)
    if fsync:
        _fsync_path(target.parent)


def fsync_tree(path: Path) -> None:
    """fsyncs every regular file under `path`, then every folder (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(root)
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                _fsync_path(p)
    for d in reversed(dirs):
        _fsync_path(d)


def _fsync_path(path: "str | Path") -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, target: Path, tag: str) -> None:
    if target.is_dir():
        # Move the old folder aside first so the target is never half old, half new.
        old = target.parent / f".{target.name}.merge-fast-old-{tag}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    elif target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{target} exists and is not a folder")
    else:
        os.rename(tmp, target)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_size(size: "int | str") -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers and mergekit); '1GiB' binary."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be positive, got {size}")
        return size
    s = str(size).strip().lower().replace(" ", "")
    num = s.rstrip("kmgtibB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 500MB, 5GB, 1GiB)") from None
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"cannot parse size {size!r} (use e.g. 500MB, 5GB, 1GiB)")
    return int(value * _UNITS[unit])
