"""Methods that read a tensor twice (statistics or top-k thresholds, then the merge) read it
once into memory when it fits the plan's ``in_memory_budget`` (issue 11). The two paths
must write the same bytes: each method's plan runs with budget 0 (streamed twice) and with
the default budget (read once), on bf16 models, and the shards are compared byte for byte."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from merge_fast import _core
from merge_fast.plan import plan_text, same_tensor_plan

from conftest import build_model_dirs

CASES = {
    "model_stock": {},
    "slerp": {"t": 0.3},
    "ties": {"weight": [0.6, 0.4], "density": [0.5, 0.7]},
    "della": {"weight": [0.6, 0.4], "density": [0.5, 0.7], "epsilon": [0.1, 0.1]},
    "breadcrumbs": {"weight": [0.6, 0.4], "density": [0.8, 0.8], "gamma": [0.05, 0.05]},
    "sce": {"select_topk": 0.5},
    "karcher": {},
    "arcee_fusion": {},
    "nuslerp": {"weight": [1.0, 2.0]},
    "ram": {},
}
TWO_ONLY = {"slerp", "arcee_fusion"}  # base + one model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_model_dirs(tmp_path_factory.mktemp("inmem"), "llama", "bfloat16", names=("base", "a", "b"))


def _run(text: str, out: Path, budget: int) -> dict:
    plan = json.loads(text)
    plan["in_memory_budget"] = budget
    out.mkdir(parents=True)
    _core.execute_plan(json.dumps(plan), str(out), threads=2)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("method", sorted(CASES))
def test_read_once_equals_streamed_twice(models, tmp_path, method):
    fts = [models["a"]] if method in TWO_ONLY else [models["a"], models["b"]]
    base = None if method == "karcher" else models["base"]
    ins = fts if base is None else fts
    paths, plans = same_tensor_plan(method, base, ins, lambda _n: CASES[method], None)
    text = plan_text(paths, plans, seed=5, max_shard_size=40_000, recipe={"method": method})
    streamed = _run(text, tmp_path / "streamed", 0)
    once = _run(text, tmp_path / "once", 256 << 20)
    assert sum(f.endswith(".safetensors") for f in streamed) >= 2
    assert once == streamed
