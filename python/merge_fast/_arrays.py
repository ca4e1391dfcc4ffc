"""In-memory merges: numpy arrays (float16/32/64, bfloat16 through ml_dtypes) or torch
tensors in, the same kind and dtype out. Values are widened to float32, merged by the Rust
kernels (the very ones folder merges use), and rounded once back to the input dtype."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from . import _core
from ._errors import ConfigError, NumericalError, TensorMismatch
from ._output import check_threads
from .plan import plan_json


def _is_torch(x: Any) -> bool:
    # Checked by module name so that torch is never imported here.
    return type(x).__module__.split(".")[0] == "torch"


class _Restore:
    """Remembers how to give a float32 result back in the caller's type."""

    def __init__(self, x: Any):
        self.torch = _is_torch(x)
        if self.torch:
            self.dtype, self.device = x.dtype, x.device
        else:
            self.dtype = np.asarray(x).dtype
        self.shape = tuple(x.shape)

    def __call__(self, flat: np.ndarray) -> Any:
        out = flat.reshape(self.shape)
        if self.torch:
            import torch

            t = torch.from_numpy(out).to(device=self.device, dtype=self.dtype)
            if not bool(torch.isfinite(t).all()):
                self._overflow(flat, ~torch.isfinite(t).reshape(-1).cpu().numpy())
            return t
        if self.dtype == np.float32:
            return out
        back = out.astype(self.dtype)
        # a finite float32 result too large for float16 (|x| > 65504) must not become inf
        if not np.isfinite(back).all():
            self._overflow(flat, ~np.isfinite(np.asarray(back, np.float32)).reshape(-1))
        return back

    def _overflow(self, flat: np.ndarray, bad: np.ndarray) -> None:
        i = int(np.flatnonzero(bad)[0])
        raise NumericalError(f"numerical error in tensor 'array': the merged value {flat[i]} at element {i} "
                                 f"does not fit in {self.dtype} (the inputs' dtype)")


def _to_f32(x: Any, what: str) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().to("cpu").float().numpy()
    a = np.asarray(x)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ConfigError(f"{what}: expected a floating-point array, got dtype {a.dtype}")
    # "A": an unaligned buffer (e.g. np.frombuffer at an odd offset) is copied, not refused.
    return np.require(a, np.float32, ["C", "A"]).reshape(-1)


def is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray) or _is_torch(x) or (hasattr(x, "__array__") and not isinstance(x, (str, bytes)))


def merge_arrays(
    method: str,
    base: Optional[Any],
    models: Sequence[Any],
    params: dict,
    *,
    seed: int = 0,
    threads: Optional[int] = None,
    aux: Sequence[Any] = (),
) -> Any:
    """``aux``: a method's auxiliary inputs with shapes of their own (RegMean's Grams),
    passed after the models; the kernel checks their shapes."""
    first = base if base is not None else models[0]
    restore = _Restore(first)
    shape = restore.shape
    for i, m in enumerate(models):
        if tuple(m.shape) != shape:
            raise TensorMismatch(f"tensor mismatch for 'array': model #{i} has shape {tuple(m.shape)}, expected {shape}")
    b = _to_f32(base, "base") if base is not None else None
    xs = [_to_f32(m, f"model #{i}") for i, m in enumerate(models)]
    xs += [_to_f32(a, f"auxiliary input #{i}") for i, a in enumerate(aux)]
    threads = check_threads(threads)
    out = _core.merge_arrays(method, plan_json(params), list(shape), b, xs, seed=seed, threads=threads)
    return restore(out)
