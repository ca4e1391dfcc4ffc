"""The merge-fast command line."""
from __future__ import annotations

import os
import re
import subprocess

import numpy as np
import pytest

from conftest import (
    BF16,
    assert_matches_reference,
    assert_slerp_matches,
    merge_fast_cli,
    read_folder_f32,
    read_folder_native,
    ref_linear,
    ref_task_arithmetic,
)


def cli(*args, cwd=None, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(merge_fast_cli() + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, f"traceback shown:\n{r.stderr}"
    assert "panicked" not in r.stderr, f"Rust panic:\n{r.stderr}"


def test_help_lists_commands_and_options():
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("slerp", "linear", "task-arithmetic", "demo"):
        assert cmd in r.stdout, f"--help does not mention {cmd}"
    r = cli("slerp", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--t", "-o", "--threads", "--out-shard-size", "--dtype", "--out-dtype", "--quiet", "--seed"):
        assert opt in r.stdout, f"slerp --help does not list {opt}"
    r = cli("linear", "--help")
    assert r.returncode == 0 and "--weights" in r.stdout and "--no-normalize" in r.stdout
    r = cli("task-arithmetic", "--help")
    assert r.returncode == 0 and "--weights" in r.stdout and "--lam" in r.stdout


def test_cli_slerp_end_to_end(model_family, tmp_path):
    fam = model_family("llama", "bfloat16", True)
    out = tmp_path / "merged"
    r = cli("slerp", fam.a, fam.b, "--t", "0.3", "-o", out, "--out-shard-size", "10KB", "--threads", "2")
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    assert str(out) in r.stdout or out.name in r.stdout, f"output path not reported: {r.stdout!r}"
    got = read_folder_native(out)
    A, B = read_folder_f32(fam.a), read_folder_f32(fam.b)
    assert set(got) == set(A)
    assert len(list(out.glob("*.safetensors"))) > 1
    for k, v in got.items():
        assert_slerp_matches(v, A[k], B[k], 0.3, v.dtype, k)
        assert v.dtype == read_folder_native(fam.a)[k].dtype
    assert (out / "config.json").read_bytes() == (fam.a / "config.json").read_bytes()


def test_cli_linear_and_no_normalize(model_family, tmp_path):
    fam = model_family("qwen2", "float32", False)
    ins = [read_folder_f32(d) for d in fam.dirs]
    for flag, norm in (([], True), (["--no-normalize"], False)):
        out = tmp_path / f"merged_{norm}"
        r = cli("linear", fam.base, fam.a, fam.b, "--weights", "0.2", "0.3", "0.5", "-o", out, *flag)
        if r.returncode != 0 and "weights" in r.stderr:  # comma-separated form
            r = cli("linear", fam.base, fam.a, fam.b, "--weights", "0.2,0.3,0.5", "-o", out, *flag)
        assert r.returncode == 0, r.stderr
        got = read_folder_native(out)
        for k, v in got.items():
            ref, scale = ref_linear([m[k] for m in ins], [0.2, 0.3, 0.5], norm)
            assert_matches_reference(v, ref, scale, np.float32, k)


def test_cli_task_arithmetic_out_dtype(model_family, tmp_path):
    fam = model_family("gpt_neox", "float32", True)
    out = tmp_path / "merged"
    r = cli("task-arithmetic", fam.base, fam.a, fam.b, "--weights", "1.0", "0.5", "--lam", "0.8",
            "-o", out, "--out-dtype", "bfloat16", "--dtype", "float32", "--quiet")
    if r.returncode != 0 and "weights" in r.stderr:
        r = cli("task-arithmetic", fam.base, fam.a, fam.b, "--weights", "1.0,0.5", "--lam", "0.8",
                "-o", out, "--out-dtype", "bfloat16", "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    got = read_folder_native(out)
    ins = [read_folder_f32(d) for d in fam.dirs]
    for k, v in got.items():
        ref, scale = ref_task_arithmetic(ins[0][k], [ins[1][k], ins[2][k]], [1.0, 0.5], 0.8)
        assert v.dtype == BF16, (k, v.dtype)
        assert_matches_reference(v, ref, scale, BF16, k)


def test_cli_quiet(model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    out = tmp_path / "merged"
    r = cli("slerp", fam.a, fam.b, "--t", "0.5", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) <= 1, f"--quiet printed: {r.stdout!r}"
    if lines:
        assert lines[0].strip() in (str(out), str(out.resolve()), out.name), f"--quiet printed {lines[0]!r}"
    assert r.stderr.strip() == "", f"--quiet wrote to stderr: {r.stderr!r}"
    assert (out / "model.safetensors").exists()


def test_cli_not_quiet_reports_something(model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    out = tmp_path / "merged"
    r = cli("slerp", fam.a, fam.b, "--t", "0.5", "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() or r.stderr.strip(), "no output at all without --quiet"


@pytest.mark.parametrize(
    "case",
    ["missing-input", "corrupt-input", "bad-t", "bad-shard-size", "weights-count", "no-output", "unknown-flag"],
)
def test_cli_bad_input(model_family, tmp_path, case):
    fam = model_family("llama", "float32", False)
    out = tmp_path / "merged"
    if case == "missing-input":
        args = ["slerp", fam.a, tmp_path / "nope_model", "--t", "0.3", "-o", out]
        expect = "nope_model"
    elif case == "corrupt-input":
        import shutil

        bad = tmp_path / "corrupt_model"
        shutil.copytree(fam.b, bad)
        (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
        args = ["slerp", fam.a, bad, "--t", "0.3", "-o", out]
        expect = "model.safetensors"
    elif case == "bad-t":
        args = ["slerp", fam.a, fam.b, "--t", "banana", "-o", out]
        expect = None
    elif case == "bad-shard-size":
        args = ["slerp", fam.a, fam.b, "--t", "0.3", "-o", out, "--out-shard-size", "lots"]
        expect = None
    elif case == "weights-count":
        args = ["linear", fam.base, fam.a, fam.b, "--weights", "0.5", "0.5", "-o", out]
        expect = None
    elif case == "no-output":
        args = ["slerp", fam.a, fam.b, "--t", "0.3"]
        expect = None
    else:
        args = ["slerp", fam.a, fam.b, "--t", "0.3", "-o", out, "--frobnicate"]
        expect = None
    r = cli(*args)
    assert r.returncode != 0, f"{case}: exit code 0\n{r.stdout}"
    no_traceback(r)
    assert r.stderr.strip(), f"{case}: no message on stderr"
    if expect:
        assert expect in r.stderr, f"{case}: stderr should name {expect!r}: {r.stderr!r}"
    assert not out.exists()


def test_cli_demo(tmp_path):
    r = cli("demo", cwd=tmp_path, timeout=300)
    assert r.returncode == 0, f"demo failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    no_traceback(r)
    text = r.stdout + r.stderr
    assert re.search(r"\d+(\.\d+)?\s*(s|ms|sec|seconds)\b", text), f"demo output shows no time: {text!r}"
    # it must say what it wrote (a path, and the tensors/bytes), not necessarily keep it around
    assert re.search(r"(/[\w.\-]+)+", text), f"demo output names no path: {text!r}"
    assert re.search(r"wr[oi]te", text, re.I), f"demo output does not say what it wrote: {text!r}"
