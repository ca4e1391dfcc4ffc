"""Output-path safety (issue 8): a merge never writes over, into or around its inputs or the
current directory, never deletes a folder it did not write, stages on the target's
filesystem, cleans up after itself (and after a killed earlier run), and turns every
environment failure into a MergeError naming the path."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import dir_snapshot, merge_fast_cli, read_folder_f32, read_folder_native


@pytest.fixture
def fam(model_family, copy_family):
    """A private copy of tiny llama models, so a test may put outputs around them."""
    return copy_family(model_family("llama", "float32", False))


def _snap(*folders):
    return {str(f): dir_snapshot(f) for f in folders}


def _expected_slerp(mf, fam, tmp_path, t=0.3):
    ref = tmp_path / "ref_out"
    mf.slerp(str(fam.a), str(fam.b), t=t, out=str(ref))
    return read_folder_native(ref)


# ------------------------------------------------------------- inputs are never touched
@pytest.mark.parametrize("where", ["equal", "parent", "dotdot", "inside", "symlink"])
def test_output_touching_an_input_is_refused(mf, fam, tmp_path, where):
    """out = A, out = the folder holding A and B, out = .../zz/../A, out inside A, out a
    symlink to A: ConfigError naming both paths; inputs byte-identical."""
    (tmp_path / "zz").mkdir()
    link = tmp_path / "link"
    link.symlink_to(fam.a, target_is_directory=True)
    out = {"equal": fam.a, "parent": tmp_path, "dotdot": tmp_path / "zz" / ".." / "a",
           "inside": fam.a / "sub", "symlink": link}[where]
    before = _snap(fam.a, fam.b)
    with pytest.raises(mf.ConfigError) as ei:
        mf.linear([str(fam.a), str(fam.b)], out=str(out), overwrite=True)
    msg = str(ei.value)
    assert str(out) in msg and ("/a" in msg or "/b" in msg), msg
    assert ("contains" in msg) == (where == "parent")
    assert _snap(fam.a, fam.b) == before
    assert not (fam.a / "sub").exists()
    assert os.readlink(link) == str(fam.a)
    assert not [n for n in os.listdir(tmp_path) if "merge-fast" in n]


def test_output_containing_the_current_directory_is_refused(mf, fam, tmp_path, monkeypatch):
    """`cd project && merge ... -o .` or out="" must not wipe the project."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hi')\n")
    monkeypatch.chdir(project / "src")
    before = dir_snapshot(project)
    for out in (".", "", str(project), ".."):
        with pytest.raises(mf.ConfigError, match="current directory|empty") as ei:
            mf.slerp(str(fam.a), str(fam.b), t=0.5, out=out, overwrite=True)
        if out:
            assert "current directory" in str(ei.value) and str(project / "src") in str(ei.value)
    assert dir_snapshot(project) == before


def test_cli_output_dot_refused_without_traceback(fam, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    r = subprocess.run([*merge_fast_cli(), "linear", str(fam.a), str(fam.b), "-o", ".", "--overwrite"],
                       cwd=project, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r
    assert "current directory" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert os.listdir(project) == ["notes.txt"] and (project / "notes.txt").read_text() == "keep me"


def test_lora_apply_output_touching_adapter_or_base_refused(mf, fam, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for out in (adapter, fam.base, fam.base / "merged", adapter / "merged"):
        before = _snap(adapter, fam.base)
        with pytest.raises(mf.ConfigError, match="input"):
            mf.lora.apply(str(fam.base), str(adapter), out=str(out), overwrite=True)
        assert _snap(adapter, fam.base) == before


def test_config_tokenizer_source_and_fisher_protected(mf, fam, tmp_path):
    tok = tmp_path / "tok"
    shutil.copytree(fam.a, tok)
    cfg = {"merge_method": "linear", "models": [{"model": str(fam.a), "parameters": {"weight": 1}},
                                                {"model": str(fam.b), "parameters": {"weight": 1}}],
           "tokenizer_source": str(tok)}
    with pytest.raises(mf.ConfigError, match="tok"):
        mf.run(cfg, str(tok / "inner"))
    fisher = tmp_path / "fishers"
    fisher.mkdir()
    for m in (fam.a, fam.b):
        shutil.copy(m / "model.safetensors", fisher / f"{m.name}.safetensors")
    before = dir_snapshot(fisher)
    with pytest.raises(mf.ConfigError, match="fishers"):
        mf.fisher_weighted([str(fam.a), str(fam.b)], [str(fisher / "a.safetensors"), str(fisher / "b.safetensors")],
                           out=str(fisher), overwrite=True)
    assert dir_snapshot(fisher) == before


def test_crossarch_writers_protect_inputs(mf, fam):
    before = _snap(fam.a, fam.b)
    with pytest.raises(mf.ConfigError, match="input"):
        mf.align(str(fam.a), str(fam.b), out=str(fam.b))
    with pytest.raises(mf.ConfigError, match="input"):
        mf.procrustes_absorb(str(fam.a), [str(fam.b)], out=str(fam.b / "x"), beta=1.0)
    assert _snap(fam.a, fam.b) == before


def test_subspace_masks_output_file_not_an_input(mf, fam):
    target = fam.a / "model.safetensors"
    before = _snap(fam.a, fam.b)
    for out in (target, fam.b / "masks.safetensors", fam.a):
        with pytest.raises(mf.ConfigError, match="input|folder"):
            mf.subspace_masks(str(fam.a), str(fam.b), 2, str(out))
    assert _snap(fam.a, fam.b) == before


def test_fisher_output_file_not_an_input(mf, fam, tmp_path):
    """`merge-fast fisher` refuses to write its Fisher over (or into) the model it reads,
    before loading anything."""
    pytest.importorskip("torch")
    from merge_fast.torch.fisher import fisher_main

    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "hello world"}\n')
    before = _snap(fam.a)
    for out in (fam.a / "model.safetensors", fam.a / "fisher.safetensors", data):
        with pytest.raises(mf.ConfigError, match="input"):
            fisher_main([str(fam.a), "--data", str(data), "--out", str(out)])
    assert _snap(fam.a) == before and data.read_text() == '{"text": "hello world"}\n'


# --------------------------------------------------------- existing targets: overwrite
def test_existing_user_folder_never_replaced(mf, fam, tmp_path):
    """A non-empty folder that merge_fast did not write: refused without overwrite, and with
    overwrite too, naming what is there; nothing in it changes."""
    out = tmp_path / "photos"
    (out / "2024").mkdir(parents=True)
    (out / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    (out / "model.safetensors").write_bytes((tmp_path / "a" / "model.safetensors").read_bytes())  # not ours
    before = dir_snapshot(out)
    with pytest.raises(mf.ConfigError, match=r"not empty.*cat\.jpg.*overwrite"):
        mf.slerp(str(fam.a), str(fam.b), t=0.5, out=str(out))
    with pytest.raises(mf.ConfigError, match=r"does not look like a merge output.*cat\.jpg"):
        mf.slerp(str(fam.a), str(fam.b), t=0.5, out=str(out), overwrite=True)
    assert dir_snapshot(out) == before and (out / "2024").is_dir()
    flat = tmp_path / "flat"  # only files, but none of ours
    flat.mkdir()
    shutil.copy(fam.a / "model.safetensors", flat)
    with pytest.raises(mf.ConfigError, match="does not look like a merge output"):
        mf.slerp(str(fam.a), str(fam.b), t=0.5, out=str(flat), overwrite=True)


def test_existing_empty_folder_is_used(mf, fam, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out))
    assert read_folder_native(out).keys() == read_folder_native(fam.a).keys()
    assert not [n for n in os.listdir(tmp_path) if "merge-fast" in n]


def test_overwrite_replaces_previous_outputs_only(mf, fam, tmp_path):
    """overwrite=True replaces a merge_fast output (recipe metadata) and a mergekit output
    (mergekit_config.yml), also through a symlink, which keeps pointing at the new output."""
    expected = _expected_slerp(mf, fam, tmp_path, 0.7)
    ours = tmp_path / "ours"
    mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(ours))
    link = tmp_path / "link"
    link.symlink_to(ours, target_is_directory=True)
    mf.slerp(str(fam.a), str(fam.b), t=0.7, out=str(link), overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(ours)
    got = read_folder_native(ours)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
    mk = tmp_path / "mk"
    mk.mkdir()
    (mk / "mergekit_config.yml").write_text("merge_method: linear\n")
    (mk / "model.safetensors").write_bytes(b"old")
    mf.slerp(str(fam.a), str(fam.b), t=0.7, out=str(mk), overwrite=True)
    assert not (mk / "mergekit_config.yml").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["a", "b", "base", "ours", "link", "mk", "ref_out"])


def test_cli_overwrite_flag(fam, tmp_path):
    out = tmp_path / "out"
    cmd = [*merge_fast_cli(), "slerp", str(fam.a), str(fam.b), "--t", "0.3", "-o", str(out), "-q"]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_output_under_a_regular_file(mf, fam, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(mf.ConfigError, match=r"file\.txt is a file"):
        mf.slerp(str(fam.a), str(fam.b), t=0.5, out=str(f / "sub" / "merged"))
    r = subprocess.run([*merge_fast_cli(), "slerp", str(fam.a), str(fam.b), "--t", "0.5", "-o", str(f / "m")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "is a file" in r.stderr and "Traceback" not in r.stderr
    assert f.read_text() == "x"


# ------------------------------------------------------------------- mount points
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_mount_point_target_staged_inside(mf, fam, tmp_path):
    """A target that is a mount point cannot be renamed: staging happens inside it and the
    files are moved; a second merge with overwrite replaces them; nothing is left over."""
    expected = _expected_slerp(mf, fam, tmp_path, 0.3)
    with tmpfs(tmp_path / "mnt", "64m") as mnt:
        assert os.path.ismount(mnt)
        (mnt / "lost+found").mkdir()  # as on a fresh ext4 filesystem: not a reason to refuse, and kept
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(mnt), max_shard_size="8KB")
        assert os.path.ismount(mnt)
        got = read_folder_native(mnt)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(mnt), overwrite=True)  # single file now
        names = os.listdir(mnt)
        assert "model.safetensors.index.json" not in names and not [n for n in names if n.startswith((".", "model-"))]
        assert (mnt / "lost+found").is_dir()
        got = read_folder_native(mnt)
        assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_disk_full_while_copying_side_files(mf, fam, tmp_path):
    """A real full filesystem (256 KB tmpfs) while the 1 MB tokenizer.json is copied:
    MergeIOError naming the file, and nothing left on the filesystem."""
    (fam.a / "tokenizer.json").write_bytes(b"{" + b" " * 1_000_000 + b"}")
    with tmpfs(tmp_path / "small", "256k") as mnt:
        out = mnt / "merged"
        with pytest.raises(mf.MergeIOError, match="tokenizer.json") as ei:
            mf.slerp(str(fam.a), str(fam.b), t=0.5, out=str(out))
        assert "No space left" in str(ei.value)
        assert os.listdir(mnt) == []
        r = subprocess.run([*merge_fast_cli(), "slerp", str(fam.a), str(fam.b), "--t", "0.5", "-o", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "No space left" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert os.listdir(mnt) == []


# ------------------------------------------------------------- nothing left behind
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_folder_of_dead_process_removed(mf, fam, tmp_path):
    out = tmp_path / "merged"
    stale = tmp_path / f".merged.merge-fast-tmp-{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".merged.merge-fast-tmp-{os.getppid()}-0123abcd"  # a live process: kept
    alive.mkdir()
    other = tmp_path / f".other.merge-fast-tmp-{_dead_pid()}-0123abcd"  # another target: kept
    other.mkdir()
    with pytest.warns(UserWarning, match=r"removed .*merge-fast-tmp.*no longer runs"):
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out))
    assert not stale.exists() and alive.exists() and other.exists()
    assert out.is_dir()


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EBUSY])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_final_rename(mf, fam, tmp_path, monkeypatch, code, existing):
    """The final rename fails (another filesystem, busy): MergeIOError, staged folder
    removed, a previous output left as it was."""
    out = tmp_path / "merged"
    if existing:
        mf.slerp(str(fam.a), str(fam.b), t=0.9, out=str(out))
    before = dir_snapshot(out) if existing else None
    real_rename = os.rename

    def rename(src, dst, *a, **k):
        if "merge-fast-tmp" in str(src):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(mf.MergeIOError, match=r"cannot move the finished merge into .*merged") as ei:
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), overwrite=existing)
    assert os.strerror(code) in str(ei.value)
    monkeypatch.undo()
    assert not [n for n in os.listdir(tmp_path) if "merge-fast" in n], os.listdir(tmp_path)
    if existing:
        assert dir_snapshot(out) == before
    else:
        assert not out.exists()


def test_input_changed_during_merge(mf, fam, tmp_path):
    """An input file whose size changes while merging: MergeIOError, no output."""
    out = tmp_path / "merged"
    grown = []

    def progress(done, total, *_):
        if not grown:
            with open(fam.b / "model.safetensors", "ab") as f:
                f.write(b"\0" * 8)
            grown.append(done)

    with pytest.raises(mf.MergeIOError, match=r"model\.safetensors changed during the merge"):
        mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), progress=progress)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if "merge-fast" in n]


# ------------------------------------------------------------------- raw exceptions
def test_numpy_scalars_accepted(mf, fam, tmp_path):
    ref = _expected_slerp(mf, fam, tmp_path, 0.5)
    out = tmp_path / "np"
    mf.slerp(str(fam.a), str(fam.b), t=np.float32(0.5), out=str(out), threads=np.int64(2), seed=np.int64(0))
    got = read_folder_native(out)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)
    cfg = {"merge_method": "linear", "models": [{"model": str(fam.a), "parameters": {"weight": np.float64(1.0)}},
                                                {"model": str(fam.b), "parameters": {"weight": np.float32(3.0)}}]}
    mf.run(cfg, str(tmp_path / "cfg"), threads=np.int32(1))
    a, b = read_folder_f32(fam.a), read_folder_f32(fam.b)
    got = read_folder_f32(tmp_path / "cfg")
    for k in a:
        np.testing.assert_allclose(got[k], (a[k].astype(np.float64) + 3 * b[k]) / 4, rtol=1e-6, atol=1e-7)
    x, y = np.float32([1, 2]), np.float32([3, 5])
    np.testing.assert_allclose(mf.linear([x, y], weights=[np.float16(1), np.float64(3)]), [2.5, 4.25])


def test_unaligned_float32_buffer_accepted(mf):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000).astype(np.float32)
    y = rng.standard_normal(1000).astype(np.float32)
    buf = np.zeros(4 * 1000 + 1, np.uint8)
    un = np.frombuffer(buf.data, dtype=np.float32, count=1000, offset=1)
    buf[1:] = np.frombuffer(x.tobytes(), np.uint8)
    assert not un.flags.aligned and un.flags.c_contiguous and np.array_equal(un, x)
    np.testing.assert_array_equal(mf.slerp(un, y, t=0.25), mf.slerp(x, y, t=0.25))
    for got, ref in zip(mf.svd(un.reshape(40, 25)), mf.svd(x.reshape(40, 25))):
        np.testing.assert_array_equal(got, ref)


def test_binary_config_file(mf, tmp_path):
    p = tmp_path / "merge.yml"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(mf.ConfigError, match=r"merge\.yml is not UTF-8"):
        mf.config.load(str(p))
    r = subprocess.run([*merge_fast_cli(), "run", str(p), str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------- YAML bombs
BILLION_LAUGHS = "\n".join(
    ["a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]"]
    + [f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")]
    + ["merge_method: linear", "models: *i", ""]
)


def test_billion_laughs_fails_fast(mf, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(mf.ConfigError, match="alias"):
        mf.config.load(BILLION_LAUGHS)
    p = tmp_path / "bomb.yml"
    p.write_text(BILLION_LAUGHS)
    with pytest.raises(mf.ConfigError, match=r"bomb\.yml.*alias"):
        mf.run(str(p), str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 3.0
    with pytest.raises(mf.ConfigError, match="recursive"):
        mf.config.load("merge_method: linear\nmodels: &m [*m]\n")


def test_config_size_cap_and_aliases_still_work(mf, fam, tmp_path):
    big = "merge_method: linear\n" + "# padding\n" * 120_000
    with pytest.raises(mf.ConfigError, match="1 MB"):
        mf.config.load(big)
    p = tmp_path / "big.yml"
    p.write_text(big)
    with pytest.raises(mf.ConfigError, match=r"big\.yml.*1 MB"):
        mf.config.load(str(p))
    # an ordinary anchor/alias (shared parameters) is fine, and errors still find their line
    text = (f"merge_method: linear\nmodels:\n  - model: {fam.a}\n    parameters: &p {{weight: 1.0}}\n"
            f"  - model: {fam.b}\n    parameters: *p\n")
    cfg = mf.config.load(text)
    assert [m.parameters for m in cfg.models] == [{"weight": 1.0}, {"weight": 1.0}]
    assert cfg.src.lines[("models", 1, "parameters")] == 6


# ---------------------------------------------------------------------- threads cap
def test_threads_cap(mf, fam, tmp_path):
    x = np.float32([1, 2])
    for bad in (1025, 10_000, 2**40):
        with pytest.raises(mf.ConfigError, match="at most 1024"):
            mf.linear([x, x], threads=bad)
        with pytest.raises(mf.ConfigError, match="at most 1024"):
            mf.linear([str(fam.a), str(fam.b)], out=str(tmp_path / "o"), threads=bad)
        with pytest.raises(mf.ConfigError, match="at most 1024"):
            mf.run({"merge_method": "linear", "models": [{"model": str(fam.a)}, {"model": str(fam.b)}]},
                   str(tmp_path / "o"), threads=bad)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(mf.ConfigError, match="positive integer"):
            mf.linear([x, x], threads=bad)
    r = subprocess.run([*merge_fast_cli(), "linear", str(fam.a), str(fam.b), "-o", str(tmp_path / "o"),
                        "--threads", "100000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "at most 1024" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
