"""Model references resolved through huggingface_hub, against a stand-in hub on 127.0.0.1
(tests/hub_server.py): huggingface_hub itself lists, downloads and caches; every merged number
is compared with the same merge of the local folders, and every offline rerun (server gone,
HF_HUB_OFFLINE=1) must give byte-identical output from the cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import merge_fast_cli, read_folder_native, st_read_header, st_write
from hub_server import HubServer, folder_files, go_offline, hub  # noqa: F401  (hub: the fixture)

import merge_fast as mf

EXTRA = {"README.md": b"# a model card\n", "pytorch_model.bin": b"not read when safetensors exist",
         "onnx/model.onnx": b"not read", "consolidated.pth": b"not read"}
WANTED = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = read_folder_native(a), read_folder_native(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert ta[k].tobytes() == tb[k].tobytes(), k


def recipe(folder: Path) -> dict:
    shard = sorted(folder.glob("*.safetensors"))[0]
    header, _, _ = st_read_header(shard)
    return json.loads(header["__metadata__"]["merge_fast"])


def write_cfg(tmp_path: Path, text: str, name: str = "merge.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


TIES = """merge_method: ties
base_model: {base}
parameters: {{density: 0.6, normalize: true}}
models:
  - model: {a}
    parameters: {{weight: 0.7}}
  - model: {b}
    parameters: {{weight: 0.5}}
dtype: float32
"""


def test_config_with_hub_ids_matches_local_then_runs_offline(hub, llama_f32, tmp_path, monkeypatch):
    fam = llama_f32
    commits = {n: hub.add(f"org/{n}", {**folder_files(getattr(fam, n)), **EXTRA}) for n in ("base", "a", "b")}
    out_hub, out_local = tmp_path / "hub_out", tmp_path / "local_out"
    out_offline = tmp_path / "offline" / "hub_out"  # same name: the card names the folder
    cfg = write_cfg(tmp_path, TIES.format(base="org/base", a="org/a", b="org/b"))
    mf.run(cfg, out_hub)
    mf.run(write_cfg(tmp_path, TIES.format(base=fam.base, a=fam.a, b=fam.b), "local.yml"), out_local)
    assert_same_tensors(out_hub, out_local)
    # Only what a merge reads was downloaded (no README, .bin, onnx/ or consolidated copies).
    for n in ("base", "a", "b"):
        assert set(hub.downloads(f"org/{n}")) == WANTED, hub.downloads(f"org/{n}")
    # The cache holds huggingface_hub's symlinked snapshot, and that is what was read.
    snap = tmp_path / "hf" / "hub" / "models--org--a" / "snapshots" / commits["a"] / "model.safetensors"
    assert snap.is_symlink() and snap.resolve().parent.name == "blobs"
    # Every hub input is pinned to its commit, in the card and in the recipe metadata.
    card = (out_hub / "README.md").read_text()
    pinned = {h["repo_id"]: h["commit"] for h in recipe(out_hub)["hub_inputs"]}
    assert pinned == {f"org/{n}": c for n, c in commits.items()}
    for n, c in commits.items():
        assert f"`org/{n}` (revision `main`): commit `{c}`" in card
    assert "- `org/a`" in card  # listed by repo id, not by cache path
    assert "hub_inputs" not in recipe(out_local)

    go_offline(monkeypatch, hub)
    mf.run(cfg, out_offline)
    assert files_of(out_offline) == files_of(out_hub)


def test_revisions_give_their_own_weights(hub, llama_f32, tmp_path):
    fam = llama_f32
    hub.add("org/base", folder_files(fam.base))
    main = hub.add("org/m", folder_files(fam.a))
    v1 = hub.add("org/m", folder_files(fam.b), revision="v1")
    text = "merge_method: slerp\nbase_model: org/base\nparameters: {{t: 0.4}}\nmodels:\n  - model: org/base\n  - model: {m}\n"
    outs = {}
    for tag, m in [("main", "org/m"), ("v1", "org/m@v1"), ("commit", f"org/m@{v1}")]:
        outs[tag] = tmp_path / f"out_{tag}"
        mf.run(write_cfg(tmp_path, text.format(m=m), f"{tag}.yml"), outs[tag])
    # mergekit's `revision:` key on a slice source means the same revision.
    slices = ("merge_method: slerp\nbase_model: org/base\nparameters: {t: 0.4}\nslices:\n  - sources:\n"
              "      - {model: org/base, layer_range: [0, 2]}\n      - {model: org/m, revision: v1, layer_range: [0, 2]}\n")
    outs["key"] = tmp_path / "out_key"
    mf.run(write_cfg(tmp_path, slices, "key.yml"), outs["key"])
    # ... and so does mergekit's serialized form {model: {path, revision}}.
    outs["long"] = tmp_path / "out_long"
    mf.run({"merge_method": "slerp", "base_model": "org/base", "parameters": {"t": 0.4},
            "models": [{"model": "org/base"}, {"model": {"model": {"path": "org/m", "revision": "v1"}}}]}, outs["long"])
    for tag, src in [("main", fam.a), ("v1", fam.b)]:
        local = tmp_path / f"local_{tag}"
        mf.run(write_cfg(tmp_path, text.format(m=src), f"local_{tag}.yml"), local)
        assert_same_tensors(outs[tag], local)
    assert_same_tensors(outs["commit"], outs["v1"])
    assert_same_tensors(outs["key"], outs["v1"])
    assert_same_tensors(outs["long"], outs["v1"])
    a, b = read_folder_native(outs["main"]), read_folder_native(outs["v1"])
    assert any(a[k].tobytes() != b[k].tobytes() for k in a)
    got = {h["repo_id"] + "@" + h["revision"]: h["commit"] for h in recipe(outs["v1"])["hub_inputs"]}
    assert got["org/m@v1"] == v1 and v1 != main
    card = (outs["v1"] / "README.md").read_text()
    assert "base_model:\n- org/base\n- org/m\n" in card  # metadata takes repo ids
    assert f"`org/m` (revision `v1`): commit `{v1}`" in card


def test_tokenizer_source_from_the_hub(hub, llama_f32, tmp_path):
    fam = llama_f32
    tok = folder_files(fam.b)
    tc = json.loads(tok["tokenizer_config.json"])
    tc["model_max_length"] = 77  # tells this tokenizer apart
    tok["tokenizer_config.json"] = json.dumps(tc).encode()
    hub.add("org/a", folder_files(fam.a))
    hub.add("org/tok", tok)
    mf.run("merge_method: linear\nparameters: {weight: 1}\ntokenizer_source: org/tok\nmodels:\n  - model: org/a\n",
           tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert_same_tensors(tmp_path / "out", fam.a)


def make_adapter(folder: Path, base: dict, r: int = 4, alpha: int = 8) -> dict:
    """A PEFT LoRA on q_proj/v_proj of every layer, written from the format (not by peft)."""
    rng = np.random.default_rng(5)
    tensors = {}
    for name, w in base.items():
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            mod = name[: -len(".weight")]
            tensors[f"base_model.model.{mod}.lora_A.weight"] = rng.standard_normal((r, w.shape[1])).astype(np.float32) * 0.1
            tensors[f"base_model.model.{mod}.lora_B.weight"] = rng.standard_normal((w.shape[0], r)).astype(np.float32) * 0.1
    folder.mkdir(parents=True)
    st_write(folder / "adapter_model.safetensors", tensors)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"]}))
    return tensors


def test_lora_on_a_hub_model(hub, llama_f32, tmp_path, monkeypatch):
    fam = llama_f32
    base_t = read_folder_native(fam.base)
    ad = tmp_path / "adapter"
    lt = make_adapter(ad, base_t)
    hub.add("org/base", folder_files(fam.base))
    hub.add("org/lora", {**folder_files(ad), "README.md": b"card"})
    cfg = "merge_method: passthrough\nmodels:\n  - model: {m}\n"
    mf.run(write_cfg(tmp_path, cfg.format(m="org/base+org/lora")), tmp_path / "hub_out")
    mf.run(write_cfg(tmp_path, cfg.format(m=f"{fam.base}+{ad}"), "local.yml"), tmp_path / "local_out")
    assert_same_tensors(tmp_path / "hub_out", tmp_path / "local_out")
    assert set(hub.downloads("org/lora")) == {"adapter_config.json", "adapter_model.safetensors"}
    got = read_folder_native(tmp_path / "hub_out")
    q = "model.layers.1.self_attn.q_proj.weight"
    ref = base_t[q].astype(np.float64) + 2.0 * (lt[f"base_model.model.{q[:-7]}.lora_B.weight"].astype(np.float64)
                                                @ lt[f"base_model.model.{q[:-7]}.lora_A.weight"])
    np.testing.assert_allclose(got[q], ref, rtol=1e-5, atol=1e-6)
    # A hub base with a local adapter, offline from the cache, through merge_fast.lora.apply.
    go_offline(monkeypatch, hub)
    mf.lora.apply("org/base", ad, tmp_path / "apply_out")
    assert_same_tensors(tmp_path / "apply_out", tmp_path / "local_out")


BAD = {
    "missing_repo": ("org/missing", "'org/missing'", "no such repo on the Hugging Face Hub", "HF_TOKEN"),
    "gated_repo": ("org/gated", "'org/gated'", "is gated", "HF_TOKEN"),
    "missing_revision": ("org/a@nope", "revision 'nope' not found", "org/a"),
    "missing_file": ("org/gappy", "file model.safetensors not found", "org/gappy"),
    "missing_shard": ("org/sharded", "not found", "model-0000"),
    "not_a_repo_id": ("./no/such/folder", "not found", "no such local path"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_references_fail_before_anything_is_written(hub, llama_f32, llama_f32_sharded, tmp_path, case):
    ref, *want = BAD[case]
    hub.add("org/a", folder_files(llama_f32.a))
    hub.add("org/gappy", folder_files(llama_f32.b))
    hub.add("org/gated", folder_files(llama_f32.b), gated=True)
    hub.hide.add(("org/gappy", "model.safetensors"))  # listed, but the download is 404
    sharded = folder_files(llama_f32_sharded.a)
    shards = sorted(set(json.loads(sharded["model.safetensors.index.json"])["weight_map"].values()))
    hub.add("org/sharded", {k: v for k, v in sharded.items() if k != shards[1]})  # the index names it
    cfg = write_cfg(tmp_path, f"merge_method: linear\nmodels:\n  - model: org/a\n  - model: {ref}\n")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(mf.ModelNotFound) as ei:
        mf.run(cfg, tmp_path / "out", cache_dir=tmp_path / "hf" / "hub")
    msg = str(ei.value)
    assert "merge.yml line 4" in msg and all(w in msg for w in want), msg
    assert isinstance(ei.value, mf.ConfigError) and isinstance(ei.value, mf.MergeError)
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(set(before) | {"hf"})


def test_all_bad_references_reported_at_once(hub, llama_f32, tmp_path):
    hub.add("org/a", folder_files(llama_f32.a))
    with pytest.raises(mf.ModelNotFound) as ei:
        mf.linear(["org/a@v9", "org/x", "org/y"], out=tmp_path / "out")
    msg = str(ei.value)
    assert "'v9' not found" in msg and "'org/x'" in msg and "'org/y'" in msg
    assert not (tmp_path / "out").exists()


def test_dropped_connection_is_a_clear_error_and_a_rerun_resumes(hub, llama_f32, tmp_path):
    hub.add("org/a", folder_files(llama_f32.a))
    hub.add("org/b", folder_files(llama_f32.b))
    hub.drop.add(("org/b", "model.safetensors"))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(mf.MergeError) as ei:
        mf.linear(["org/a", "org/b"], out=tmp_path / "out")
    msg = str(ei.value)
    assert "org/b" in msg and "download failed" in msg and "Run again" in msg, msg
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(set(before) | {"hf"})
    hub.drop.clear()
    hub.add("org/c", folder_files(llama_f32.base))
    hub.flaky.add(("org/c", "model.safetensors"))  # breaks off once: huggingface_hub resumes it
    mf.linear(["org/a", "org/b", "org/c"], out=tmp_path / "out")
    mf.linear([llama_f32.a, llama_f32.b, llama_f32.base], out=tmp_path / "local")
    assert_same_tensors(tmp_path / "out", tmp_path / "local")
    assert hub.downloads("org/c").count("model.safetensors") == 2 and not hub.flaky


def test_offline_without_a_cached_copy(hub, llama_f32, tmp_path, monkeypatch):
    hub.add("org/a", folder_files(llama_f32.a))
    hub.add("org/b", folder_files(llama_f32.b))
    mf.linear(["org/a"], out=tmp_path / "only_a")  # caches org/a only
    go_offline(monkeypatch, hub)
    with pytest.raises(mf.ModelNotFound) as ei:
        mf.linear(["org/a", "org/b"], out=tmp_path / "out")
    msg = str(ei.value)
    assert "'org/b'" in msg and "HF_HUB_OFFLINE" in msg and "org/a" not in msg.replace("'org/b'", "")
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_falls_back_to_the_cache(hub, llama_f32, tmp_path):
    hub.add("org/a", folder_files(llama_f32.a))
    hub.add("org/b", folder_files(llama_f32.b))
    mf.linear(["org/a", "org/b"], out=tmp_path / "first")
    hub.stop()  # connection refused, but HF_HUB_OFFLINE is not set
    mf.linear(["org/a", "org/b"], out=tmp_path / "second")
    mf.linear([llama_f32.a, llama_f32.b], out=tmp_path / "local")
    assert_same_tensors(tmp_path / "second", tmp_path / "local")
    with pytest.raises(mf.ModelNotFound) as ei:
        mf.linear(["org/a", "org/c"], out=tmp_path / "third")
    assert "'org/c'" in str(ei.value) and "could not be reached" in str(ei.value), str(ei.value)
    assert not (tmp_path / "third").exists()


def test_private_repo_needs_the_token(hub, llama_f32, tmp_path, monkeypatch):
    hub.add("org/a", folder_files(llama_f32.a))
    hub.add("org/private", folder_files(llama_f32.b), token="hf_test_secret")
    with pytest.raises(mf.ModelNotFound) as ei:
        mf.linear(["org/a", "org/private"], out=tmp_path / "out")
    assert "HF_TOKEN" in str(ei.value)
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
    mf.linear(["org/a", "org/private"], out=tmp_path / "out")
    mf.linear([llama_f32.a, llama_f32.b], out=tmp_path / "local")
    assert_same_tensors(tmp_path / "out", tmp_path / "local")


def test_python_api_sharded_and_cli(hub, llama_f32_sharded, tmp_path):
    fam = llama_f32_sharded
    hub.add("org/sa", folder_files(fam.a))
    hub.add("org/sb", folder_files(fam.b))
    cache = tmp_path / "my_cache"
    mf.task_arithmetic("org/sa", ["org/sb"], weights=[0.5], out=tmp_path / "api", cache_dir=cache)
    mf.task_arithmetic(fam.a, [fam.b], weights=[0.5], out=tmp_path / "local")
    assert_same_tensors(tmp_path / "api", tmp_path / "local")
    assert (cache / "models--org--sa" / "snapshots").is_dir()
    assert not (tmp_path / "hf").exists()  # cache_dir, not HF_HUB_CACHE
    cfg = write_cfg(tmp_path, "merge_method: task_arithmetic\nbase_model: org/sa\nmodels:\n"
                              "  - model: org/sb\n    parameters: {weight: 0.5}\n")
    cli_cache = tmp_path / "cli_cache"
    for mode, out in (("0", tmp_path / "online" / "cli"), ("1", tmp_path / "offline" / "cli")):
        env = {**os.environ, "HF_HUB_OFFLINE": mode}  # HF_ENDPOINT points at the stand-in
        r = subprocess.run([*merge_fast_cli(), "run", str(cfg), str(out), "--cache-dir", str(cli_cache), "-q"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert_same_tensors(out, tmp_path / "local")
    assert files_of(tmp_path / "online" / "cli") == files_of(tmp_path / "offline" / "cli")
    assert (cli_cache / "models--org--sb" / "snapshots").is_dir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    r = subprocess.run([*merge_fast_cli(), "run", str(cfg), str(tmp_path / "cli2"), "-q"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "org/sa" in r.stderr and "HF_HUB_OFFLINE" in r.stderr, r.stderr
    assert not (tmp_path / "cli2").exists()


def test_fisher_merge_with_hub_models_and_a_hub_fisher_file(hub, llama_f32, tmp_path):
    fam = llama_f32
    rng = np.random.default_rng(3)
    fish = {}
    for n, m in (("a", fam.a), ("b", fam.b)):
        fish[n] = tmp_path / f"fisher_{n}.safetensors"
        st_write(fish[n], {k: rng.random(v.shape).astype(np.float32) for k, v in read_folder_native(m).items()})
    hub.add("org/a", folder_files(fam.a))
    hub.add("org/b", folder_files(fam.b))
    fisher_commit = hub.add("org/fishers", {"fisher_a.safetensors": fish["a"].read_bytes()})
    mf.fisher_weighted(["org/a", "org/b"], ["org/fishers/fisher_a.safetensors", fish["b"]], out=tmp_path / "hub_out")
    mf.fisher_weighted([fam.a, fam.b], [fish["a"], fish["b"]], out=tmp_path / "local_out")
    assert_same_tensors(tmp_path / "hub_out", tmp_path / "local_out")
    pinned = {(h["repo_id"], h.get("filename")): h["commit"] for h in recipe(tmp_path / "hub_out")["hub_inputs"]}
    assert pinned[("org/fishers", "fisher_a.safetensors")] == fisher_commit
    assert hub.downloads("org/fishers") == ["fisher_a.safetensors"]


def test_other_folder_functions_take_hub_ids(hub, llama_f32, tmp_path):
    from conftest import st_read

    hub.add("org/a", folder_files(llama_f32.a))
    hub.add("org/base", folder_files(llama_f32.base))
    mf.subspace_masks("org/a", "org/base", 2, tmp_path / "hub.safetensors")
    mf.subspace_masks(llama_f32.a, llama_f32.base, 2, tmp_path / "local.safetensors")
    h, l = st_read(tmp_path / "hub.safetensors")[1], st_read(tmp_path / "local.safetensors")[1]
    assert sorted(h) == sorted(l) and all(h[k].tobytes() == l[k].tobytes() for k in h)
    r_hub = mf.align("org/a", "org/base")
    r_local = mf.align(llama_f32.a, llama_f32.base)
    np.testing.assert_array_equal(r_hub.rotation, r_local.rotation)


def test_bin_only_hub_repo(hub, llama_f32, tmp_path):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in read_folder_native(llama_f32.b).items()}
    folder = tmp_path / "bin_b"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((llama_f32.b / f).read_bytes())
    hub.add("org/a", folder_files(llama_f32.a))
    hub.add("org/binonly", folder_files(folder))
    mf.linear(["org/a", "org/binonly"], out=tmp_path / "out")
    mf.linear([llama_f32.a, llama_f32.b], out=tmp_path / "local")
    assert_same_tensors(tmp_path / "out", tmp_path / "local")
    assert "pytorch_model.bin" in hub.downloads("org/binonly")
    assert list((tmp_path / "hf" / "merge_fast" / "bin-cache").iterdir())


def test_resolution_is_lazy(llama_f32, tmp_path):
    """Local merges never import huggingface_hub (about 1 s of imports) nor torch."""
    code = ("import sys, merge_fast as mf; from merge_fast.hub import split_reference; "
            f"mf.linear([{str(llama_f32.a)!r}, {str(llama_f32.b)!r}], out={str(tmp_path / 'out')!r}); "
            f"mf.run('merge_method: passthrough\\nmodels:\\n  - model: {llama_f32.a}\\n', {str(tmp_path / 'out2')!r}); "
            "assert 'huggingface_hub' not in sys.modules and 'torch' not in sys.modules, 'eager import'; "
            "print(split_reference('org/m@v2+org/lora@abc'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "('org/m', 'v2', 'org/lora', 'abc')"


def test_without_huggingface_hub_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['huggingface_hub'] = None\n"
            "import merge_fast as mf\n"
            f"try:\n    mf.linear(['org/a', 'org/b'], out={str(tmp_path / 'out')!r})\n"
            "except mf.ConfigError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install huggingface_hub" in r.stdout and "'org/a'" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "out").exists()
