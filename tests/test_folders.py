"""Folder -> folder merges of tiny llama / qwen2 / gpt_neox models: every output tensor against
the numpy formula, output layout (shards, index, header metadata), copied config/tokenizer
files, MergeResult, progress, and that transformers loads the result."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    ARCHS,
    BF16,
    COPIED_FILES,
    assert_matches_reference,
    assert_slerp_matches,
    read_folder_f32,
    read_folder_native,
    ref_linear,
    ref_task_arithmetic,
    st_read,
    st_read_header,
    st_write,
)

SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
NP_DTYPE = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}


# ------------------------------------------------------------------------ helpers
def check_layout(out: Path, max_shard_bytes: int | None = None) -> dict:
    """Validate the output folder's safetensors layout; returns name -> native array."""
    out = Path(out)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files, f"no .safetensors in {out}: {os.listdir(out)}"
    idx_path = out / "model.safetensors.index.json"
    tensors = {}
    per_file = {}
    for f in files:
        meta, t = st_read(out / f)  # independent reader: offsets/holes/sizes validated there
        assert meta is not None, f"{f}: no __metadata__ in header"
        assert meta.get("format") == "pt", f"{f}: __metadata__.format = {meta.get('format')!r}, want 'pt'"
        assert "merge_fast" in meta, f"{f}: no 'merge_fast' recipe entry in __metadata__ ({meta})"
        assert all(isinstance(v, str) for v in meta.values()), f"{f}: metadata values must be strings"
        per_file[f] = t
        for k, v in t.items():
            assert k not in tensors, f"{k} in two shards"
            tensors[k] = v
    if len(files) == 1:
        assert files == ["model.safetensors"], files
        assert not idx_path.exists(), "index.json written for a single-file output"
    else:
        n = len(files)
        for i, f in enumerate(files, 1):
            m = SHARD_RE.match(f)
            assert m, f"bad shard name {f}"
            assert int(m.group(1)) == i and int(m.group(2)) == n, f"shard numbering {f} (expected {i} of {n})"
        assert idx_path.exists(), "sharded output without model.safetensors.index.json"
        idx = json.loads(idx_path.read_text())
        wm = idx["weight_map"]
        assert set(wm) == set(tensors), "index weight_map names != tensors in shards"
        for k, f in wm.items():
            assert k in per_file[f], f"index maps {k} to {f}, which does not hold it"
        total = sum(v.nbytes for v in tensors.values())
        assert idx["metadata"]["total_size"] == total, (idx["metadata"]["total_size"], total)
        assert set(wm.values()) == set(files), "a shard file is not referenced by the index"
    if max_shard_bytes is not None:
        for f, t in per_file.items():
            size = sum(v.nbytes for v in t.values())
            assert size <= max_shard_bytes or len(t) == 1, (
                f"{f}: {size} tensor bytes in {len(t)} tensors exceeds max_shard_size {max_shard_bytes}"
            )
    # the official safetensors library agrees with our reader
    f32 = read_folder_f32(out)
    assert set(f32) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(f32[k], tensors[k].astype(np.float32))
    return tensors


def check_copied_files(out: Path, src: Path):
    for name in COPIED_FILES:
        if (src / name).exists():
            assert (out / name).exists(), f"{name} not copied to the output"
            assert (out / name).read_bytes() == (src / name).read_bytes(), f"{name} differs from {src}"


def check_loads_in_transformers(out: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 77, 3]])).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits.float()).all(), "non-finite logits from merged model"


def check_result(r, out: Path, inputs: list[Path], n_tensors: int):
    assert Path(r.path).resolve() == Path(out).resolve(), (r.path, out)
    assert r.tensors_written == n_tensors, (r.tensors_written, n_tensors)
    in_data = sum(sum(a.nbytes for a in read_folder_native(d).values()) for d in inputs)
    in_files = sum(p.stat().st_size for d in inputs for p in Path(d).iterdir())
    assert in_data <= r.bytes_read <= in_files, (r.bytes_read, in_data, in_files)
    out_data = sum(a.nbytes for a in read_folder_native(out).values())
    out_files = sum(p.stat().st_size for p in Path(out).iterdir())  # shards + index (+ copied files)
    assert out_data <= r.bytes_written <= out_files, (r.bytes_written, out_data, out_files)
    assert 0 < r.seconds < 120, r.seconds


def expected_dtype(src_native: dict, name: str, out_dtype: str | None):
    return NP_DTYPE[out_dtype] if out_dtype else src_native[name].dtype


METHODS = ("slerp", "linear", "task_arithmetic")


def run_method(mf, method, fam, out, **kw):
    if method == "slerp":
        return mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), **kw), [fam.a, fam.b], fam.a
    if method == "linear":
        return (
            mf.linear([str(fam.base), str(fam.a), str(fam.b)], weights=[0.2, 0.3, 0.5], out=str(out), normalize=True, **kw),
            [fam.base, fam.a, fam.b],
            fam.base,
        )
    if method == "task_arithmetic":
        return (
            mf.task_arithmetic(str(fam.base), [str(fam.a), str(fam.b)], weights=[1.0, 0.5], lam=0.8, out=str(out), **kw),
            [fam.base, fam.a, fam.b],
            fam.base,
        )
    raise ValueError(method)


def check_values(method, inputs_f32, got_native, src_native, out_dtype=None):
    names = set(src_native)
    assert set(got_native) == names, (
        f"output tensor names differ: missing {sorted(names - set(got_native))[:5]}, "
        f"extra {sorted(set(got_native) - names)[:5]}"
    )
    for k in sorted(names):
        dt = expected_dtype(src_native, k, out_dtype)
        got = got_native[k]
        assert got.shape == src_native[k].shape, (k, got.shape, src_native[k].shape)
        xs = [m[k] for m in inputs_f32]
        if method == "slerp":
            assert_slerp_matches(got, xs[0], xs[1], 0.3, dt, k)
        elif method == "linear":
            ref, scale = ref_linear(xs, [0.2, 0.3, 0.5], True)
            assert_matches_reference(got, ref, scale, dt, k)
        else:
            ref, scale = ref_task_arithmetic(xs[0], xs[1:], [1.0, 0.5], 0.8)
            assert_matches_reference(got, ref, scale, dt, k)


# ------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_folder_merge(mf, model_family, tmp_path, arch, dtype, sharded, method):
    fam = model_family(arch, dtype, sharded)
    out = tmp_path / "merged"
    kw = {"max_shard_size": "10KB"} if sharded else {}
    r, inputs, src = run_method(mf, method, fam, out, **kw)
    assert out.is_dir()
    got = check_layout(out, max_shard_bytes=10 * 1024 if sharded else None)
    if sharded:
        assert len(list(out.glob("*.safetensors"))) > 1, "max_shard_size=10KB should give several shards"
    else:
        assert (out / "model.safetensors").exists(), "default max_shard_size (5GB) must give one file"
    src_native = read_folder_native(src)
    inputs_f32 = [read_folder_f32(d) for d in inputs]
    check_values(method, inputs_f32, got, src_native)
    check_copied_files(out, src)
    check_result(r, out, inputs, len(src_native))
    check_loads_in_transformers(out)
    # nothing else left beside the output (temp folder renamed away)
    assert sorted(os.listdir(tmp_path)) == ["merged"], os.listdir(tmp_path)


# ------------------------------------------------------------------------ options
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
def test_out_dtype_from_f32(mf, model_family, tmp_path, out_dtype):
    fam = model_family("llama", "float32", False)
    out = tmp_path / "o"
    mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), out_dtype=out_dtype)
    got = check_layout(out)
    assert {v.dtype for v in got.values()} == {NP_DTYPE[out_dtype]}
    check_values("slerp", [read_folder_f32(fam.a), read_folder_f32(fam.b)], got, read_folder_native(fam.a), out_dtype)
    check_loads_in_transformers(out)


def test_out_dtype_f32_from_bf16(mf, model_family, tmp_path):
    fam = model_family("qwen2", "bfloat16", True)
    out = tmp_path / "o"
    mf.task_arithmetic(str(fam.base), [str(fam.a), str(fam.b)], weights=[1.0, 0.5], lam=0.8, out=str(out),
                       out_dtype="float32", dtype="float32")
    got = check_layout(out)
    assert {v.dtype for v in got.values()} == {np.dtype(np.float32)}
    ins = [read_folder_f32(d) for d in fam.dirs]
    check_values("task_arithmetic", ins, got, read_folder_native(fam.base), "float32")


def test_mixed_input_dtypes_keep_first(mf, model_family, tmp_path):
    """bf16 first model + f32 second model: default output dtype is the first's (bf16),
    said in a MergeWarning pointing at the caller, in the result and in the metadata."""
    bf = model_family("llama", "bfloat16", False)
    f32 = model_family("llama", "float32", True)
    out = tmp_path / "o"
    with pytest.warns(mf.MergeWarning, match="different dtypes") as rec:
        res = mf.slerp(str(bf.a), str(f32.b), t=0.3, out=str(out))
    assert rec[0].filename == __file__
    assert "BF16" in res.notes[0] and "F32" in res.notes[0]
    meta = json.loads(st_read_header(next(out.glob("*.safetensors")))[0]["__metadata__"]["merge_fast_input_dtypes"])
    assert meta == {bf.a.name: ["BF16"], f32.b.name: ["F32"]}  # folder names: no absolute paths
    got = check_layout(out)
    assert {v.dtype for v in got.values()} == {BF16}
    A, B = read_folder_f32(bf.a), read_folder_f32(f32.b)
    for k, v in got.items():
        assert_slerp_matches(v, A[k], B[k], 0.3, BF16, k)


@pytest.mark.parametrize("size", [12_000, "12KB"])
def test_max_shard_size_forms(mf, model_family, tmp_path, size):
    fam = model_family("gpt_neox", "float32", False)
    out = tmp_path / "o"
    mf.linear([str(fam.a), str(fam.b)], weights=[0.5, 0.5], out=str(out), max_shard_size=size)
    got = check_layout(out, max_shard_bytes=12 * 1024)
    assert len(list(out.glob("*.safetensors"))) > 1
    assert len(got) == len(read_folder_native(fam.a))


def test_bad_max_shard_size_is_config_error(mf, model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    for bad in ("5 potatoes", "-1GB"):
        out = tmp_path / f"o_{abs(hash(str(bad)))}"
        with pytest.raises(mf.ConfigError):
            mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), max_shard_size=bad)
        assert not out.exists()


def test_bad_options_are_config_errors(mf, model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    cases = [
        dict(out_dtype="int7"),
        dict(dtype="float8_not_a_type"),
    ]
    for i, kw in enumerate(cases):
        out = tmp_path / f"o{i}"
        with pytest.raises(mf.ConfigError):
            mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), **kw)
        assert not out.exists(), kw
    out = tmp_path / "ow"
    with pytest.raises(mf.ConfigError):
        mf.linear([str(fam.a), str(fam.b)], weights=[1.0], out=str(out))
    assert not out.exists()


def test_threads_option(mf, model_family, tmp_path):
    fam = model_family("llama", "float32", True)
    for n in (1, 2):
        out = tmp_path / f"o{n}"
        r = mf.slerp(str(fam.a), str(fam.b), t=0.3, out=str(out), threads=n)
        got = check_layout(out)
        check_values("slerp", [read_folder_f32(fam.a), read_folder_f32(fam.b)], got, read_folder_native(fam.a))
        assert r.tensors_written == len(got)


def test_progress_callback(mf, model_family, tmp_path):
    fam = model_family("qwen2", "float32", True)
    calls = []
    out = tmp_path / "o"
    r = mf.linear([str(fam.a), str(fam.b)], weights=[1, 1], out=str(out),
                  progress=lambda *a: calls.append(a))
    n = len(read_folder_native(fam.a))
    assert calls, "progress callable never called"
    for c in calls:
        assert len(c) == 4, c
        done, total, bdone, btotal = c
        assert total == n, (total, n)
        assert 0 <= done <= total and 0 <= bdone <= btotal
    dones = [c[0] for c in calls]
    bdones = [c[2] for c in calls]
    assert dones == sorted(dones) and bdones == sorted(bdones), "progress went backwards"
    assert calls[-1][0] == n and calls[-1][2] == calls[-1][3], f"last progress call {calls[-1]} is not complete"
    assert r.tensors_written == n


def test_progress_true_or_false_accepted(mf, model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    mf.slerp(str(fam.a), str(fam.b), t=0.5, out=str(tmp_path / "o1"), progress=False)
    check_layout(tmp_path / "o1")


def test_pathlib_paths_accepted(mf, model_family, tmp_path):
    fam = model_family("llama", "float32", False)
    r = mf.slerp(fam.a, fam.b, t=0.5, out=tmp_path / "o")
    assert Path(r.path).resolve() == (tmp_path / "o").resolve()
    check_layout(tmp_path / "o")


def test_t0_returns_first_model_exactly(mf, model_family, tmp_path):
    fam = model_family("gpt_neox", "bfloat16", True)
    mf.slerp(str(fam.a), str(fam.b), t=0.0, out=str(tmp_path / "o"))
    got = read_folder_native(tmp_path / "o")
    A = read_folder_native(fam.a)
    for k in A:
        assert np.array_equal(got[k].view(np.uint16), A[k].view(np.uint16)), f"{k}: t=0 is not the first model"


def test_existing_output_not_clobbered_by_failed_merge(mf, model_family, tmp_path):
    """A failed merge into an existing folder must leave that folder as it was."""
    fam = model_family("llama", "float32", False)
    out = tmp_path / "o"
    mf.slerp(str(fam.a), str(fam.b), t=0.5, out=str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(mf.MergeError):
        mf.slerp(str(fam.a), str(tmp_path / "does_not_exist"), t=0.5, out=str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------ multi-chunk tensors
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_medium_model_multi_chunk(mf, model_family, tmp_path, method, dtype):
    """Tensors of 70400 and 262144 elements: the engine's chunked statistics (slerp's dot and
    norms are folded across chunks) and chunked writes must give the same values."""
    fam = model_family("llama", dtype, True, "medium")
    out = tmp_path / "merged"
    r, inputs, src = run_method(mf, method, fam, out, max_shard_size="1MB")
    got = check_layout(out, max_shard_bytes=1024 * 1024)
    src_native = read_folder_native(src)
    assert max(v.size for v in src_native.values()) >= 4 * 65536
    check_values(method, [read_folder_f32(d) for d in inputs], got, src_native)
    check_result(r, out, inputs, len(src_native))
    check_loads_in_transformers(out)


def test_f16_model_folder(mf, models_root, tmp_path):
    from conftest import build_model_dirs

    d = build_model_dirs(tmp_path / "f16", "qwen2", "float16", False)
    out = tmp_path / "merged"
    mf.slerp(str(d["a"]), str(d["b"]), t=0.3, out=str(out))
    got = check_layout(out)
    assert {v.dtype for v in got.values()} == {np.dtype(np.float16)}
    check_values("slerp", [read_folder_f32(d["a"]), read_folder_f32(d["b"])], got, read_folder_native(d["a"]))


def test_per_tensor_dtype_kept(mf, model_family, tmp_path):
    """A checkpoint mixing dtypes (norms in f32, the rest bf16): by default each output tensor
    keeps the first model's dtype for that tensor."""
    from conftest import st_write
    import shutil

    fam = model_family("llama", "bfloat16", False)
    mixed = {}
    for name in ("a", "b"):
        d = tmp_path / f"mixed_{name}"
        shutil.copytree(getattr(fam, name), d)
        t = read_folder_native(d)
        t = {k: (v.astype(np.float32) if "norm" in k else v) for k, v in t.items()}
        st_write(d / "model.safetensors", t, metadata={"format": "pt"})
        mixed[name] = d
    out = tmp_path / "merged"
    mf.slerp(str(mixed["a"]), str(mixed["b"]), t=0.3, out=str(out))
    got = check_layout(out)
    for k, v in got.items():
        assert v.dtype == (np.float32 if "norm" in k else BF16), (k, v.dtype)
    check_values("slerp", [read_folder_f32(mixed["a"]), read_folder_f32(mixed["b"])], got,
                 read_folder_native(mixed["a"]))


def test_odd_shapes(mf, tmp_path, llama_f32):
    """Scalars, 1-element and zero-element tensors survive a merge."""
    from conftest import st_write
    import shutil

    rng = np.random.default_rng(5)
    extra = {
        "odd.scalar": lambda: np.array(rng.standard_normal(), np.float32),
        "odd.one": lambda: rng.standard_normal((1,)).astype(np.float32),
        "odd.empty": lambda: np.zeros((0,), np.float32),
        "odd.empty3d": lambda: np.zeros((3, 0, 2), np.float32),
    }
    dirs = []
    for name in ("a", "b"):
        d = tmp_path / f"odd_{name}"
        shutil.copytree(getattr(llama_f32, name), d)
        t = read_folder_native(d)
        t.update({k: f() for k, f in extra.items()})
        st_write(d / "model.safetensors", t, metadata={"format": "pt"})
        dirs.append(d)
    out = tmp_path / "merged"
    mf.linear([str(d) for d in dirs], weights=[0.25, 0.75], out=str(out))
    got = check_layout(out)
    A, B = read_folder_f32(dirs[0]), read_folder_f32(dirs[1])
    for k in extra:
        assert got[k].shape == A[k].shape, (k, got[k].shape)
        ref, scale = ref_linear([A[k], B[k]], [0.25, 0.75])
        assert_matches_reference(got[k], ref, scale, np.float32, k)
    out2 = tmp_path / "merged_slerp"
    mf.slerp(str(dirs[0]), str(dirs[1]), t=0.3, out=str(out2))
    got2 = check_layout(out2)
    for k in extra:
        assert got2[k].shape == A[k].shape
        assert_slerp_matches(got2[k], A[k], B[k], 0.3, np.float32, k)


def test_output_path_is_a_file(mf, llama_f32, tmp_path):
    target = tmp_path / "afile"
    target.write_bytes(b"keep me")
    with pytest.raises(mf.MergeError):
        mf.slerp(str(llama_f32.a), str(llama_f32.b), t=0.3, out=str(target))
    assert target.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_progress_true_and_seed_accepted(mf, llama_f32, tmp_path, capsys):
    r = mf.slerp(str(llama_f32.a), str(llama_f32.b), t=0.3, out=str(tmp_path / "o"), progress=True, seed=123)
    got = check_layout(tmp_path / "o")
    check_values("slerp", [read_folder_f32(llama_f32.a), read_folder_f32(llama_f32.b)], got,
                 read_folder_native(llama_f32.a))
    assert r.tensors_written == len(got)


def test_merge_into_existing_folder_replaces_it_cleanly(mf, model_family, tmp_path):
    """Re-merging into an existing output (sharded before, single file now; overwrite=True)
    must not leave stale shards or a stale index.json that would make loaders read old weights."""
    sh = model_family("llama", "float32", True)
    out = tmp_path / "merged"
    mf.slerp(str(sh.a), str(sh.b), t=0.3, out=str(out), max_shard_size="10KB")
    assert (out / "model.safetensors.index.json").exists()
    (out / "stray_user_file.txt").write_text("x")
    with pytest.raises(mf.ConfigError, match="exists and is not empty.*overwrite"):
        mf.slerp(str(sh.a), str(sh.b), t=0.7, out=str(out))
    mf.slerp(str(sh.a), str(sh.b), t=0.7, out=str(out), overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" not in names, f"stale index left: {names}"
    assert not [n for n in names if n.startswith("model-")], f"stale shards left: {names}"
    got = check_layout(out)
    check_values_t = [read_folder_f32(sh.a), read_folder_f32(sh.b)]
    for k, v in got.items():
        assert_slerp_matches(v, check_values_t[0][k], check_values_t[1][k], 0.7, np.float32, k)
    assert sorted(os.listdir(tmp_path)) == ["merged"]


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
def test_out_dtype_recorded_in_config(mf, model_family, tmp_path, out_dtype):
    """With out_dtype set, config.json must still load and, if it records a dtype, record the
    stored one; every other key is copied unchanged."""
    fam = model_family("gpt_neox", "float32", False)
    out = tmp_path / "o"
    mf.linear([str(fam.a), str(fam.b)], weights=[1, 1], out=str(out), out_dtype=out_dtype)
    src = json.loads((fam.a / "config.json").read_text())
    dst = json.loads((out / "config.json").read_text())
    assert set(src) == set(dst)
    for k in src:
        if k in ("dtype", "torch_dtype"):
            assert dst[k] == out_dtype, (k, dst[k])
        else:
            assert dst[k] == src[k], k
    check_loads_in_transformers(out)


@pytest.mark.parametrize(
    "call",
    ["t_nan", "t_inf", "lam_nan", "weight_inf", "threads_0", "threads_neg"],
)
def test_invalid_numbers_are_config_errors(mf, llama_f32, tmp_path, call):
    """Non-finite parameters and bad thread counts: ConfigError with a message that says
    what is wrong (not a JSON parser's complaint, not an OverflowError)."""
    fam = llama_f32
    out = tmp_path / "o"
    a, b, base = str(fam.a), str(fam.b), str(fam.base)
    fns = {
        "t_nan": lambda: mf.slerp(a, b, t=float("nan"), out=str(out)),
        "t_inf": lambda: mf.slerp(a, b, t=float("inf"), out=str(out)),
        "lam_nan": lambda: mf.task_arithmetic(base, [a], weights=[1.0], lam=float("nan"), out=str(out)),
        "weight_inf": lambda: mf.linear([a, b], weights=[float("inf"), 1.0], out=str(out)),
        "threads_0": lambda: mf.slerp(a, b, t=0.3, out=str(out), threads=0),
        "threads_neg": lambda: mf.slerp(a, b, t=0.3, out=str(out), threads=-1),
    }
    with pytest.raises(mf.ConfigError) as ei:
        fns[call]()
    msg = str(ei.value).lower()
    if call.startswith("threads"):
        assert "thread" in msg, msg
    else:
        assert any(w in msg for w in ("finite", "nan", "inf")), f"message does not say the value is not finite: {msg}"
        assert "expected value at line" not in msg, f"raw JSON parser error leaked: {msg}"
    assert not out.exists()


def _rss_file_kib() -> int:
    """This process's resident file-backed pages (memory-mapped inputs among them), KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_input_pages_are_released_as_the_merge_goes(mf, tmp_path):
    """Each input tensor is read once, so its mapped pages are dropped once it is merged: the
    resident set stays at a few tensors' worth, not the inputs' size (two 32 MiB models here)."""
    n, shape = 32, (512, 512)  # 1 MiB per f32 tensor
    rng = np.random.default_rng(0)
    dirs = []
    for k in "ab":
        d = tmp_path / k
        d.mkdir()
        st_write(d / "model.safetensors", {f"w.{i}": rng.standard_normal(shape, dtype=np.float32) for i in range(n)})
        dirs.append(str(d))
    mf.linear(dirs, weights=[1, 1], out=str(tmp_path / "warm"))  # code pages, thread pool
    before, peak = _rss_file_kib(), [0]

    def watch(*_):
        peak[0] = max(peak[0], _rss_file_kib() - before)

    mf.linear(dirs, weights=[1, 1], out=str(tmp_path / "o"), progress=watch)
    inputs_kib = 2 * n * 1024
    # A tensor's pages are dropped on a thread of their own once it is merged, and up to two
    # tensors per thread merge at once, so a few tensors per input may still be resident when
    # progress looks (12-16 MiB on an idle 2-core machine; more when that thread waits for a
    # core), and all 64 MiB with nothing released.
    assert 0 < peak[0] < inputs_kib * 3 / 4, f"resident file pages grew by {peak[0]} KiB over {inputs_kib} KiB of inputs"
