"""Issue 9, "Done when": real public-style configs, written with hub ids as people paste them
from model cards (``org/model``, ``org/model@rev``, ``org/base+org/lora``), run unchanged
against the stand-in hub (huggingface_hub itself downloads into a temporary cache), then
again with HF_HUB_OFFLINE=1 from that cache alone (byte-identical output, no request to the
server), and agree with mergekit 0.1.5 run on the same LOCAL models (the same config with
the names swapped for the folders): within 2 bf16 ulp, or, for the random methods (DARE,
DELLA), by statistics of the merged deltas.

One module-scoped hub and cache serve every config; mergekit runs once per config (in
process, on the local folders; and once as ``mergekit-yaml`` against the stand-in hub itself,
which it reaches through HF_ENDPOINT too). Also here: every stage's hub references resolved
before the first stage runs, mergekit's ``override_architecture``, and ``model+adapter`` in
the folder functions (align, subspace_masks).
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

import merge_fast as mf

from conftest import build_model_dirs, read_folder_f32, read_folder_native, st_write, ulp_distance
from hub_server import HubServer
from test_config import _other_vocab_model
from test_hub import make_adapter, recipe

try:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    MERGEKIT_ERR = None
except Exception as e:  # pragma: no cover - depends on the environment
    MERGEKIT_ERR = f"{type(e).__name__}: {e}"

LAYERS = 4
TAIL = "dtype: float32\nout_dtype: bfloat16\n"

# name -> (config with hub ids, how to compare with mergekit: ("ulp", max) or ("stat", rel))
CONFIGS = {
    # slerp as on countless model cards: gradient `t` per filter, a default value.
    "slerp": ("""
        slices:
          - sources:
              - model: org/a@v1
                layer_range: [0, 4]
              - model: org/b
                layer_range: [0, 4]
        merge_method: slerp
        base_model: org/a@v1
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        """, ("ulp", 2)),
    "ties": ("""
        models:
          - model: org/base
          - model: org/a@v1
            parameters:
              density: 0.5
              weight: 0.5
          - model: org/b
            parameters:
              density: 0.5
              weight: 0.3
        merge_method: ties
        base_model: org/base
        parameters:
          normalize: true
        """, ("ulp", 2)),
    # gradients on density and weight, a LoRA on a hub model (`org/base+org/lora`).
    "gradients_lora": ("""
        models:
          - model: org/base+org/lora
            parameters:
              weight: [1.0, 0.5, 0.2]
          - model: org/b
            parameters:
              weight:
                - filter: mlp
                  value: [0.1, 0.9]
                - value: 0.6
        merge_method: task_arithmetic
        base_model: org/base
        """, ("ulp", 2)),
    "dare_ties": ("""
        models:
          - model: org/base
          - model: org/a@v1
            parameters:
              density: 0.53
              weight: 0.4
          - model: org/b
            parameters:
              density: 0.53
              weight: 0.4
        merge_method: dare_ties
        base_model: org/base
        parameters:
          int8_mask: true
        """, ("stat", 0.05)),
    "model_stock": ("""
        models:
          - model: org/a@v1
          - model: org/c
        merge_method: model_stock
        base_model: org/base
        """, ("ulp", 2)),
    "della": ("""
        models:
          - model: org/a@v1
            parameters:
              weight: 0.5
              density: 0.6
              epsilon: 0.1
          - model: org/b
            parameters:
              weight: 0.5
              density: 0.6
              epsilon: 0.1
        merge_method: della
        base_model: org/base
        parameters:
          lambda: 1.0
          normalize: true
        """, ("stat", 0.05)),
    # a frankenmerge: overlapping layer ranges from two models (6 layers out of 4).
    "passthrough": ("""
        slices:
          - sources:
              - model: org/a@v1
                layer_range: [0, 3]
          - sources:
              - model: org/b
                layer_range: [1, 4]
        merge_method: passthrough
        """, ("ulp", 0)),
    # models with different tokenizers (extra tokens in org/y): the union vocabulary.
    "tokenizer_union": ("""
        models:
          - model: org/a@v1
            parameters:
              weight: 0.5
          - model: org/y
            parameters:
              weight: 0.5
        merge_method: linear
        tokenizer_source: union
        """, ("ulp", 2)),
}

# mergekit-multi's format: stage 2 names stage 1 where a model goes.
MULTI = """
name: stage1
merge_method: slerp
base_model: org/a@v1
models:
  - model: org/a@v1
  - model: org/b
parameters:
  t: [0, 0.3, 0.8, 1]
{tail}---
merge_method: ties
base_model: org/base
models:
  - model: stage1
    parameters: {{density: 0.7, weight: 0.6}}
  - model: org/c
    parameters: {{density: 0.5, weight: 0.4}}
{tail}"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny local models, the same served as hub repos, a module-wide hub and cache."""
    import huggingface_hub.constants as hfc

    root = tmp_path_factory.mktemp("realcfg")
    d = build_model_dirs(root / "m", "llama", names=("base", "a", "b"), layers=LAYERS, noise=0.02)
    tb, ta, tbb = (read_folder_f32(d[k]) for k in ("base", "a", "b"))
    c = root / "m" / "c"  # agrees with a (cos > 0): model_stock's t well inside (0, 1)
    shutil.copytree(d["a"], c)
    st_write(c / "model.safetensors", {k: (tb[k] + 0.8 * (ta[k] - tb[k]) + 0.4 * (tbb[k] - tb[k])).astype(np.float32)
                                       for k in tb})
    d["c"] = c
    d["y"] = _other_vocab_model(root / "vocab")
    d["lora"] = root / "lora"
    make_adapter(d["lora"], tb)
    server = HubServer(lifetime=600).start()
    server.add_folder("org/base", d["base"])
    server.add_folder("org/a", d["b"])  # main is something else: only @v1 gives a's weights
    server.add_folder("org/a", d["a"], revision="v1")
    for k in ("b", "c", "y", "lora"):
        server.add_folder(f"org/{k}", d[k])
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_ENDPOINT", server.url)
    mp.setenv("HF_HUB_CACHE", str(root / "hf" / "hub"))
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("TRANSFORMERS_OFFLINE", "0")
    mp.delenv("HF_TOKEN", raising=False)
    mp.setattr(hfc, "HF_HUB_OFFLINE", False)
    try:
        yield server, d, root
    finally:
        mp.undo()
        server.stop()


def local_text(text: str, d: dict) -> str:
    """The same config naming the local folders (what mergekit runs)."""
    for repo in ("org/base+org/lora",):
        text = text.replace(repo, f"{d['base']}+{d['lora']}")
    text = text.replace("org/a@v1", str(d["a"]))
    for k in ("base", "b", "c", "y"):
        text = text.replace(f"org/{k}", str(d[k]))
    assert "org/" not in text
    return text


def run_online_then_offline(server: HubServer, text: str, tmp_path: Path, monkeypatch) -> Path:
    """Runs `text` against the hub, then offline from the cache; asserts the outputs are
    byte-identical and that the offline run sent no request."""
    import huggingface_hub.constants as hfc

    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    online, off = tmp_path / "online", tmp_path / "offline"
    mf.run(cfg, out=online, random_seed=0)
    seen = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    mf.run(cfg, out=off, random_seed=0)
    assert len(server.requests) == seen, f"offline run sent requests: {server.requests[seen:]}"
    files = sorted(p.name for p in online.iterdir())
    assert files == sorted(p.name for p in off.iterdir())
    for f in files:
        # the model card names the output folder; everything else is byte for byte the same
        a, b = (online / f).read_bytes(), (off / f).read_bytes()
        if f == "README.md":
            a, b = a.replace(b"online", b"X"), b.replace(b"offline", b"X")
        assert a == b, f"{f} differs between the online and the offline run"
    return online


def run_mergekit(text: str, out: Path) -> None:
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(quiet=True, random_seed=0, lora_merge_cache=str(out) + "-lora"),
              config_source=text)


def compare(got_dir: Path, ref_dir: Path, how, base: dict, name: str, perm=None) -> str:
    """`perm`: for each of mergekit's token ids, ours (vocabulary-sized tensors are permuted)."""
    got, ref = read_folder_native(got_dir), read_folder_native(ref_dir)
    if perm is not None:
        got = {k: v[perm] if v.shape[0] == len(perm) and v.shape == ref[k].shape else v for k, v in got.items()}
    assert sorted(got) == sorted(ref), f"{name}: tensor names differ: {sorted(set(got) ^ set(ref))[:5]}"
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
    if how[0] == "ulp":
        worst = max(int(ulp_distance(got[k], ref[k]).max()) for k in ref)
        assert worst <= how[1], f"{name}: {worst} bf16 ulp from mergekit"
        return f"max {worst} bf16 ulp"
    # random masks differ (mergekit draws from torch's stream): the same share of kept
    # deltas, and merged deltas of the same size and mean, over all matrices together
    big = [k for k in ref if ref[k].size >= 1024]
    g = np.concatenate([got[k].astype(np.float32).ravel() - base[k].astype(np.float32).ravel() for k in big])
    r = np.concatenate([ref[k].astype(np.float32).ravel() - base[k].astype(np.float32).ravel() for k in big])
    bf = np.concatenate([np.abs(base[k].astype(np.float32).ravel()) for k in big])
    moved = lambda x: float(np.mean(np.abs(x) > bf * 2.0**-8 + 1e-12))  # more than a bf16 rounding  # noqa: E731
    fg, fr = moved(g), moved(r)
    ng, nr = float(np.linalg.norm(g)), float(np.linalg.norm(r))
    assert abs(fg - fr) <= 0.02, f"{name}: fraction of changed weights {fg:.4f} vs mergekit {fr:.4f}"
    assert abs(ng - nr) <= how[1] * nr, f"{name}: |Δ| {ng:.5g} vs mergekit {nr:.5g}"
    assert abs(g.mean() - r.mean()) <= how[1] * nr / np.sqrt(g.size) * 10, f"{name}: mean Δ {g.mean()} vs {r.mean()}"
    return f"changed {fg:.3f} vs {fr:.3f}, |Δ| {ng:.4g} vs {nr:.4g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_config_with_hub_ids(world, tmp_path, monkeypatch, name):
    if MERGEKIT_ERR is not None:
        pytest.skip(f"mergekit cannot be imported: {MERGEKIT_ERR}")
    server, d, _ = world
    body, how = CONFIGS[name]
    text = textwrap.dedent(body) + TAIL
    ours = run_online_then_offline(server, text, tmp_path, monkeypatch)
    card = (ours / "README.md").read_text()
    assert "org/a" in card or "org/b" in card  # the hub inputs, pinned, in the card
    ref = tmp_path / "mergekit"
    run_mergekit(local_text(text, d), ref)
    perm = None
    base = read_folder_native(d["a"] if name in ("slerp", "passthrough", "tokenizer_union") else d["base"])
    if name == "tokenizer_union":
        from transformers import AutoTokenizer

        vk = AutoTokenizer.from_pretrained(str(ref)).get_vocab()
        vf = AutoTokenizer.from_pretrained(str(ours)).get_vocab()
        # the same tokens (mergekit may number the added ones differently): embedding and
        # LM-head rows compared token by token
        assert set(vk) == set(vf), "union vocabularies differ from mergekit's"
        perm = [vf[t] for t, _ in sorted(vk.items(), key=lambda kv: kv[1])]
        assert sorted(vk.values()) == list(range(len(vk)))
        assert json.loads((ours / "config.json").read_text())["vocab_size"] == \
            json.loads((ref / "config.json").read_text())["vocab_size"]
    got_layers = json.loads((ours / "config.json").read_text())["num_hidden_layers"]
    assert got_layers == json.loads((ref / "config.json").read_text())["num_hidden_layers"]
    if name == "passthrough":
        assert got_layers == 6
    print(f"real config {name}: online == offline; vs mergekit: {compare(ours, ref, how, base, name, perm)}")


def test_multi_stage_file_with_hub_ids(world, tmp_path, monkeypatch):
    """Stage 2 names stage 1; mergekit runs the two stages one after the other."""
    if MERGEKIT_ERR is not None:
        pytest.skip(f"mergekit cannot be imported: {MERGEKIT_ERR}")
    server, d, _ = world
    text = MULTI.format(tail=TAIL)
    ours = run_online_then_offline(server, text, tmp_path, monkeypatch)
    # the final output pins every hub input, stage 1's included, with its commit
    pinned = {(h["repo_id"], h["revision"], h["commit"]) for h in recipe(ours)["hub_inputs"]}
    want = {("org/a", "v1"), ("org/b", "main"), ("org/base", "main"), ("org/c", "main")}
    assert pinned == {(r, v, server.repos[r].revisions[v].commit) for r, v in want}
    card = (ours / "README.md").read_text()
    assert server.repos["org/a"].revisions["v1"].commit in card and "stage1" in card
    first, second = (local_text(t, d) for t in text.split("---\n"))
    s1 = tmp_path / "mk_stage1"
    run_mergekit(first.replace("name: stage1\n", ""), s1)
    ref = tmp_path / "mergekit"
    run_mergekit(second.replace("model: stage1", f"model: {s1}"), ref)
    print(f"real config multi-stage: online == offline; vs mergekit: "
          f"{compare(ours, ref, ('ulp', 2), {}, 'multi-stage')}")


def test_multi_stage_resolves_every_stage_before_the_first_runs(world, tmp_path):
    """A missing repo in stage 2: ModelNotFound naming it, before stage 1 merges anything."""
    server, d, _ = world
    text = MULTI.format(tail=TAIL).replace("model: org/c", "model: org/missing")
    calls = []
    before = set(tmp_path.iterdir())
    with pytest.raises(mf.ModelNotFound, match="org/missing"):
        mf.run(text, out=tmp_path / "out", progress=lambda *a: calls.append(a))
    assert calls == [], "stage 1 ran before stage 2's references were resolved"
    assert set(tmp_path.iterdir()) == before, "something was written"


OVERRIDE = """
merge_method: linear
base_model:
  model: {a}
  override_architecture: MistralForCausalLM
models:
  - model: {{model: {a}, override_architecture: MistralForCausalLM}}
    parameters: {{weight: 0.6}}
  - model: {{model: {b}, override_architecture: MistralForCausalLM}}
    parameters: {{weight: 0.4}}
dtype: float32
"""


def test_override_architecture_as_mergekit(world, tmp_path):
    """mergekit's per-model `override_architecture`: the models are read as that
    architecture, and the written config.json names it (compared with mergekit's)."""
    if MERGEKIT_ERR is not None:
        pytest.skip(f"mergekit cannot be imported: {MERGEKIT_ERR}")
    _, d, _ = world
    text = OVERRIDE.format(a=d["a"], b=d["b"])
    ours, ref = tmp_path / "ours", tmp_path / "mergekit"
    mf.run(text, out=ours)
    run_mergekit(text, ref)
    got, want = (json.loads((p / "config.json").read_text()) for p in (ours, ref))
    assert got["architectures"] == want["architectures"] == ["MistralForCausalLM"]
    assert json.loads((d["a"] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    t_got, t_ref = read_folder_f32(ours), read_folder_f32(ref)
    assert sorted(t_got) == sorted(t_ref)
    for k in t_ref:
        np.testing.assert_allclose(t_got[k], t_ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Overriding only one model: the architectures differ, which our check (as mergekit's)
    # refuses without allow_crimes.
    one = text.replace("  - model: {model: %s, override_architecture: MistralForCausalLM}" % d["b"], f"  - model: {d['b']}")
    assert one != text
    with pytest.raises(mf.ConfigError, match="different architectures"):
        mf.run(one, out=tmp_path / "one")
    with pytest.raises(RuntimeError, match="mix different architectures"):
        run_mergekit(one, tmp_path / "mk_one")
    mf.run(one, out=tmp_path / "crimes", allow_crimes=True)
    assert json.loads((tmp_path / "crimes" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    with pytest.raises(mf.ConfigError, match="override_architecture"):
        mf.run(text.replace("override_architecture: MistralForCausalLM\nmodels", "override_architecture: 7\nmodels"),
               out=tmp_path / "bad")


def test_folder_functions_take_model_plus_adapter(world, tmp_path):
    """subspace_masks / align with ``org/base+org/lora``: read through a copy with the
    adapter merged in (W + α/r·B·A, checked with numpy), cached and reused."""
    from conftest import st_read

    _, d, root = world
    lora_cache = root / "hf" / "merge_fast" / "lora-cache"
    mf.subspace_masks("org/base+org/lora", "org/base", 2, tmp_path / "with_lora.safetensors")
    (merged,) = list(lora_cache.iterdir())
    base, ad, got = read_folder_f32(d["base"]), st_read(d["lora"] / "adapter_model.safetensors")[1], read_folder_f32(merged)
    assert sorted(got) == sorted(base)
    changed = 0
    for k, w in base.items():
        a = ad.get(f"base_model.model.{k[:-len('.weight')]}.lora_A.weight")
        ref = w if a is None else w.astype(np.float64) + 2.0 * (
            ad[f"base_model.model.{k[:-len('.weight')]}.lora_B.weight"].astype(np.float64) @ a)
        changed += a is not None
        np.testing.assert_allclose(got[k], ref, rtol=1e-6, atol=1e-6, err_msg=k)
    assert changed == 2 * LAYERS
    # the function read exactly that folder; a second call reuses it
    mf.subspace_masks(merged, "org/base", 2, tmp_path / "from_folder.safetensors")
    x, y = st_read(tmp_path / "with_lora.safetensors")[1], st_read(tmp_path / "from_folder.safetensors")[1]
    assert sorted(x) == sorted(y) and all(x[k].tobytes() == y[k].tobytes() for k in x)
    stamp = (merged / "config.json").stat().st_mtime_ns
    r1 = mf.align("org/base+org/lora", "org/base")
    r2 = mf.align(merged, "org/base")
    np.testing.assert_array_equal(r1.rotation, r2.rotation)
    assert list(lora_cache.iterdir()) == [merged] and (merged / "config.json").stat().st_mtime_ns == stamp


def test_mergekit_itself_reads_the_stand_in_hub(world, tmp_path):
    """mergekit honours HF_ENDPOINT too: the slerp config, hub ids unchanged, run by
    mergekit-yaml against the stand-in hub (its own cache) agrees with ours."""
    import os
    import subprocess
    import sys

    if MERGEKIT_ERR is not None:
        pytest.skip(f"mergekit cannot be imported: {MERGEKIT_ERR}")
    server, _, _ = world
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(textwrap.dedent(CONFIGS["slerp"][0]) + TAIL)
    mf.run(cfg, out=tmp_path / "ours")
    seen = len(server.downloads("org/a"))
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_CACHE=str(tmp_path / "mk_cache"), HF_HUB_OFFLINE="0",
               TRANSFORMERS_OFFLINE="0")
    p = subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", str(cfg), str(tmp_path / "mk")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "model.safetensors" in server.downloads("org/a")[seen:], "mergekit did not download from the stand-in"
    print("mergekit on the stand-in hub:", compare(tmp_path / "ours", tmp_path / "mk", ("ulp", 2), {}, "slerp"))
