"""The package's import graph, read from the source (ast; imports inside functions count):
no loops among merge_fast modules, and every import goes to the same or a lower layer."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import merge_fast

ROOT = Path(merge_fast.__file__).parent

# Top to bottom; a module may import only from its own layer or those below (README, Layout).
LAYERS: List[List[str]] = [
    ["merge_fast", "merge_fast.__main__", "merge_fast.cli", "merge_fast.demo"],
    ["merge_fast.config"],
    ["merge_fast.methods", "merge_fast.crossarch", "merge_fast.merge_state", "merge_fast.lora_extract",
     "merge_fast.lora_merge", "merge_fast.subspace", "merge_fast.torch", "merge_fast._arrays"],
    ["merge_fast.lora"],
    ["merge_fast.plan"],
    ["merge_fast._folders", "merge_fast.distributed"],
    ["merge_fast.hub", "merge_fast._bin", "merge_fast._output", "merge_fast.arch", "merge_fast.linalg"],
    ["merge_fast._errors", "merge_fast._core"],
]


def _modules() -> Dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    mods["merge_fast._core"] = ROOT / "_core"  # the compiled module
    return mods


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    edges: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        if name == "merge_fast._core":
            edges[name] = set()
            continue
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        out: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("merge_fast"):
                    continue
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                out.update(subs if subs else [target] if target in mods else [])
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in mods)
        edges[name] = out - {name}
    return edges


def _layer(mod: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(mod == g or mod.startswith(g + ".") for g in group if g != "merge_fast"):
            return i
    assert mod == "merge_fast", f"{mod} is in no layer of test_layers.LAYERS"
    return 0


def test_no_import_cycles():
    edges = _graph()
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_go_down_the_layers():
    edges = _graph()
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, ts in sorted(edges.items()) for t in sorted(ts)
              if _layer(t) < _layer(m) and t != "merge_fast"]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_graph_sees_known_edges():
    # the reader itself: edges that exist must be found (relative, nested and in-function imports)
    edges = _graph()
    assert "merge_fast.plan" in edges["merge_fast.lora"]
    assert "merge_fast._core" in edges["merge_fast.plan"]
    assert "merge_fast.hub" in edges["merge_fast.methods._dispatch"]  # imported inside merge_folders
    assert "merge_fast.config.schema" in edges["merge_fast.config.modules"]


def test_no_hand_built_plan_sources():
    """Only the plan layer writes the core's `{"kind": ...}` source dicts."""
    offenders = []
    for name, path in _modules().items():
        if name in ("merge_fast.plan", "merge_fast._core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value == "kind" for k in node.keys
            ) and any(isinstance(v, ast.Constant) and v.value in ("tensor", "lora", "rows") for v in node.values):
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, offenders
