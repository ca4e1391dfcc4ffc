"""Every config of mergekit's ``examples/`` folder (tests/data/mergekit_examples, copies of
the upstream files) through ``merge-fast run``, with the hub model names swapped for tiny
local models of the same family (Llama-2 13B fine-tunes -> 20-layer tiny llamas with the
layer ranges halved, Mistral-7B -> tiny mistral, phi-2 -> tiny phi, gpt2 -> 12-layer tiny
gpt2). mergekit 0.1.5 runs the same rewritten config on the same models:

- where both run, the outputs agree within 2 bf16 ulp (every method here is deterministic);
- where merge_fast refuses, mergekit must refuse too (and the reverse).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import merge_fast as mf

from conftest import REPO_ROOT, build_model_dirs, read_folder_f32

EXAMPLES = REPO_ROOT / "tests" / "data" / "mergekit_examples"

# What each example gives (both tools agree on it; asserted below).
EXPECT = {
    "arcee_fusion.yml": "runs",
    "bio-merge.yml": "runs",
    "gradient-slerp.yml": "runs",
    "linear.yml": "runs",
    "mega.yml": "runs",  # two stages, the second uses the first
    "orcamini-platy-44layer.yml": "runs",
    "ties.yml": "runs",
    "gpt2-small.yml": "runs",
    "gradient-slerp-pattern.yml": "runs",  # `pattern:` is ignored, as mergekit does (warning)
    "zipit.yml": "runs",  # top-level `align_weights` ignored (warning)
    "chipalign.yml": "refused: weight",  # nuslerp needs a weight per model
    "mega-out_path.yml": "refused: no name",  # two unnamed documents
    "ties-ranked.yml": "refused: ranked_ties",
    "lrp.yml": "refused: lrp",
    "core_space.yml": "refused: core_space",
    "cabs.yml": "refused: cabs",
    "cabs-sources.yml": "refused: cabs",
    "whisper-encoder-decoder-test.yml": "refused: encoder_decoder_weighted",
    "whisper-encoder-decoder-weighted.yml": "refused: encoder_decoder_weighted",
    "evo_bert_large.yml": "refused: merge_method",
    "metrics-1.yml": "refused: merge_method",
    "metrics-llama-1v2.yml": "refused: merge_method",
    "metrics-llama-codev2.yml": "refused: merge_method",
    "metrics-small.yml": "refused: merge_method",
    "linear_small.yml": "refused: merge_method",
    "whisper-merge-multilingual.yml": "refused: base_model",  # slerp without a base
    "whisper-lora-multilingual.yml": "refused: listed twice",  # `lora:` beside `model:` is ignored by both
}

LLAMA = ("TheBloke/Llama-2-13B-fp16", "psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B",
         "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardMath-13B-V1.0")
MISTRAL = ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B")
PHI = ("microsoft/phi-2", "abacaj/phi-2-super", "rhysjones/phi-2-orange-v2", "mobiuslabsgmbh/aanaphi2-v0.1")
# Names of other examples, onto models of the same family above (for the refused ones
# the family does not matter: they are refused before any tensor is read).
ALIASES = {
    "instruction_model_path": LLAMA[1], "chip_model_path": LLAMA[2],
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": LLAMA[0], "huggyllama/llama-7b": LLAMA[0],
    "TheBloke/Llama-2-7B-fp16": LLAMA[1], "meta-llama/CodeLlama-7b-Python-hf": LLAMA[1],
    "meta-llama/Llama-2-7b-hf": LLAMA[0], "BEE-spoke-data/smol_llama-220M-GQA": LLAMA[0],
    "BEE-spoke-data/smol_llama-220M-openhermes": LLAMA[1], "openai/whisper-large-v2": LLAMA[0],
    "user/whisper-french": LLAMA[1], "user/whisper-specialized": LLAMA[1],
    "user/whisper-specialized-french": LLAMA[1], "user/whisper-french-lora": LLAMA[2],
    "user/whisper-german-lora": LLAMA[3], "Nelci/bertimbau_hate_speech": LLAMA[1],
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """hub name -> tiny local folder."""
    root = tmp_path_factory.mktemp("mk_examples")
    out = {}
    # stored as the hub checkpoints are (Llama-2 13B and Mistral 7B in float16, gpt2 in float32)
    groups = [("llama", LLAMA, dict(layers=20, hidden=16, inter=32, heads=2, dtype="float16")),
              ("mistral", MISTRAL, dict(layers=2, dtype="float16")), ("phi", PHI, dict(layers=2)),
              ("gpt2", ("gpt2",), dict(layers=12)),
              # arcee_fusion.yml's generic names, stored in its dtype (bfloat16)
              ("llama", ("model_a", "model_b"), dict(layers=4, dtype="bfloat16", seed=3))]
    for i, (arch, names, kw) in enumerate(groups):
        dirs = build_model_dirs(root / f"{arch}{i}", arch, names=tuple(f"m{i}" for i in range(len(names))), noise=0.02, **kw)
        out.update({n: dirs[f"m{i}"] for i, n in enumerate(names)})
    out.update({k: out[v] for k, v in ALIASES.items()})
    return out


def rewrite(text: str, hub: dict) -> str:
    """Model names -> local folders; llama layer ranges halved (40-layer 13B -> 20 tiny layers)."""
    for name in sorted(hub, key=len, reverse=True):
        text = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])", str(hub[name]), text)
    return re.sub(r"layer_range: \[(\d+), (\d+)\]",
                  lambda m: f"layer_range: [{int(m[1]) // 2}, {int(m[2]) // 2}]" if "gpt2" not in text else m[0], text)


def run_mergekit(text: str, out: Path) -> None:
    """mergekit-yaml, or mergekit-multi's stages (by hand, in dependency order) for a
    multi-document file; raises what mergekit raises."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = MergeOptions(quiet=True, random_seed=0)
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if len(docs) == 1:
        run_merge(MergeConfiguration.model_validate(docs[0]), str(out), options=opts, config_source=text)
        return
    from mergekit.scripts.multimerge import load_config

    inter = out.parent / "mk_intermediate"
    configs, deps = load_config(text, str(inter))
    done: set = set()
    while len(done) < len(configs):
        for name, cfg in configs.items():
            if name not in done and deps[name] <= done:
                run_merge(cfg, str(out if name is None or not (set(configs) - done - {name}) else inter / name), options=opts)
                done.add(name)


def bf16_ulps(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """|got − ref| in bf16 ulps of the larger of the two, where values below 2^-8 of the
    tensor's largest count as that (mergekit computes in the config's 16-bit dtype, whose
    absolute rounding error follows the inputs' scale, not a cancelled result's)."""
    floor = float(np.abs(ref).max()) * 2.0**-8
    mag = np.maximum(np.maximum(np.abs(ref), np.abs(got)).astype(np.float64), max(floor, 1e-30))
    return np.abs(got.astype(np.float64) - ref) / np.exp2(np.floor(np.log2(mag)) - 7)


# Methods that select elements by a threshold (top-k): computed in 16 bits by mergekit
# and in f32/f64 here, an element at the boundary can land on the other side.
THRESHOLD = {"ties", "arcee_fusion"}
# arcee_fusion's quantile threshold over importance scores computed in bfloat16 (mergekit,
# `dtype: bfloat16`) and float64 (here) moves ~10% of the selection; mergekit computing in
# float32 (output still bfloat16) is the reference: the difference is only its precision.
MK_FULL_PRECISION = {"arcee_fusion.yml"}


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_mergekit_example(hub, tmp_path, name):
    text = rewrite((EXAMPLES / name).read_text(), hub)
    cfg = tmp_path / name
    cfg.write_text(text)
    ours_err = mk_err = None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mf.MergeWarning)
        try:
            mf.run(cfg, out=tmp_path / "mf")
        except mf.ConfigError as e:
            ours_err = str(e)
    mk_text = text
    if name in MK_FULL_PRECISION:
        mk_text = text.replace("dtype: bfloat16", "dtype: float32\nout_dtype: bfloat16")
    try:
        run_mergekit(mk_text, tmp_path / "mk")
    except Exception as e:  # noqa: BLE001 - any refusal of mergekit's
        mk_err = f"{type(e).__name__}: {e}"
    want = EXPECT[name]
    print(f"{name}: merge_fast {'refused: ' + ours_err.splitlines()[0] if ours_err else 'ran'}; "
          f"mergekit {'refused: ' + mk_err.splitlines()[0][:200] if mk_err else 'ran'}")
    if want == "runs":
        assert ours_err is None, ours_err
        assert mk_err is None, mk_err
    else:
        assert ours_err is not None and want.removeprefix("refused: ") in ours_err, ours_err
        assert mk_err is not None, "mergekit runs a config merge_fast refuses"
        assert not (tmp_path / "mf").exists()
        return
    ref, got = read_folder_f32(tmp_path / "mk"), read_folder_f32(tmp_path / "mf")
    assert sorted(got) == sorted(ref)
    method = re.findall(r"^merge_method: (\w+)", text, re.M)[-1]

    worst, off, total = 0.0, 0, 0
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        err = bf16_ulps(got[k], ref[k])
        off += int((err > 2).sum())
        total += err.size
        worst = max(worst, float(err.max()))
    print(f"{name}: {len(ref)} tensors, {off} of {total} elements beyond 2 bf16 ulp, worst {worst:.3f}")
    if method in THRESHOLD:
        assert off <= 0.01 * total, f"{name}: {off} of {total} elements differ"
    else:
        assert worst <= 2.0, f"{name}: {worst} bf16 ulp"
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    mf_cfg = json.loads((tmp_path / "mf" / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "torch_dtype"):
        assert mf_cfg.get(key) == mk_cfg.get(key), key
    shutil.rmtree(tmp_path / "mk")
