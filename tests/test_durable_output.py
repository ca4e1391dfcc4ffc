"""Durable output: before the staged folder is renamed into place every file in it and the
folder itself are fsynced, and the parent folder after the rename; ``fsync=False`` /
``--no-fsync`` skip all of it. A spy records which paths the real ``os.fsync`` was called on
(read back from /proc/self/fd) during real merges."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def fsynced(monkeypatch):
    calls: list[str] = []
    real = os.fsync

    def spy(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def _check_durable(calls: list[str], out: Path) -> None:
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert any(f.endswith(".safetensors") for f in files)
    stage = [c for c in calls if Path(c).name.startswith(f".{out.name}.merge-fast-tmp-")]
    assert len(stage) == 1, calls  # the staging folder itself, once
    synced = sorted(Path(c).name for c in calls if Path(c).parent == Path(stage[0]))
    assert synced == files  # every shard, index and side file, exactly once
    assert calls.index(stage[0]) == len(calls) - 2  # the folder after its files
    assert calls[-1] == str(out.parent)  # the parent after the rename


def test_folder_merge_fsyncs_every_file_then_folders(mf, llama_f32, tmp_path, fsynced):
    out = tmp_path / "out"
    mf.task_arithmetic(str(llama_f32.base), [str(llama_f32.a), str(llama_f32.b)], out=str(out))
    _check_durable(fsynced, out)
    fsynced.clear()
    mf.task_arithmetic(str(llama_f32.base), [str(llama_f32.a)], out=str(tmp_path / "scratch"), fsync=False)
    assert fsynced == []
    assert (tmp_path / "scratch" / "config.json").is_file()


def test_cli_no_fsync(llama_f32, tmp_path, fsynced):
    from merge_fast.cli import main

    out = tmp_path / "cli"
    assert main(["linear", str(llama_f32.a), str(llama_f32.b), "-o", str(out), "-q"]) == 0
    _check_durable(fsynced, out)
    fsynced.clear()
    assert main(["linear", str(llama_f32.a), str(llama_f32.b), "-o", str(tmp_path / "cli2"), "-q", "--no-fsync"]) == 0
    assert fsynced == [] and (tmp_path / "cli2" / "config.json").is_file()


def test_config_run_fsync_option(mf, llama_f32, tmp_path, fsynced):
    from merge_fast.cli import main

    cfg = {"models": [{"model": str(llama_f32.a)}, {"model": str(llama_f32.b)}], "merge_method": "linear",
           "parameters": {"weight": 1.0}}
    out = tmp_path / "run"
    mf.run(cfg, out=out)
    _check_durable(fsynced, out)  # README.md, mergekit_config.yml and tokenizer files included
    assert "mergekit_config.yml" in os.listdir(out)
    fsynced.clear()
    mf.run(cfg, out=tmp_path / "run2", fsync=False)
    assert fsynced == []
    cfg_file = tmp_path / "c.yml"
    cfg_file.write_text(f"merge_method: linear\nparameters:\n  weight: 1.0\nmodels:\n  - model: {llama_f32.a}\n  - model: {llama_f32.b}\n")
    assert main(["run", str(cfg_file), str(tmp_path / "run3"), "--no-fsync", "-q"]) == 0
    assert fsynced == [] and (tmp_path / "run3" / "model.safetensors").is_file()


def _resident_pages(path: Path) -> int:
    """How many of `path`'s pages are in the page cache (``mincore`` on a mapping of it)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        buf = (ctypes.c_char * size).from_buffer(m)  # private and never written: the file's pages
        try:
            assert libc.mincore(ctypes.addressof(buf), size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            del buf
    return sum(v & 1 for v in vec)


def test_durable_output_goes_around_the_page_cache(mf, llama_f32, tmp_path):
    """A durable merge's shards are written with O_DIRECT (their bytes reach the disk before
    the merge returns anyway): the same files as a scratch merge's, none of their pages left
    in the page cache."""
    # Does O_DIRECT bypass the page cache here? (A file system may refuse it: merge_fast then
    # writes through the page cache, the same bytes; tmpfs takes it but lives in the cache.)
    import mmap

    probe, block = tmp_path / "probe", mmap.mmap(-1, 4096)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        try:
            os.write(fd, block)
        finally:
            os.close(fd)
        direct = _resident_pages(probe) == 0
    except OSError:
        direct = False
    args = ([str(llama_f32.a), str(llama_f32.b)], [0.3, 0.7])
    mf.linear(*args, out=str(tmp_path / "durable"), max_shard_size=100_000)
    mf.linear(*args, out=str(tmp_path / "scratch"), max_shard_size=100_000, fsync=False)
    shards = sorted(p.name for p in (tmp_path / "durable").glob("*.safetensors"))
    assert len(shards) > 1
    for name in shards:  # before reading them back, which caches them
        assert (_resident_pages(tmp_path / "durable" / name) == 0) == direct, name
        assert _resident_pages(tmp_path / "scratch" / name) > 0, name  # the check sees cached pages
    for name in shards + ["model.safetensors.index.json"]:
        assert (tmp_path / "durable" / name).read_bytes() == (tmp_path / "scratch" / name).read_bytes(), name


def test_multi_stage_config_fsyncs_only_the_final_output(mf, llama_f32, tmp_path, fsynced):
    """Intermediate stages are scratch (deleted once the final stage is written, read right
    back by the next one): only the final output is fsynced, and the same bytes come out."""
    a, b = llama_f32.a, llama_f32.b
    text = (f"name: mid\nmerge_method: linear\nparameters:\n  weight: [0.3, 0.7]\nmodels:\n"
            f"  - model: {a}\n  - model: {b}\n---\n"
            f"merge_method: linear\nparameters:\n  weight: 0.5\nmodels:\n  - model: mid\n  - model: {a}\n")
    cfg = tmp_path / "stages.yml"
    cfg.write_text(text)
    out = tmp_path / "final"
    mf.run(str(cfg), out=out)
    _check_durable(fsynced, out)
    assert not [c for c in fsynced if ".merge-fast-stages-" in c], fsynced
    fsynced.clear()
    mf.run(str(cfg), out=tmp_path / "scratch", fsync=False)
    assert fsynced == []
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "scratch" / "model.safetensors").read_bytes()
