"""Malformed / inconsistent checkpoints: each must raise the right MergeError subclass, with a
message naming the file (and the tensor where there is one), and create no output folder."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import BF16, read_folder_native, st_read, st_read_header, st_rewrite, st_write

X = "model.layers.0.self_attn.k_proj.weight"  # 16x32, same shape as V
V = "model.layers.0.self_attn.v_proj.weight"


@pytest.fixture
def pair(llama_f32_sharded, tmp_path):
    """Fresh copies of two sharded llama fine-tunes: tmp/in_a, tmp/in_b."""
    a = tmp_path / "in_a"
    b = tmp_path / "in_b"
    shutil.copytree(llama_f32_sharded.a, a)
    shutil.copytree(llama_f32_sharded.b, b)
    return a, b


@pytest.fixture
def single_pair(llama_f32, tmp_path):
    a = tmp_path / "in_a"
    b = tmp_path / "in_b"
    shutil.copytree(llama_f32.a, a)
    shutil.copytree(llama_f32.b, b)
    return a, b


def shard_of(folder: Path, tensor: str) -> Path:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / idx["weight_map"][tensor]


def expect_error(mf, exc, a, b, tmp_path, must=(), any_of=(), position="second"):
    """slerp(a, b) must raise `exc`; message must contain every string in `must` and at least
    one of `any_of`; nothing new may appear in tmp_path."""
    out = tmp_path / "merged_out"
    before = set(os.listdir(tmp_path))
    with pytest.raises(mf.MergeError) as ei:
        mf.slerp(str(a), str(b), t=0.4, out=str(out))
    err = ei.value
    msg = str(err)
    assert isinstance(err, exc), f"expected {exc.__name__}, got {type(err).__name__}: {msg}"
    for s in must:
        assert s in msg, f"message should contain {s!r}: {msg!r}"
    if any_of:
        assert any(s in msg for s in any_of), f"message should contain one of {any_of}: {msg!r}"
    assert not out.exists(), "output folder created by a failed merge"
    new = sorted(set(os.listdir(tmp_path)) - before)
    assert not new, f"failed merge left {new} beside the target"
    return msg


def test_control_valid_copies_merge(mf, pair, tmp_path):
    """The untouched copies merge fine (so every failure below is caused by the corruption)."""
    a, b = pair
    mf.slerp(str(a), str(b), t=0.4, out=str(tmp_path / "ok"))
    assert (tmp_path / "ok").is_dir()


# ------------------------------------------------------------------ per-file corruption
@pytest.mark.parametrize("which", ["first", "second"])
def test_truncated_shard(mf, pair, tmp_path, which):
    a, b = pair
    victim = a if which == "first" else b
    f = shard_of(victim, X)
    raw = f.read_bytes()
    f.write_bytes(raw[:-100])
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name])


def test_truncated_single_file(mf, single_pair, tmp_path):
    a, b = single_pair
    f = b / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=["model.safetensors"])


def test_file_shorter_than_length_prefix(mf, single_pair, tmp_path):
    a, b = single_pair
    f = b / "model.safetensors"
    f.write_bytes(b"\x05\x00\x00")
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=["model.safetensors"])


def test_empty_file(mf, single_pair, tmp_path):
    a, b = single_pair
    (b / "model.safetensors").write_bytes(b"")
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=["model.safetensors"])


@pytest.mark.parametrize("extra", [1, 1000, 2**40, 2**64 - 1])
def test_header_length_past_end(mf, pair, tmp_path, extra):
    a, b = pair
    f = shard_of(b, X)
    raw = bytearray(f.read_bytes())
    n = min(len(raw) + extra, 2**64 - 1)
    raw[:8] = struct.pack("<Q", n)
    f.write_bytes(bytes(raw))
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name])


@pytest.mark.parametrize(
    "bad_json",
    [b'{"a": ', b"not json at all", b"[1, 2, 3]", b'{"' + X.encode() + b'": 5}', b"\xff\xfe\x00garbage"],
    ids=["unterminated", "text", "array", "entry-not-object", "binary"],
)
def test_invalid_header_json(mf, pair, tmp_path, bad_json):
    a, b = pair
    f = shard_of(b, X)
    st_rewrite(f, bad_json)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name])


def test_offsets_out_of_bounds(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    header, n, raw = st_read_header(f)
    data_len = len(raw) - 8 - n
    s, e = header[X]["data_offsets"]
    header[X]["data_offsets"] = [data_len + 64, data_len + 64 + (e - s)]
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name, X])


def test_offsets_reversed(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    header, _, _ = st_read_header(f)
    s, e = header[X]["data_offsets"]
    header[X]["data_offsets"] = [e, s]
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name, X])


def test_overlapping_spans(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    assert shard_of(b, V) == f
    header, _, _ = st_read_header(f)
    header[X]["data_offsets"] = list(header[V]["data_offsets"])  # X now aliases V's bytes
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name], any_of=[X, V])


def test_partially_overlapping_spans(mf, single_pair, tmp_path):
    a, b = single_pair
    f = b / "model.safetensors"
    header, _, _ = st_read_header(f)
    s, e = header[X]["data_offsets"]
    header[X]["data_offsets"] = [s + 4, e + 4]  # shifted into the next tensor's first element
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=["model.safetensors"])


@pytest.mark.parametrize("dtype", ["F13", "float32", "", "Q4_K"])
def test_unknown_dtype(mf, pair, tmp_path, dtype):
    a, b = pair
    f = shard_of(b, X)
    header, _, _ = st_read_header(f)
    header[X]["dtype"] = dtype
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name, X])


def test_shape_bytesize_mismatch(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    header, _, _ = st_read_header(f)
    header[X]["shape"] = [16, 33]  # 16*33*4 != span of 16*32*4 bytes
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name, X])


def test_shape_overflow(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    header, _, _ = st_read_header(f)
    header[X]["shape"] = [2**40, 2**40, 2**40]  # numel overflows u64
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name, X])


def test_negative_shape(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    header, _, _ = st_read_header(f)
    header[X]["shape"] = [-16, -32]
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name])


def test_same_mismatch_in_first_model(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(a, X)
    header, _, _ = st_read_header(f)
    header[X]["shape"] = [8, 32]
    st_rewrite(f, header)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name, X])


# ------------------------------------------------------------------ index.json problems
def test_index_names_missing_shard(mf, pair, tmp_path):
    a, b = pair
    idx_path = b / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"][X] = "model-00099-of-00099.safetensors"
    idx_path.write_text(json.dumps(idx))
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=["model-00099-of-00099.safetensors"])


def test_shard_file_deleted(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    f.unlink()
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[f.name])


def test_index_names_tensor_absent_from_shard(mf, pair, tmp_path):
    a, b = pair
    idx_path = b / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    right = idx["weight_map"][X]
    wrong = next(s for s in sorted(set(idx["weight_map"].values())) if s != right)
    idx["weight_map"][X] = wrong
    idx_path.write_text(json.dumps(idx))
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=[X, wrong])


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"weight_map": 5}', b'{"metadata": {}}'],
                         ids=["truncated", "array", "weight_map-not-object", "no-weight_map"])
def test_invalid_index_json(mf, pair, tmp_path, content):
    a, b = pair
    (b / "model.safetensors.index.json").write_bytes(content)
    expect_error(mf, mf.InvalidCheckpoint, a, b, tmp_path, must=["model.safetensors.index.json"])


def test_index_path_escape(mf, pair, tmp_path):
    """An index may not point outside its folder (../ traversal)."""
    a, b = pair
    idx_path = b / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    real = idx["weight_map"][X]
    idx["weight_map"][X] = "../in_a/" + real
    idx_path.write_text(json.dumps(idx))
    out = tmp_path / "merged_out"
    try:
        mf.slerp(str(a), str(b), t=0.4, out=str(out))
    except mf.MergeError:
        assert not out.exists()
        return
    # accepting it is tolerable only if the data really came from that file; we do not
    # require either behaviour, but it must not crash or produce a half-written folder
    assert out.is_dir()


# ------------------------------------------------------------------ folder-level problems
def test_missing_input_folder(mf, pair, tmp_path):
    a, _ = pair
    missing = tmp_path / "no_such_model"
    expect_error(mf, mf.MergeError, a, missing, tmp_path, must=["no_such_model"])


def test_folder_without_weights(mf, pair, tmp_path):
    a, _ = pair
    empty = tmp_path / "weightless_model"
    empty.mkdir()
    shutil.copy(a / "config.json", empty / "config.json")
    expect_error(mf, mf.InvalidCheckpoint, a, empty, tmp_path, must=["weightless_model"])


# ------------------------------------------------------------------ cross-input mismatches
def _drop_tensor_single(folder: Path, name: str):
    f = folder / "model.safetensors"
    meta, tensors = st_read(f)
    del tensors[name]
    st_write(f, tensors, metadata=meta)


def test_tensor_missing_from_one_input(mf, single_pair, tmp_path):
    a, b = single_pair
    renamed = tmp_path / "model_lacking_k"
    b.rename(renamed)
    _drop_tensor_single(renamed, X)
    expect_error(mf, mf.TensorMismatch, a, renamed, tmp_path, must=[X])


def test_tensor_missing_from_one_input_sharded(mf, pair, tmp_path):
    a, b = pair
    f = shard_of(b, X)
    meta, tensors = st_read(f)
    del tensors[X]
    st_write(f, tensors, metadata=meta)
    idx_path = b / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    del idx["weight_map"][X]
    idx_path.write_text(json.dumps(idx))
    expect_error(mf, mf.TensorMismatch, a, b, tmp_path, must=[X])


def test_tensor_missing_from_base_in_task_arithmetic(mf, tmp_path, llama_f32):
    base = tmp_path / "base_lacking"
    shutil.copytree(llama_f32.base, base)
    _drop_tensor_single(base, X)
    out = tmp_path / "merged_out"
    with pytest.raises(mf.TensorMismatch) as ei:
        mf.task_arithmetic(str(base), [str(llama_f32.a), str(llama_f32.b)], weights=[1.0, 1.0], out=str(out))
    assert X in str(ei.value)
    assert not out.exists()


def test_shape_mismatch_across_inputs(mf, single_pair, tmp_path):
    a, b = single_pair
    f = b / "model.safetensors"
    meta, tensors = st_read(f)
    tensors[X] = np.ascontiguousarray(tensors[X].T)  # 32x16 instead of 16x32
    st_write(f, tensors, metadata=meta)
    expect_error(mf, mf.TensorMismatch, a, b, tmp_path, must=[X])


def test_shape_mismatch_in_linear_third_input(mf, llama_f32, tmp_path):
    c = tmp_path / "third"
    shutil.copytree(llama_f32.b, c)
    f = c / "model.safetensors"
    meta, tensors = st_read(f)
    tensors[V] = np.zeros((8, 32), np.float32)
    st_write(f, tensors, metadata=meta)
    out = tmp_path / "merged_out"
    with pytest.raises(mf.TensorMismatch) as ei:
        mf.linear([str(llama_f32.base), str(llama_f32.a), str(c)], weights=[1, 1, 1], out=str(out))
    assert V in str(ei.value)
    assert not out.exists()


def test_non_float_tensor_is_rejected_or_passed(mf, single_pair, tmp_path):
    """An integer tensor cannot be slerped; it must be a MergeError (or copied unchanged)."""
    a, b = single_pair
    for d in (a, b):
        f = d / "model.safetensors"
        meta, tensors = st_read(f)
        tensors["model.position_ids"] = np.arange(16, dtype=np.int64)
        st_write(f, tensors, metadata=meta)
    out = tmp_path / "merged_out"
    try:
        mf.slerp(str(a), str(b), t=0.4, out=str(out))
    except mf.MergeError as e:
        assert "model.position_ids" in str(e)
        assert not out.exists()
        return
    got = read_folder_native(out)
    assert np.array_equal(got["model.position_ids"], np.arange(16, dtype=np.int64))


def test_tensor_missing_from_first_input(mf, single_pair, tmp_path):
    a, b = single_pair
    renamed = tmp_path / "first_lacking_k"
    a.rename(renamed)
    _drop_tensor_single(renamed, X)
    expect_error(mf, mf.TensorMismatch, renamed, b, tmp_path, must=[X])


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_input_is_error(mf, single_pair, tmp_path, value):
    """DESIGN §4: a NaN produced by a merge is an exception, never a wrong file."""
    a, b = single_pair
    f = b / "model.safetensors"
    meta, tensors = st_read(f)
    tensors[X] = tensors[X].copy()
    tensors[X][3, 4] = value
    st_write(f, tensors, metadata=meta)
    msg = expect_error(mf, mf.MergeError, a, b, tmp_path, must=[X])
    assert "nan" in msg.lower() or "finite" in msg.lower() or "inf" in msg.lower(), msg


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_non_finite_input_named_by_element_deep_in_a_tensor(mf, tmp_path, dtype):
    """Inputs are checked block by block as they are widened: the message still names the
    element's index in the whole tensor (here in the second engine chunk, past its first
    blocks), for a stored bf16 and a float32 tensor."""
    rng = np.random.default_rng(3)
    np_dtype = BF16 if dtype == "bfloat16" else np.float32
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        st_write(d / "model.safetensors", {"w": rng.standard_normal((200, 700)).astype(np_dtype)})
    _, t = st_read(b / "model.safetensors")
    w = t["w"].copy()
    w.reshape(-1)[70001] = np.inf
    st_write(b / "model.safetensors", {"w": w})
    with pytest.raises(mf.NumericalError, match="input model #1 .* is inf at element 70001"):
        mf.linear([str(a), str(b)], [0.5, 0.5], out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_failed_merge_creates_no_parent_folders(mf, single_pair, tmp_path):
    a, b = single_pair
    (b / "model.safetensors").write_bytes(b"\x00" * 4)
    out = tmp_path / "new_parent" / "deeper" / "merged"
    with pytest.raises(mf.InvalidCheckpoint):
        mf.slerp(str(a), str(b), t=0.4, out=str(out))
    assert not (tmp_path / "new_parent").exists(), "failed merge created the target's parent folders"


def test_output_into_new_parent_folders_works(mf, single_pair, tmp_path):
    a, b = single_pair
    out = tmp_path / "new_parent" / "deeper" / "merged"
    mf.slerp(str(a), str(b), t=0.4, out=str(out))
    assert (out / "model.safetensors").exists()


def test_output_is_an_input(mf, single_pair, tmp_path):
    a, b = single_pair
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    with pytest.raises(mf.ConfigError):
        mf.slerp(str(a), str(b), t=0.4, out=str(b))
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before, "input folder modified"
