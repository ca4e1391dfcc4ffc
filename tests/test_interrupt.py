"""Interrupted merges: an exception from the progress callable aborts the merge and leaves
nothing; a process killed with SIGKILL mid-merge never leaves a partial folder at the target."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import build_model_dirs, read_folder_native, st_read


class Boom(Exception):
    pass


def _stopper(after: int, exc: BaseException):
    calls = []

    def progress(done, total, bytes_done, bytes_total):
        calls.append((done, total, bytes_done, bytes_total))
        if done >= after:
            raise exc

    return progress, calls


@pytest.mark.parametrize("sharded", [False, True], ids=["single-out", "sharded-out"])
def test_progress_exception_aborts(mf, model_family, tmp_path, sharded):
    fam = model_family("llama", "float32", True)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    progress, calls = _stopper(2, Boom("stop after 2 tensors"))
    kw = {"max_shard_size": "10KB"} if sharded else {}
    with pytest.raises(Boom, match="stop after 2 tensors"):
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), progress=progress, **kw)
    assert calls, "progress never called"
    assert calls[-1][0] >= 2
    assert not out.exists(), "aborted merge left the target folder"
    assert os.listdir(work) == [], f"aborted merge left {os.listdir(work)} beside the target"


def test_progress_keyboard_interrupt_propagates(mf, model_family, tmp_path):
    fam = model_family("qwen2", "bfloat16", False)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    progress, _ = _stopper(2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        mf.linear([str(fam.a), str(fam.b)], weights=[1, 1], out=str(out), progress=progress)
    assert not out.exists()
    assert os.listdir(work) == []


def test_progress_exception_on_first_call(mf, model_family, tmp_path):
    fam = model_family("gpt_neox", "float32", False)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"

    def progress(*a):
        raise ValueError("refuse at once")

    with pytest.raises(ValueError, match="refuse at once"):
        mf.task_arithmetic(str(fam.base), [str(fam.a)], weights=[1.0], out=str(out), progress=progress)
    assert os.listdir(work) == []


def test_merge_after_abort_succeeds(mf, model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    out = tmp_path / "merged"
    progress, _ = _stopper(1, Boom("x"))
    with pytest.raises(Boom):
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), progress=progress)
    r = mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out))
    assert r.tensors_written == len(read_folder_native(fam.a))
    assert sorted(os.listdir(tmp_path)) == ["merged"]


# ------------------------------------------------------------------ SIGKILL
@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """~50 MB f32 llama (8 layers, hidden 256, vocab 8192) and a fine-tune of it."""
    root = tmp_path_factory.mktemp("big")
    d = build_model_dirs(root, "llama", "float32", False, names=("a", "b"),
                         hidden=256, inter=1024, layers=8, vocab=8192, heads=4)
    size = (d["a"] / "model.safetensors").stat().st_size
    assert size > 40e6, size
    return d["a"], d["b"]


CHILD = textwrap.dedent(
    """
    import sys, time, merge_fast as mf
    a, b, out, slow = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    def progress(done, total, bd, bt):
        print("P", done, total, flush=True)
        if slow:
            time.sleep(slow)
    mf.slerp(a, b, t=0.3, out=out, progress=progress, max_shard_size="8MB")
    print("DONE", flush=True)
    """
)


def _complete(out: Path, expected_names: set) -> bool:
    files = list(out.glob("*.safetensors"))
    names = set()
    for f in files:
        _, t = st_read(f)
        names |= set(t)
    if len(files) > 1:
        idx = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(idx["weight_map"]) == names
    return names == expected_names


def test_sigkill_mid_merge_leaves_no_target(big_pair, tmp_path):
    a, b = big_pair
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(a), str(b), str(out), "0.05"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # wait for the first progress line, then for a temp folder to exist beside the target
        line = p.stdout.readline()
        assert line.startswith("P"), f"child did not report progress: {line!r} {p.stderr.read() if p.poll() is not None else ''}"
        deadline = time.time() + 30
        seen = []
        while time.time() < deadline and not seen:
            seen = os.listdir(work)
            time.sleep(0.005)
        assert seen, "no temporary folder appeared beside the target while merging"
        assert p.poll() is None, "merge finished before it could be killed (slow progress should prevent that)"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists(), "SIGKILL mid-merge left a folder at the target path"
    for name in os.listdir(work):  # a leftover temp folder is tolerable; it must not be named like the target
        assert name != "merged"


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.4])
def test_sigkill_at_any_time_target_absent_or_complete(big_pair, tmp_path, delay):
    """Kill a full-speed merge at some moment: the target is either absent or complete."""
    a, b = big_pair
    expected = set(read_folder_native(a)) if delay == 0.0 else None
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(a), str(b), str(out), "0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t_end = time.time() + 30
        while time.time() < t_end and not os.listdir(work) and p.poll() is None:
            time.sleep(0.001)
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if out.exists():
        names = expected or set(read_folder_native(a))
        assert _complete(out, names), f"target exists but is incomplete after kill at +{delay}s"
    else:
        assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr.read())


def test_sigint_mid_merge_cleans_up(big_pair, tmp_path):
    """Ctrl-C (SIGINT) during a merge: KeyboardInterrupt, non-zero exit, no target, and the
    temporary folder removed (the Python exception path can clean up, unlike SIGKILL)."""
    a, b = big_pair
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(a), str(b), str(out), "0.05"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("P"), line
        deadline = time.time() + 30
        while time.time() < deadline and not os.listdir(work):
            time.sleep(0.005)
        assert p.poll() is None, "merge finished before SIGINT"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0, "SIGINT mid-merge: exit code 0"
    assert "KeyboardInterrupt" in err, f"expected KeyboardInterrupt, stderr: {err[-2000:]}"
    assert not out.exists(), "SIGINT mid-merge left a folder at the target"
    assert os.listdir(work) == [], f"SIGINT left {os.listdir(work)} beside the target"
