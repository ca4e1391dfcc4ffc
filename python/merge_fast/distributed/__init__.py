"""Merges beyond one machine.

* :func:`use_executor` / ``executor="ray"``: run a folder merge's plan as Ray tasks, one per
  group of output shards (see :mod:`merge_fast.distributed._ray`). Ray is imported only when
  a Ray executor is used.
* :mod:`merge_fast.partial`: mergeable partial merges (``partial``/``combine``/``finalize``).

Nothing here is imported by ``import merge_fast`` except the executor switch, which is pure
Python.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from .. import _core
from .._errors import config_error

# (plan JSON, staging folder, threads, progress callback) -> the engine's summary dict.
PlanRunner = Callable[[str, Path, Optional[int], Optional[Callable]], Dict[str, Any]]

_RUNNER: contextvars.ContextVar[Optional[PlanRunner]] = contextvars.ContextVar("merge_fast_runner", default=None)


def run_plan(plan_json: str, tmp: Path, threads: Optional[int], progress) -> Dict[str, Any]:
    """Runs a validated plan into the staging folder `tmp` with the current executor."""
    runner = _RUNNER.get()
    if runner is None:
        return _core.execute_plan(plan_json, str(tmp), threads=threads, progress=progress)
    return runner(plan_json, tmp, threads, progress)


def make_runner(executor: str, ray_address: Optional[str] = None, **options: Any) -> Optional[PlanRunner]:
    if executor == "local":
        if ray_address is not None:
            raise config_error("ray_address needs executor='ray'")
        return None
    if executor == "ray":
        from ._ray import RayRunner

        return RayRunner(address=ray_address, **options)
    raise config_error(f"executor must be 'local' or 'ray', got {executor!r}")


@contextlib.contextmanager
def use_executor(executor: str = "ray", ray_address: Optional[str] = None, **options: Any) -> Iterator[None]:
    """Every folder merge inside the block (``mf.linear(..., out=...)``, ``mf.run`` ...) runs
    its plan with `executor` (``"local"`` or ``"ray"``). Options of the Ray executor:
    ``max_retries`` (default 3), ``tasks`` (default: one per cluster CPU, at most one per
    output shard)."""
    token = _RUNNER.set(make_runner(executor, ray_address, **options))
    try:
        yield
    finally:
        _RUNNER.reset(token)


def with_executor(fn: Callable) -> Callable:
    """Decorator for functions with ``executor=`` and ``ray_address=`` keyword arguments:
    runs them inside :func:`use_executor` (the function itself ignores both)."""
    import functools
    import inspect

    @functools.wraps(fn)
    def wrapper(*args: Any, executor: str = "local", ray_address: Optional[str] = None, **kw: Any):
        if executor == "local" and ray_address is None:
            return fn(*args, **kw)
        with use_executor(executor, ray_address):
            return fn(*args, **kw)

    # help() and inspect show the two options with the function's own parameters.
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if not any(p.name == "executor" for p in params):
        extra = [inspect.Parameter("executor", inspect.Parameter.KEYWORD_ONLY, default="local", annotation="str"),
                 inspect.Parameter("ray_address", inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation="Optional[str]")]
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        wrapper.__signature__ = sig.replace(parameters=params[:at] + extra + params[at:])  # type: ignore[attr-defined]
    return wrapper


__all__ = ["use_executor", "with_executor", "run_plan"]
