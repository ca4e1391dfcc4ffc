"""The merge-quality benchmark's pipeline (benches/quality), shrunk: a generic base (copy +
Markov text), four task fine-tunes with rehearsal, their Fisher and Gram files, and merges
through merge_fast. Asserted: each fine-tune beats the base on its own task and keeps the
base's generic copy ability; the merges equal their formulas (numpy float64) on the real
fine-tunes and statistics. The ordering of methods is measured by the benchmark, not asserted.

Size: hidden 32, 1 layer (~25 k params), pretraining 250 steps, fine-tunes 80 steps.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402

import merge_fast as mf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benches" / "quality"))
import quality as q  # noqa: E402


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    wd = tmp_path_factory.mktemp("quality")
    saved = (dict(q.MODEL), dict(q.PRETRAIN), dict(q.FINETUNE), q.N_STATS)
    q.MODEL.update(hidden=32, layers=1, heads=2, inter=64)
    q.PRETRAIN.update(steps=250, batch=32, lr=3e-3)
    q.FINETUNE.update(steps=80, batch=16, lr=2e-3)
    q.N_STATS = 32
    nthreads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = q.pretrained_base(wd, log=lambda *_: None)
        fts, fishers, grams = [], [], []
        for t in q.TASKS:
            ft = q.finetune(base, t, 0, wd / f"ft_{t}")
            f, g = q.statistics(ft, t, 0, wd)
            fts.append(ft)
            fishers.append(f)
            grams.append(g)
        acc = {name: {t: q.evaluate(q.load(d), t, "test", 128)["acc"] for t in (*q.TASKS, "copy")}
               for name, d in [("base", base)] + [(t, d) for t, d in zip(q.TASKS, fts)]}
        init = q.new_model(q.PRETRAIN["seed"]).eval()
        acc["init"] = {t: q.evaluate(init, t, "test", 128)["acc"] for t in ("copy",)}
    finally:
        q.MODEL.clear(); q.MODEL.update(saved[0])  # noqa: E702
        q.PRETRAIN.clear(); q.PRETRAIN.update(saved[1])  # noqa: E702
        q.FINETUNE.clear(); q.FINETUNE.update(saved[2])  # noqa: E702
        q.N_STATS = saved[3]
        torch.set_num_threads(nthreads)
    return dict(wd=wd, base=base, fts=fts, fishers=fishers, grams=grams, acc=acc)


def state(d):
    return load_file(str(Path(d) / "model.safetensors"))


def test_each_finetune_beats_the_base_on_its_task_and_keeps_copy(bench):
    acc = bench["acc"]
    assert acc["base"]["copy"] > acc["init"]["copy"] + 0.1  # pretraining taught the generic copy
    for t in q.TASKS:
        assert acc[t][t] > acc["base"][t] + 0.05, (t, acc[t][t], acc["base"][t])
        assert acc[t]["copy"] > 0.8 * acc["base"]["copy"], (t, acc[t]["copy"])


def test_the_task_tokens_never_occur_in_the_generic_corpus():
    g = torch.Generator().manual_seed(0)
    toks = {x for task in ("copy", "text") for _ in range(200) for x in q.make_example(task, g)[0]}
    assert not toks & set(q.TASK_TOKEN.values())


def test_merges_equal_their_formulas(bench, tmp_path):
    base = state(bench["base"])
    th = [state(d) for d in bench["fts"]]
    wd = tmp_path
    fts = [str(d) for d in bench["fts"]]
    mf.regmean(fts, [str(g) for g in bench["grams"]], out=str(wd / "rm"), fsync=False)
    mf.task_arithmetic(str(bench["base"]), fts, lam=0.4, out=str(wd / "ta"), fsync=False)
    mf.fisher_weighted(fts, [str(f) for f in bench["fishers"]], out=str(wd / "fw"), fsync=False)
    rm, ta, fw = state(wd / "rm"), state(wd / "ta"), state(wd / "fw")
    G = [load_file(str(g)) for g in bench["grams"]]
    F = [load_file(str(f)) for f in bench["fishers"]]
    n_rm = 0
    for k in base:
        x = [t[k].astype(np.float64) for t in th]
        if k in G[0]:  # every linear weight, lm_head included (untied)
            gt = [0.9 * g[k].astype(np.float64) + 0.1 * np.diag(np.diag(g[k].astype(np.float64))) for g in G]
            ref = sum(w @ g for w, g in zip(x, gt)) @ np.linalg.inv(sum(gt))
            n_rm += 1
            tol = 1e-4
        else:
            ref = sum(x) / len(x)
            tol = 1e-6
        np.testing.assert_allclose(rm[k], ref, rtol=tol, atol=tol * np.abs(ref).max(), err_msg=k)
        b = base[k].astype(np.float64)
        np.testing.assert_allclose(ta[k], b + 0.4 * sum(xi - b for xi in x), rtol=1e-5, atol=1e-6, err_msg=k)
        c = [f[k].astype(np.float64) + 1e-8 for f in F]
        np.testing.assert_allclose(fw[k], sum(ci * xi for ci, xi in zip(c, x)) / sum(c), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert n_rm == 7 + 1  # q, k, v, o, gate, up, down of the one layer, and the (untied) lm_head
