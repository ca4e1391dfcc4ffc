"""Issue 14, recipes 2 and 4: run examples/borg_merge.py and examples/qed.py in quick mode
and check what they claim against the files they wrote (independent numpy / transformers
checks, not the scripts' own printouts)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def read_all(d: Path) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ----------------------------------------------------------------------------- borg-merge
@pytest.fixture(scope="module")
def borg(tmp_path_factory):
    out = tmp_path_factory.mktemp("borg")
    return out, run_example("borg_merge.py", out)


def test_borg_pool_round_trips_bit_exact(borg):
    from merge_fast.arch import canonicalize, decanonicalize, read_config

    out, s = borg
    models = sorted(p for p in (out / "models").iterdir())
    assert {p.name for p in models} == {"anchor_qwen2", "llama", "gpt_neox", "phi", "granite", "t5", "llama_relative"}
    fams = set()
    for p in models:
        t, cfg = read_all(p), read_config(p)
        canon = canonicalize(t, cfg)
        fams.add(canon.family.name)
        back = decanonicalize(canon, cfg)
        assert sorted(back) == sorted(t) and all(back[k].tobytes() == t[k].tobytes() for k in t), p.name
    assert fams == {"qwen2", "llama", "gpt_neox", "phi", "granite", "t5_gated"}
    assert all(v["bit_exact"] for v in s["round_trip"].values())


def test_borg_card_settings_and_determinism(borg):
    out, s = borg
    assert s["card"] == {"beta": 0.6, "attn_rank": 3, "mlp_rank": 3, "attn_tol": 0.05, "mlp_tol": 0.2}
    assert "EncDecAttention" in s["t5_refusal"] and "cross_attention='skip'" in s["t5_refusal"]
    files = sorted(p.name for p in (out / "merged_run1").iterdir())
    assert "model.safetensors" in files and "config.json" in files
    for f in files:  # run twice: byte-identical
        assert (out / "merged_run1" / f).read_bytes() == (out / "merged_run2" / f).read_bytes(), f
    meta = json.loads((out / "merged_run1" / "config.json").read_text())
    assert meta["model_type"] == "qwen2"
    A, M = read_all(out / "models" / "anchor_qwen2"), read_all(out / "merged_run1")
    assert sorted(A) == sorted(M)  # written under the anchor's names
    assert not np.array_equal(A["model.layers.1.self_attn.q_proj.weight"], M["model.layers.1.self_attn.q_proj.weight"])
    assert np.array_equal(A["model.norm.weight"], M["model.norm.weight"])  # norms: the anchor's
    # the absorbed delta of an attention matrix has rank <= 3 per donor, 6 donors -> <= 18 < 32
    d = M["model.layers.0.self_attn.o_proj.weight"].astype(np.float64) - A["model.layers.0.self_attn.o_proj.weight"]
    assert np.linalg.matrix_rank(d, tol=1e-4 * np.abs(d).max()) <= 18


def test_borg_rmax0_is_the_anchor(borg):
    out, s = borg
    A, R = read_all(out / "models" / "anchor_qwen2"), read_all(out / "rmax0")
    assert sorted(A) == sorted(R)
    for k in A:
        assert A[k].dtype == R[k].dtype and A[k].tobytes() == R[k].tobytes(), k
    assert s["rmax0_bit_exact"] is True


def test_borg_per_tensor_vs_residual(borg):
    out, s = borg
    dist = s["aligned_distance"]
    # one residual-stream rotation (gains folded) recovers a relative living in another basis ...
    assert dist["llama_relative"]["residual"] < 0.05 < dist["llama_relative"]["per_tensor"]
    # ... while per-tensor rotations land each unrelated donor's tensors closer to the anchor's
    for name in ("llama", "gpt_neox", "phi", "granite", "t5"):
        assert dist[name]["per_tensor"] < dist[name]["residual"], name
    # recompute one distance from the written files
    A = read_all(out / "models" / "anchor_qwen2")
    mats = [k for k in A if A[k].ndim == 2 and ("self_attn" in k or ".mlp." in k)]
    P = read_all(out / "aligned_per_tensor_phi")
    d = np.sqrt(sum(np.sum((P[k].astype(np.float64) - A[k]) ** 2) for k in mats) /
                sum(np.sum(A[k].astype(np.float64) ** 2) for k in mats))
    assert d == pytest.approx(dist["phi"]["per_tensor"], rel=1e-6)
    for mode in ("residual", "per_tensor"):
        m = s["merged"][mode]
        assert m["finite"] and m["param_distance"] > 0 and m["logits_rel_change"] > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out / "merged_per_tensor")).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"


# ----------------------------------------------------------------------------- QED-75M
@pytest.fixture(scope="module")
def qed(tmp_path_factory):
    out = tmp_path_factory.mktemp("qed")
    return out, run_example("qed.py", out)


def test_qed_same_arch_merge_through_config(qed):
    out, s = qed
    m = out / "models"
    B, A, D = read_all(m / "qed_base"), read_all(m / "qed_count"), read_all(m / "qed_down")
    assert "lm_head.bias" in B and "lm_head.weight" not in B  # tied head with a bias
    got = read_all(out / "qed_merged")
    assert sorted(got) == sorted(B)
    for k in B:  # task_arithmetic, weights 1: base + (A - base) + (D - base)
        ref = B[k].astype(np.float64) + (A[k] - B[k].astype(np.float64)) + (D[k] - B[k].astype(np.float64))
        np.testing.assert_allclose(got[k], ref, atol=1e-6, err_msg=k)
    assert {"configuration_qed.py", "modeling_qed.py"} <= {p.name for p in (out / "qed_merged").iterdir()}
    assert json.loads((out / "qed_merged" / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_qed.QEDForCausalLM"
    sa = s["same_arch"]
    assert sa["finite"] and sa["loaded_class"] == "QEDForCausalLM"
    L = sa["losses"]  # the merge keeps most of both fine-tunes' gains over the base
    assert L["merged"]["count"] < L["base"]["count"] and L["merged"]["down"] < L["base"]["down"]


def test_qed_mapping_round_trip_and_layout(qed):
    import merge_fast.arch as arch

    out, s = qed
    fam = arch.load_mapping(arch.EXAMPLES_DIR / "qed.yaml")
    for name, tied in (("qed_base", True), ("qed_untied", False)):
        p = out / "models" / name
        t, cfg = read_all(p), arch.read_config(p)
        canon = arch.canonicalize(t, cfg, fam)
        assert ("lm_head.weight" in canon) is (not tied) and "lm_head.bias" in canon
        assert canon["layers.1.attn.q.weight"].shape == (cfg["d_model"], cfg["d_model"])
        assert canon["layers.0.mlp.gate.weight"].shape == (cfg["ffn_hidden_dim"], cfg["d_model"])
        arch.check_complete(canon, cfg, fam)
        back = arch.decanonicalize(canon, cfg, fam.bind("model."), source_family="qed")
        assert sorted(back) == sorted(t) and all(back[k].tobytes() == t[k].tobytes() for k in t), name
        assert s["round_trip"][name.split("_")[1]]["bit_exact"]


def test_qed_cross_family_both_ways(qed):
    out, s = qed
    a, b = s["qed_donor_onto_llama"], s["llama_donor_onto_qed"]
    # the donors are the anchors' functions in another basis and layout: alignment gives them back
    assert a["relative_logit_gap"] < 1e-4 and a["aligned_logit_gap"] < 1e-4 and a["rotation_error"] < 1e-4
    assert b["relative_logit_gap"] < 1e-4 and b["aligned_logit_gap"] < 1e-4 and b["rotation_error"] < 1e-4
    assert b["filled_from_anchor"] == ["lm_head.bias"]  # Llama has no head bias: QED's own is kept
    L, Q = read_all(out / "models" / "llama_anchor"), read_all(out / "qed_onto_llama")
    assert sorted(L) == sorted(Q)
    for k in L:
        np.testing.assert_allclose(Q[k], L[k], atol=5e-5, err_msg=k)
    assert "lm_head.weight" not in read_all(out / "llama_onto_qed")  # written under QED's (tied) names
    for k, v in s["absorb"].items():
        assert v["finite"] and v["absorbed"] > 0, k
    assert s["absorb"]["qed_into_llama"]["class"] == "LlamaForCausalLM"
    assert s["absorb"]["llama_into_qed"]["class"] == "QEDForCausalLM"
