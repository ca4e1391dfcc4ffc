"""Merge-quality regression test: a small seeded version of benches/quality's "pretrained" setup
(Matena & Raffel's regime: one random init, a shared warm-up on the generic `copy` task, two
fine-tunes from it on `reverse` and `modadd`), run end to end through merge_fast:

    merge_fast.torch.estimate_fisher -> save_fisher -> mf.fisher_weighted on folders

and checked for (a) exactness of the Fisher-weighted folder merge against a torch float64
reference of the formula, (b) training sanity (each fine-tune beats the other on its own task),
(c) the issue's claim (Fisher-weighted mean held-out loss < plain average) - see
``test_fisher_vs_average_mean_heldout_loss`` for what was measured at this size.

Size: hidden 64, 2 layers, 2 heads (~0.1 M params), warm-up 300 steps, fine-tunes 100 steps,
batch 32, Fisher on 64 examples, 128 held-out examples per task; torch 1 thread.
About 17 s of CPU time (more wall time on a loaded machine).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge_fast as mf
import merge_fast.torch as mft

REPO = Path(__file__).resolve().parent.parent
_QDIR = str(REPO / "benches" / "quality")
if _QDIR not in sys.path:
    sys.path.insert(0, _QDIR)
import quality  # noqa: E402

SEED = 0
SMALL = dict(setup="pretrained", hidden=64, layers=2, heads=2, batch_size=32,
             pretrain_steps=300, steps=100, n_fisher=64)  # lr: 2e-3 warm-up, 1e-3 fine-tune
N_EVAL = 128
EPS = 1e-8


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    wd = tmp_path_factory.mktemp("quality")
    nthreads = torch.get_num_threads()
    try:
        s = quality.make_quality_setup(wd / "setup", seed=SEED, threads=1, **SMALL)
        mf.linear(s.models, out=str(wd / "avg"))
        fis = str(wd / "fisher")
        mf.fisher_weighted(s.models, s.fishers, epsilon=EPS, out=fis)
        rows = {"base": s.base, "ft_reverse": s.models[0], "ft_modadd": s.models[1],
                "average": str(wd / "avg"), "fisher": fis}
        ev = {}
        for name, d in rows.items():
            m = quality.load_model(d)
            ev[name] = {t: quality.evaluate_model(m, t, n=N_EVAL, seed=SEED)["loss"]
                        for t in s.tasks}
            ev[name]["mean"] = sum(ev[name][t] for t in s.tasks) / len(s.tasks)
    finally:
        torch.set_num_threads(nthreads)
    return {"setup": s, "dirs": rows, "loss": ev}


def _state(d):
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_pipeline_files(small):
    s = small["setup"]
    assert s.setup == "pretrained" and s.tasks == ["reverse", "modadd"]
    for t, fp in zip(s.tasks, s.fishers):
        fr = mft.load_fisher(fp)
        assert fr.metadata["task"] == t and fr.metadata["n_examples"] == SMALL["n_fisher"]
    # the warm-up really moved the base away from the random init
    init, base = _state(s.init), _state(s.base)
    assert any(not torch.equal(init[k], base[k]) for k in base)


def test_fisher_weighted_folder_merge_matches_torch_reference(small):
    """(a) mf.fisher_weighted on folders == Σ(F_i+ε)θ_i / Σ(F_i+ε), computed in float64."""
    s = small["setup"]
    thetas = [_state(d) for d in s.models]
    fishers = [load_file(p) for p in s.fishers]
    out = _state(small["dirs"]["fisher"])
    assert set(out) == set(thetas[0])
    n_diff_from_avg = 0
    for k in thetas[0]:
        assert all(k in f for f in fishers), k
        num = sum((f[k].double() + EPS) * t[k].double() for f, t in zip(fishers, thetas))
        den = sum(f[k].double() + EPS for f in fishers)
        ref = num / den
        got = out[k].double()
        scale = ref.abs().max().item()
        err = (got - ref).abs().max().item()
        assert err <= 1e-6 * max(scale, 1e-30), (k, err, scale)
        avg = (thetas[0][k].double() + thetas[1][k].double()) / 2
        n_diff_from_avg += int((ref - avg).abs().max().item() > 1e-4 * scale)
    # the Fisher weighting is not a no-op on this setup
    assert n_diff_from_avg > len(thetas[0]) // 2


def test_each_finetune_beats_the_other_on_its_own_task(small):
    """(b) training sanity."""
    L = small["loss"]
    assert L["ft_reverse"]["reverse"] < L["ft_modadd"]["reverse"]
    assert L["ft_modadd"]["modadd"] < L["ft_reverse"]["modadd"]
    assert L["ft_reverse"]["reverse"] < L["base"]["reverse"]
    assert L["ft_modadd"]["modadd"] < L["base"]["modadd"]


def test_fisher_vs_average_mean_heldout_loss(small):
    """(c) The issue's claim - Fisher-weighted mean held-out loss < plain average - is NOT
    asserted: at this size it does not hold across seeds. Measured with exactly this
    configuration (SMALL, N_EVAL = 128; mean over the two tasks of the held-out per-token loss):

        seed   base    ft_reverse  ft_modadd  average  fisher   fisher < average?
        0      4.205   2.023       2.389      2.378    2.246    yes (-0.132)
        1      3.964   2.109       2.128      2.017    1.951    yes (-0.066)
        2      3.835   2.224       1.937      1.915    1.945    NO  (+0.030)
        3      4.070   2.181       2.006      1.961    1.958    yes (-0.003)
        4      3.821   2.221       2.134      2.067    2.123    NO  (+0.056)
        5      3.634   2.184       2.027      1.803    1.792    yes (-0.011)

    (4/6 seeds, margins of the same size as the seed-to-seed noise; the full-size
    benchmark, benches/quality/README.md, gives 1/3 seeds for the pretrained setup and 0/3 for
    the random one.) What does hold on every seed measured, and is asserted here: both merges
    keep most of what the two fine-tunes learned, i.e. their mean held-out loss is well below
    the shared pretrained base's (base >= 3.63 vs merges <= 2.38 on all six seeds)."""
    L = small["loss"]
    assert L["average"]["mean"] < L["base"]["mean"] - 0.5
    assert L["fisher"]["mean"] < L["base"]["mean"] - 0.5
