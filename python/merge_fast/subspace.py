"""Subspace masks: the top-r singular directions of ``W_IT − W_PT`` per 2-D tensor, for
projecting gradients out of the instruction-tuned subspace while training
(:class:`merge_fast.torch.SubspaceProjector` loads them)."""
from __future__ import annotations

import numbers
import os
import re
import uuid
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from . import _core
from ._errors import MergeError, config_error, io_error
from .plan import open_checkpoint
from ._output import check_output_file, check_threads, remove_stale

PathLike = Union[str, Path]


def subspace_masks(
    it_dir: PathLike,
    pt_dir: PathLike,
    rank: int,
    out: PathLike,
    *,
    include: Optional[str] = None,
    seed: int = 0,
    threads: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
) -> Dict[str, Tuple[int, float, bool]]:
    """Writes ``<name>.U`` (out × r) and ``<name>.V`` (in × r) float32 tensors to the
    safetensors file ``out`` for every 2-D float tensor of ``it_dir`` (those matching the
    regex ``include`` if given), computed by randomized SVD (seeded; exact SVD when r is
    close to the matrix size). Returns ``{name: (rank, captured_energy, exact)}``; the
    energies are also stored in the file's metadata. Either model may be a hub repo id
    (``org/name[@revision]``, downloaded into ``cache_dir``)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise config_error(f"rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    threads = check_threads(threads)
    from .lora import local_models

    it_dir, pt_dir = local_models([it_dir, pt_dir], cache_dir=cache_dir)
    out = check_output_file(out, [it_dir, pt_dir])
    it = open_checkpoint(it_dir)
    open_checkpoint(pt_dir)
    pattern = re.compile(include) if include else None
    names = [n for n, dtype, shape in it.tensors()
             if len(shape) == 2 and dtype in ("F32", "F16", "BF16", "F64") and (pattern is None or pattern.search(n))]
    if not names:
        raise config_error(f"no 2-D float tensor in {it_dir} matches {include!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise io_error(f"cannot create the folder of {out}: {e.strerror or e}") from None
    remove_stale(out.parent, out.name)
    tmp = out.parent / f".{out.name}.merge-fast-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        result = _core.subspace_masks(str(it_dir), str(pt_dir), names, rank, str(tmp), seed=seed, threads=threads,
                                      metadata={"it_model": str(it_dir), "pt_model": str(pt_dir), "seed": str(seed)})
        os.replace(tmp, out)
    except OSError as e:
        if isinstance(e, MergeError):
            raise
        raise io_error(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return dict(result)
