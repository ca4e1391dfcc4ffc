"""Multi-stage configs, as mergekit-multi writes them: several YAML documents, each a merge
config with a ``name``; a later stage names an earlier one where a model goes.

Stages run in dependency order, the intermediate ones into a temporary folder beside the
output (removed afterwards, also on failure). The output is the stage without a ``name``
(mergekit-multi writes that one to ``--out-path``) or, when every stage is named, the
one stage no other stage uses; ``stage=NAME`` picks it instead (with what it needs).
Every document is parsed and checked before the first stage runs.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

from .._errors import ConfigError, config_error, unprefixed
from ._source import ConfigSource, KeyPath
from .schema import parse

_REF_KEYS = ("model", "base_model", "tokenizer_source", "source")


def _refs(data: Any, path: KeyPath = ()):
    """(key path, string) of every model reference written as a string."""
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, str) and k in _REF_KEYS:
                yield path + (k,), v
            elif isinstance(v, dict) and k in _REF_KEYS and isinstance(v.get("model"), str):
                yield path + (k, "model"), v["model"]
            else:
                yield from _refs(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            if isinstance(v, str) and path and path[-1] == "models":
                yield path + (i,), v
            else:
                yield from _refs(v, path + (i,))


def _set(data: Any, path: KeyPath, value: str) -> None:
    for p in path[:-1]:
        data = data[p]
    data[path[-1]] = value


def _stage_of(ref: str, names: Set[str]) -> Optional[str]:
    head = ref.split("+", 1)[0]
    return head if head in names else None


def run_stages(srcs: List[ConfigSource], out: Path, stage: Optional[str], run: Callable[..., Any],
               opts: Dict[str, Any]) -> Any:
    where = srcs[0].filename or "config"
    names: List[Optional[str]] = []
    for src in srcs:
        name = src.data.get("name") if isinstance(src.data, dict) else None
        if name is not None and not isinstance(name, str):
            raise src.error(("name",), "a stage name must be a string")
        if name in names:
            raise src.error(("name",), f"two stages are named {name!r}" if name else
                            "more than one stage has no name (only the final stage may be unnamed)")
        names.append(name)
    named = {n for n in names if n is not None}
    deps: Dict[Optional[str], Set[str]] = {}
    for src, name in zip(srcs, names):
        deps[name] = {s for _, r in _refs(src.data) if (s := _stage_of(r, named)) is not None}
        if name in deps[name]:
            raise src.error(("name",), f"stage {name!r} uses its own output")
    if stage is not None:
        if stage not in named:
            raise config_error(f"{where}: no stage named {stage!r} (stages: {', '.join(sorted(named))})")
        final: Optional[str] = stage
    elif None in names:
        final = None
    else:
        used = set().union(*deps.values())
        sinks = [n for n in names if n not in used]
        if len(sinks) != 1:
            raise config_error(f"{where}: {'several' if sinks else 'no'} final stages "
                              f"({', '.join(map(str, sinks))}); pick one with --stage NAME")
        final = sinks[0]

    order: List[Optional[str]] = []
    visiting: List[Optional[str]] = []

    def visit(n: Optional[str]) -> None:
        if n in order:
            return
        if n in visiting:
            cycle = visiting[visiting.index(n):] + [n]
            raise config_error(f"{where}: stages depend on each other in a cycle: "
                              + " -> ".join(map(str, cycle)))
        visiting.append(n)
        for d in sorted(deps[n]):
            visit(d)
        visiting.pop()
        order.append(n)

    for n in names:  # every cycle is an error, even outside the stages run
        visit(n)
    needed: Set[Optional[str]] = set()

    def need(n: Optional[str]) -> None:
        if n not in needed:
            needed.add(n)
            for d in deps[n]:
                need(d)

    need(final)
    # Check every stage's structure first (references to stages do not exist yet: they are
    # swapped for their future folders).
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".merge-fast-stages-", dir=out.parent) as tmp:
        folders = {n: os.path.join(tmp, n) for n in named}
        by_name = dict(zip(names, srcs))
        cfgs = {}
        errors = []
        for n in order:
            src = by_name[n]
            if isinstance(src.data, dict):
                src.data = copy.deepcopy(src.data)  # never change the caller's dicts
                src.data.pop("name", None)
                for path, r in list(_refs(src.data)):
                    s = _stage_of(r, named)
                    if s is not None:
                        _set(src.data, path, folders[s] + r[len(s):])
            try:
                cfgs[n] = _name_stages(parse(src, strict=opts.get("strict", False)), tmp)
            except ConfigError as e:
                errors.append(f"stage {n or '(unnamed)'}: {unprefixed(e)}")
        if errors:
            raise config_error("" + "\n".join(errors))
        hub = _prefetch({n: cfgs[n] for n in order if n in needed}, tmp, opts.get("cache_dir"), opts.get("progress"))
        result = None
        for n in order:
            if n not in needed:
                continue
            stage_opts = opts
            if n == final:
                dest = out
            else:
                assert n is not None  # only the final stage may be unnamed
                dest = Path(folders[n])
                # Scratch: deleted once the final stage is written, and read right back by
                # the next stage; neither fsynced nor written around the page cache.
                stage_opts = dict(opts, fsync=False)
            earlier: Set[str] = set()  # every stage this one is built from, directly or not
            todo = list(deps[n])
            while todo:
                d = todo.pop()
                if d not in earlier:
                    earlier.add(d)
                    todo += deps[d]
            pinned = tuple(dict.fromkeys(h for d in sorted(earlier) for h in hub[d]))
            result = run(dataclasses.replace(cfgs[n], earlier_hub_inputs=pinned), dest, **stage_opts)
        return result



def _prefetch(cfgs: Dict[Optional[str], Any], tmp: str, cache_dir: Any, progress: Any) -> Dict[Optional[str], List[Any]]:
    """Every hub reference of every stage to be run, downloaded (in parallel, all failures in
    one error) before the first stage writes anything; references to earlier stages' outputs
    (folders under `tmp`, not written yet) are left out. Each stage then resolves its
    references again, from the cache. Returns each stage's hub inputs, pinned."""
    from ..hub import Request, raise_all, resolve_each, _walk
    from .schema import ModelRef

    where: Dict[Request, str] = {}
    reqs: Dict[Optional[str], List[Request]] = {}
    for n, cfg in cfgs.items():
        def collect(m: Any, key: KeyPath, cfg: Any = cfg, mine: List[Request] = reqs.setdefault(n, [])) -> Any:
            for name, rev, kind in ((m.path, m.revision, "model"), (m.lora, m.lora_revision, "adapter")):
                if name and not os.path.abspath(os.path.expanduser(name)).startswith(tmp + os.sep):
                    where.setdefault(Request(name, rev, kind), cfg.src.where(key))
                    mine.append(Request(name, rev, kind))
            return m

        _walk(cfg, (), ModelRef, collect)
    done, errors = resolve_each(list(where), cache_dir=cache_dir, progress=bool(progress) and not callable(progress))
    raise_all([config_error(f"{where[r]}: {unprefixed(e)}", type(e)) for r, e in errors.items()])
    return {n: [done[r].hub for r in rs if done[r].hub is not None] for n, rs in reqs.items()}


def _name_stages(cfg: Any, tmp: str) -> Any:
    """References to earlier stages keep their stage name as their label, so the card names
    the stage, not the temporary folder (removed after the run, and different each run)."""
    from ..hub import _walk
    from .schema import ModelRef

    def label(m: Any, key: KeyPath) -> Any:
        if m.label is None and m.path.startswith(tmp + os.sep):
            return dataclasses.replace(m, label=str(dataclasses.replace(m, path=os.path.relpath(m.path, tmp))))
        return m

    return _walk(cfg, (), ModelRef, label)
