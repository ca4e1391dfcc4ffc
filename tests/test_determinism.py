"""Same inputs + options -> byte-identical output folders, whatever the thread count."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import dir_snapshot


def _diff(s1: dict, s2: dict) -> str:
    if set(s1) != set(s2):
        return f"file sets differ: {sorted(set(s1) ^ set(s2))}"
    bad = [k for k in s1 if s1[k] != s2[k]]
    msgs = []
    for k in bad:
        a, b = s1[k], s2[k]
        i = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        where = "header" if k.endswith(".safetensors") and i < 8 + int.from_bytes(a[:8], "little") else "data"
        msgs.append(f"{k}: first difference at byte {i} ({where}); sizes {len(a)} vs {len(b)}")
    return "; ".join(msgs)


def _run(mf, method, fam, out, **kw):
    if method == "slerp":
        mf.slerp(str(fam.a), str(fam.b), t=0.37, out=str(out), **kw)
    elif method == "linear":
        mf.linear([str(fam.base), str(fam.a), str(fam.b)], weights=[0.1, 0.6, 0.3], out=str(out), **kw)
    else:
        mf.task_arithmetic(str(fam.base), [str(fam.a), str(fam.b)], weights=[0.7, 0.4], lam=1.1, out=str(out), **kw)


@pytest.mark.parametrize("method", ["slerp", "linear", "task_arithmetic"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_runs_byte_identical(mf, model_family, tmp_path, method, dtype):
    fam = model_family("llama", dtype, True)
    out = tmp_path / "merged"
    _run(mf, method, fam, out, max_shard_size="10KB")
    first = dir_snapshot(out)
    shutil.move(str(out), str(tmp_path / "run1"))
    _run(mf, method, fam, out, max_shard_size="10KB")
    second = dir_snapshot(out)
    assert first == second, _diff(first, second)


@pytest.mark.parametrize("arch,dtype", [("qwen2", "bfloat16"), ("gpt_neox", "float32")])
def test_threads_1_vs_2_byte_identical(mf, model_family, tmp_path, arch, dtype):
    fam = model_family(arch, dtype, True)
    snaps = []
    for n in (1, 2, 2, 1):
        out = tmp_path / "merged"
        _run(mf, "slerp", fam, out, threads=n, max_shard_size="10KB")
        snaps.append(dir_snapshot(out))
        shutil.rmtree(out)
    for s in snaps[1:]:
        assert s == snaps[0], _diff(snaps[0], s)


def test_threads_identical_single_file(mf, model_family, tmp_path):
    fam = model_family("llama", "bfloat16", False)
    snaps = []
    for n in (1, 2):
        out = tmp_path / "merged"
        _run(mf, "task_arithmetic", fam, out, threads=n)
        snaps.append(dir_snapshot(out))
        shutil.rmtree(out)
    assert snaps[0] == snaps[1], _diff(snaps[0], snaps[1])


def test_array_api_deterministic(mf):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 301)).astype(np.float32)
    b = rng.standard_normal((300, 301)).astype(np.float32)
    r1 = mf.slerp(a, b, t=0.3)
    r2 = mf.slerp(a, b, t=0.3)
    assert r1.tobytes() == r2.tobytes()
    l1 = mf.linear([a, b, a], weights=[0.3, 0.3, 0.4])
    l2 = mf.linear([a, b, a], weights=[0.3, 0.3, 0.4])
    assert l1.tobytes() == l2.tobytes()


@pytest.mark.parametrize("method", ["slerp", "linear", "task_arithmetic"])
def test_threads_identical_multi_chunk(mf, model_family, tmp_path, method):
    """Tensors spanning several engine chunks: the chunked reductions must not depend on the
    thread count."""
    fam = model_family("llama", "bfloat16", True, "medium")
    snaps = []
    for n in (1, 2):
        out = tmp_path / "merged"
        _run(mf, method, fam, out, threads=n, max_shard_size="1MB")
        snaps.append(dir_snapshot(out))
        shutil.rmtree(out)
    assert snaps[0] == snaps[1], _diff(snaps[0], snaps[1])


def test_array_threads_identical(mf):
    rng = np.random.default_rng(3)
    a = rng.standard_normal(700_001).astype(np.float32)
    b = rng.standard_normal(700_001).astype(np.float32)
    outs = []
    for n in (1, 2):
        try:
            outs.append(mf.slerp(a, b, t=0.3, threads=n).tobytes())
        except TypeError:
            pytest.fail("array slerp does not accept threads=")
    assert outs[0] == outs[1]
