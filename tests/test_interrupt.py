"""Interrupted merges: an exception from the progress callable aborts the merge and leaves
nothing; SIGINT and SIGTERM abort cleanly; a process killed with SIGKILL mid-merge never
leaves a partial folder at the target, and the next run removes its staged folder."""
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


# ------------------------------------------------ SIGINT / SIGTERM, deterministically
# The child's progress callback writes a marker after the first tensor and then waits for
# the signal, so the signal always lands while the merge is provably in progress (a
# temporary folder exists, no output yet), whatever the machine's load.
SIGNAL_CHILD = textwrap.dedent(
    """
    import pathlib, sys, time
    a, b, out, marker, mode = sys.argv[1:6]

    def progress(done, total, bd, bt):
        if done == 1:
            pathlib.Path(marker).write_text("merging")
            end = time.monotonic() + 60
            while time.monotonic() < end:
                time.sleep(0.01)  # the signal's handler runs here
            print("no signal arrived", flush=True)

    if mode == "api":
        import merge_fast as mf
        mf.slerp(a, b, t=0.3, out=out, progress=progress)
    else:  # the CLI's own main(), with the blocking callback in place of its progress bar
        from merge_fast import _folders, cli
        _folders._progress_callback = lambda _p, _d: (progress, None)
        sys.exit(cli.main(["slerp", a, b, "--t", "0.3", "-o", out]))
    print("DONE", flush=True)
    """
)


def _signal_mid_merge(fam, tmp_path, sig, mode):
    work = tmp_path / "work"
    work.mkdir()
    out, marker = work / "merged", tmp_path / "marker"
    # A shell's background job (e.g. a test run started with `&` without job control) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt: give the child the
    # disposition an interactive user's merge has.
    p = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, str(fam.a), str(fam.b), str(out), str(marker), mode],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert marker.exists(), f"child never reached the first tensor: {p.communicate(timeout=5)}"
        staged = os.listdir(work)
        assert len(staged) == 1 and ".merge-fast-tmp-" in staged[0] and p.poll() is None, staged
        p.send_signal(sig)
        stdout, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "DONE" not in stdout and "no signal" not in stdout, stdout
    assert not out.exists(), f"{sig.name} mid-merge left a folder at the target"
    assert os.listdir(work) == [], f"{sig.name} left {os.listdir(work)} beside the target"
    return p.returncode, err


def test_sigint_mid_merge_cleans_up(model_family, tmp_path):
    """Ctrl-C (SIGINT) during a merge: KeyboardInterrupt, non-zero exit, no target, and the
    temporary folder removed (the Python exception path can clean up, unlike SIGKILL)."""
    rc, err = _signal_mid_merge(model_family("llama", "float32", False), tmp_path, signal.SIGINT, "api")
    assert rc != 0, "SIGINT mid-merge: exit code 0"
    assert "KeyboardInterrupt" in err, err[-2000:]


def test_sigterm_mid_merge_cleans_up(model_family, tmp_path):
    """SIGTERM (kill, systemd, a job scheduler) is handled like Ctrl-C: MergeInterrupted,
    non-zero exit, staged folder removed."""
    rc, err = _signal_mid_merge(model_family("llama", "float32", False), tmp_path, signal.SIGTERM, "api")
    assert rc == 1, (rc, err[-2000:])
    assert "MergeInterrupted" in err or "Terminated" in err, err[-2000:]
    assert "interrupted by SIGTERM; no output written" in err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_cli_signal_mid_merge(model_family, tmp_path, sig, code):
    """The CLI: 128 + signal number, a one-line message, no traceback, nothing left."""
    rc, err = _signal_mid_merge(model_family("llama", "float32", False), tmp_path, sig, "cli")
    assert rc == code, (rc, err)
    assert "Traceback" not in err and "no output written" in err, err


def test_sigterm_handler_restored(mf, model_family, tmp_path):
    """The SIGTERM handler exists only while a merge runs; a caller's own handler is kept."""
    fam = model_family("llama", "float32", False)
    seen = []

    def progress(*_):
        seen.append(signal.getsignal(signal.SIGTERM))

    # From the default disposition, whatever an earlier test in this process installed (a Ray
    # driver sets its own SIGTERM handler), so the check does not depend on test order.
    entry = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(tmp_path / "o1"), progress=progress)
        assert seen and seen[0] not in (signal.SIG_DFL, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, entry)

    def mine(*_):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        seen.clear()
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(tmp_path / "o2"), progress=progress)
        assert seen[0] is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigkill_mid_merge_leftover_removed_by_next_run(mf, model_family, tmp_path):
    """SIGKILL mid-merge leaves no folder at the target; the staged folder stays (nothing can run); the next merge into the same
    target sees that its process is gone, removes it and says so."""
    fam = model_family("llama", "float32", False)
    work = tmp_path / "work"
    work.mkdir()
    out, marker = work / "merged", tmp_path / "marker"
    p = subprocess.Popen([sys.executable, "-c", SIGNAL_CHILD, str(fam.a), str(fam.b), str(out), str(marker), "api"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert marker.exists()
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not out.exists(), "SIGKILL mid-merge left a folder at the target path"
    left = os.listdir(work)
    assert len(left) == 1 and left[0].startswith(f".merged.merge-fast-tmp-{p.pid}-"), left
    with pytest.warns(UserWarning, match=rf"removed .*{left[0]}.*process {p.pid} no longer runs"):
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out))
    assert os.listdir(work) == ["merged"]
