"""One name per option (`max_shard_size`, same forms everywhere) and the error classes'
Python-side contract (MergeIOError is an OSError; prefixes made in one place)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from conftest import folder_shards, read_folder_native


@pytest.mark.parametrize("size, expect", [
    (12_000, 12_000), ("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("1GiB", 2**30), ("2KiB", 2048),
    # mergekit's counts: K, M, B are thousands, millions, billions of bytes
    ("1000K", 10**6), ("500M", 5 * 10**8), ("5B", 5 * 10**9), ("1.5B", 1_500_000_000),
])
def test_max_shard_size_forms(size, expect):
    from merge_fast import plan
    from merge_fast.config import parse_shard_size

    assert plan.shard_size(size) == expect
    assert parse_shard_size(size) == expect  # the deprecated name parses the same forms


def _shard_bytes(folder) -> list:
    out = []
    for f in folder_shards(folder):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        out.append(sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"))
    return out


def test_max_shard_size_same_in_functions_run_and_cli(mf, llama_f32, tmp_path):
    fam = llama_f32
    limit = 20_000
    fn = mf.linear([str(fam.a), str(fam.b)], weights=[0.5, 0.5], out=str(tmp_path / "fn"), max_shard_size="20KB")
    cfg = {"merge_method": "linear", "models": [{"model": str(fam.a), "parameters": {"weight": 0.5}},
                                               {"model": str(fam.b), "parameters": {"weight": 0.5}}]}
    mf.run(cfg, out=tmp_path / "run", max_shard_size="20KB", write_model_card=False)
    with pytest.warns(DeprecationWarning, match="out_shard_size"):
        mf.run(cfg, out=tmp_path / "old", out_shard_size="20KB", write_model_card=False)
    from merge_fast.cli import main

    (tmp_path / "c.yml").write_text(json.dumps(cfg))  # JSON is YAML
    for flag in ("--max-shard-size", "--out-shard-size"):  # ours, and mergekit's spelling
        assert main(["run", str(tmp_path / "c.yml"), str(tmp_path / flag), flag, "20KB", "-q", "--no-write-model-card"]) == 0
    sizes = _shard_bytes(fn.path)
    assert len(sizes) > 1 and max(sizes) <= limit
    want = read_folder_native(fn.path)
    ref = _shard_bytes(tmp_path / "run")  # configs order tensors by layer: their own layout
    assert len(ref) > 1 and max(ref) <= limit
    for d in ("run", "old", "--max-shard-size", "--out-shard-size"):
        assert _shard_bytes(tmp_path / d) == ref, d
        got = read_folder_native(tmp_path / d)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), d


def test_bad_max_shard_size_names_the_option(mf, llama_f32, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(llama_f32.a)}, {"model": str(llama_f32.b)}]}
    with pytest.raises(mf.ConfigError, match=r"^config error: max_shard_size: cannot parse size 'lots'"):
        mf.run(cfg, out=tmp_path / "o", max_shard_size="lots")
    assert not (tmp_path / "o").exists()


def test_io_errors_are_oserrors(mf, tmp_path):
    target = tmp_path / "missing" / "x.safetensors"
    with pytest.raises(OSError) as ei:  # raised by the Rust core
        mf._core.save_file(str(target), [("a", np.zeros(2, np.float32), [2], "F32")])
    assert isinstance(ei.value, mf.MergeIOError) and isinstance(ei.value, mf.MergeError)
    assert str(target) in str(ei.value)
    assert issubclass(mf.MergeIOError, OSError) and not issubclass(mf.ConfigError, OSError)


def test_message_prefixes_in_one_place(mf):
    from merge_fast._errors import config_error, io_error, unprefixed

    e = config_error("dtype must be one of float32")
    assert type(e) is mf.ConfigError and str(e) == "config error: dtype must be one of float32"
    assert type(config_error("gone", mf.ModelNotFound)) is mf.ModelNotFound
    e = io_error("cannot write x")
    assert type(e) is mf.MergeIOError and str(e) == "I/O error: cannot write x"
    assert unprefixed(e) == "cannot write x" and unprefixed(mf.ConfigError("config error: k: v")) == "k: v"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unprefixed(ValueError("plain")) == "plain"
