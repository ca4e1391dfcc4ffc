"""The user's install path: the release wheel (abi3, manylinux2014) installed into a fresh
virtualenv that has no Rust toolchain on PATH and no packages from this machine, then
`merge-fast demo` and a numeric smoke test run from it.

`.ci/run` builds the wheel once into dist/ (scripts/build-wheel.sh) and installs it for the
rest of the suite; run alone, this test builds it itself (a few minutes)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMOKE = r"""
import sys
import numpy as np
import merge_fast as mf
assert "torch" not in sys.modules, "import merge_fast pulled in torch"
rng = np.random.default_rng(0)
a = rng.standard_normal(1000).astype(np.float32)
b = rng.standard_normal(1000).astype(np.float32)
t = 0.3
# slerp by its formula in float64 (the vectors are far from parallel)
a64, b64 = a.astype(np.float64), b.astype(np.float64)
th = np.arccos(np.dot(a64 / np.linalg.norm(a64), b64 / np.linalg.norm(b64)))
ref = (np.sin((1 - t) * th) * a64 + np.sin(t * th) * b64) / np.sin(th)
got = mf.slerp(a, b, t=t)
assert got.dtype == np.float32
np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
print("smoke ok", mf.__version__)
"""


def _wheel(tmp_path_factory) -> Path:
    found = sorted((ROOT / "dist").glob("merge_fast-*-cp39-abi3-manylinux*.whl"))
    if found:
        return found[-1]
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(["bash", str(ROOT / "scripts" / "build-wheel.sh"), str(out)], check=True, cwd=ROOT)
    return sorted(out.glob("*.whl"))[-1]


def _path_without_rust() -> str:
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not any((Path(d) / tool).exists() for tool in ("cargo", "rustc", "maturin"))]
    return os.pathsep.join(keep)


def test_wheel_is_abi3_manylinux2014(tmp_path_factory):
    whl = _wheel(tmp_path_factory)
    assert "-cp39-abi3-" in whl.name and "manylinux2014_x86_64" in whl.name
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        assert "merge_fast/_core.abi3.so" in names
        # typed package: the marker and the compiled module's stubs ship with it (PEP 561)
        assert "merge_fast/py.typed" in names and "merge_fast/_core.pyi" in names, names
        so = z.read("merge_fast/_core.abi3.so")
    # manylinux2014 means glibc <= 2.17: no versioned glibc symbol newer than that.
    versions = {tuple(int(p) for p in v.split(b"_")[1].split(b"."))
                for v in set(re.findall(rb"GLIBC_2\.[0-9]+(?:\.[0-9]+)?", so))}
    assert versions and max(versions) <= (2, 17), sorted(versions)


def test_wheel_installs_and_runs_without_rust(tmp_path, tmp_path_factory):
    whl = _wheel(tmp_path_factory)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    bindir = env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CARGO", "RUSTUP"))}
    env["PATH"] = os.pathsep.join([str(bindir), _path_without_rust()])
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    assert shutil.which("cargo", path=env["PATH"]) is None and shutil.which("rustc", path=env["PATH"]) is None

    subprocess.run([str(bindir / "python"), "-m", "pip", "install", "-q", str(whl)], check=True, env=env)
    # Installed from the wheel, not from the source tree.
    where = subprocess.run([str(bindir / "python"), "-c", "import merge_fast; print(merge_fast.__file__)"],
                           check=True, env=env, cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(env_dir)), where

    smoke = subprocess.run([str(bindir / "python"), "-c", SMOKE], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert smoke.returncode == 0, smoke.stderr
    assert "smoke ok" in smoke.stdout

    demo = subprocess.run([str(bindir / "merge-fast"), "demo", "--workdir", str(tmp_path / "demo")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr
    assert "slerp t=0.5: wrote" in demo.stdout
    merged = tmp_path / "demo" / "merged"
    assert (merged / "model.safetensors").stat().st_size > 0 and (merged / "config.json").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
