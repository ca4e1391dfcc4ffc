"""Shared fixtures and helpers for the merge_fast test-suite.

Everything here is independent of merge_fast itself: the tiny models are built with
transformers (random init, no hub), the safetensors reader/writer is written from the
format spec (8-byte little-endian header length, JSON header, raw data), and the numpy
reference formulas live in the test modules.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

# Keep torch and the merge engine from fighting over the 2 cores, and keep HF offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent

BF16 = np.dtype(ml_dtypes.bfloat16)

# safetensors dtype strings -> numpy dtypes (what our independent reader understands)
ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": BF16,
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
COPIED_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES


# --------------------------------------------------------------------------------------
# raw safetensors writer / reader (independent of merge_fast and of the safetensors lib)
# --------------------------------------------------------------------------------------
def st_encode(header: dict | bytes | str, data: bytes = b"", length: int | None = None) -> bytes:
    """Raw safetensors bytes: 8-byte LE header length + header JSON + data.

    `header` may be a dict (dumped as JSON), or pre-encoded str/bytes (to write invalid JSON);
    `length` overrides the length prefix (to write a lying prefix)."""
    if isinstance(header, dict):
        hb = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        hb = header.encode()
    else:
        hb = bytes(header)
    n = len(hb) if length is None else length
    return struct.pack("<Q", n) + hb + data


def st_write(path, tensors: dict, metadata: dict | None = None, pad: bool = True) -> dict:
    """Write `tensors` (name -> numpy array, any dtype in ST_DTYPES) as a valid safetensors file.

    Returns the header dict that was written."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    chunks = []
    off = 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        b = arr.tobytes()
        header[name] = {
            "dtype": NP_TO_ST[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [off, off + len(b)],
        }
        chunks.append(b)
        off += len(b)
    hb = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        hb += b" " * ((8 - len(hb) % 8) % 8)
    Path(path).write_bytes(st_encode(hb, b"".join(chunks)))
    return header


def st_read_header(path) -> tuple[dict, int, bytes]:
    """(header dict, header length n, whole file bytes). Data starts at 8 + n."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return header, n, raw


def st_rewrite(path, header: dict | bytes | str, data: bytes | None = None, length: int | None = None):
    """Rewrite `path` with a new header (dict or raw bytes), keeping the old data by default."""
    _, n, raw = st_read_header(path)
    if data is None:
        data = raw[8 + n :]
    Path(path).write_bytes(st_encode(header, data, length=length))


def st_read(path) -> tuple[dict, dict]:
    """Independent reader: (metadata dict or None, name -> numpy array in the stored dtype).

    Validates what a loader would: offsets in bounds, contiguous, no holes, sizes match."""
    header, n, raw = st_read_header(path)
    data = raw[8 + n :]
    meta = header.pop("__metadata__", None)
    out = {}
    spans = []
    for name, info in header.items():
        dt = ST_DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        s, e = info["data_offsets"]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        assert e - s == numel * dt.itemsize, f"{path}:{name}: byte size {e - s} != {numel}*{dt.itemsize}"
        assert 0 <= s <= e <= len(data), f"{path}:{name}: offsets {s},{e} out of bounds ({len(data)})"
        spans.append((s, e, name))
        out[name] = np.frombuffer(data[s:e], dtype=dt).reshape(shape).copy()
    spans.sort()
    pos = 0
    for s, e, name in spans:
        assert s == pos, f"{path}:{name}: hole/overlap at {pos} (tensor starts at {s})"
        pos = e
    assert pos == len(data), f"{path}: trailing bytes after last tensor ({pos} != {len(data)})"
    return meta, out


def folder_shards(folder) -> list[Path]:
    """The safetensors files of a model folder, via the index when there is one."""
    folder = Path(folder)
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return [folder / f for f in sorted(set(wm.values()))]
    return sorted(folder.glob("*.safetensors"))


def read_folder_native(folder) -> dict:
    """name -> numpy array in the stored dtype (bf16 as ml_dtypes.bfloat16), independent reader."""
    out = {}
    for f in folder_shards(folder):
        _, t = st_read(f)
        for k, v in t.items():
            assert k not in out, f"tensor {k} present in two shards of {folder}"
            out[k] = v
    return out


def read_folder_f32(folder) -> dict:
    """name -> numpy float32 array, read through the official safetensors library (torch side,
    so bf16 works), i.e. the way a user's tooling would see the files."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in folder_shards(folder):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                assert k not in out
                out[k] = fh.get_tensor(k).to(torch.float32).numpy()
    return out


def tensor_nbytes(folder) -> int:
    return sum(a.nbytes for a in read_folder_native(folder).values())


def dir_snapshot(folder) -> dict:
    """relative path -> bytes, for every file below `folder`."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------
# numeric comparison helpers
# --------------------------------------------------------------------------------------
def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """Map floats to integers whose difference is the distance in ulps (sign-magnitude fix)."""
    bits_dt = {2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize]
    nbits = x.dtype.itemsize * 8
    b = x.view(bits_dt).astype(np.int64) if nbits < 64 else x.view(np.int64)
    sign = (b >> (nbits - 1)) & 1 if nbits < 64 else (b < 0)
    mag = b & ((1 << (nbits - 1)) - 1) if nbits < 64 else (b & 0x7FFFFFFFFFFFFFFF)
    return np.where(sign.astype(bool), -mag, mag)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.dtype == b.dtype
    return np.abs(_ordered_bits(np.ascontiguousarray(a)) - _ordered_bits(np.ascontiguousarray(b)))


def assert_matches_reference(got, ref64, scale, dtype, name="", rtol32=2e-6, max_ulps=1):
    """Check an engine output against a float64 reference of the formula.

    The engine computes in f32 and rounds once to `dtype`. An element passes when it is
    within `max_ulps` of (reference -> f32 -> dtype), or within the f32 compute error
    (`rtol32 * scale`, scale = sum of |coefficient * input| for that element) of the
    reference. For float32 outputs only the second criterion applies."""
    got = np.asarray(got)
    dtype = np.dtype(dtype)
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    ref64 = np.asarray(ref64, dtype=np.float64)
    assert got.shape == ref64.shape, f"{name}: shape {got.shape}, expected {ref64.shape}"
    g64 = got.astype(np.float64)
    assert np.all(np.isfinite(g64)), f"{name}: non-finite values in output"
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), ref64.shape)
    ok = np.abs(g64 - ref64) <= rtol32 * scale + 1e-30
    if dtype != np.float32:
        ref_rounded = ref64.astype(np.float32).astype(dtype)
        ok |= ulp_distance(got, ref_rounded) <= max_ulps
    if not ok.all():
        bad = np.flatnonzero(~ok.ravel())
        i = bad[0]
        raise AssertionError(
            f"{name}: {bad.size}/{ok.size} elements off; first at flat index {i}: "
            f"got {g64.ravel()[i]!r}, reference {ref64.ravel()[i]!r} "
            f"(scale {scale.ravel()[i]!r}, dtype {dtype})"
        )


# --------------------------------------------------------------------------------------
# numpy reference formulas (float64), shared by the array and folder tests
# --------------------------------------------------------------------------------------
def ref_slerp(a, b, t):
    """mergekit's slerp in float64, except where a tensor's norm is <= 1e-8: there the angle
    is undefined and merge_fast lerps (mergekit would take cos = 0 and shrink the other
    tensor by sin(tπ/2), a known defect). Returns a list of (result, scale) candidates: one,
    or two when the dot product is so close to the 0.9995 threshold that an f32 engine may
    legitimately take the other branch."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    va, vb = a64.ravel(), b64.ravel()
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    ua = va / na if na > 1e-8 else va
    ub = vb / nb if nb > 1e-8 else vb
    d = float(np.dot(ua, ub))

    def lerp():
        return (1 - t) * a64 + t * b64, abs(1 - t) * np.abs(a64) + abs(t) * np.abs(b64)

    def slerp():
        th = np.arccos(np.clip(d, -1.0, 1.0))
        s = np.sin(th)
        c0 = np.sin((1 - t) * th) / s
        c1 = np.sin(t * th) / s
        return c0 * a64 + c1 * b64, abs(c0) * np.abs(a64) + abs(c1) * np.abs(b64)

    if na <= 1e-8 or nb <= 1e-8:
        return [lerp()]
    if abs(abs(d) - 0.9995) < 2e-5:
        return [lerp(), slerp()]
    return [lerp()] if abs(d) > 0.9995 else [slerp()]


def ref_linear(xs, weights, normalize=True):
    xs64 = [np.asarray(x, dtype=np.float64) for x in xs]
    w = np.asarray(weights, dtype=np.float64)
    div = w.sum() if normalize else 1.0
    res = sum(wi * x for wi, x in zip(w, xs64)) / div
    scale = sum(abs(wi) * np.abs(x) for wi, x in zip(w, xs64)) / abs(div)
    return res, scale


def ref_task_arithmetic(base, xs, weights, lam=1.0):
    b64 = np.asarray(base, dtype=np.float64)
    res = b64 + lam * sum(w * (np.asarray(x, dtype=np.float64) - b64) for w, x in zip(weights, xs))
    scale = np.abs(b64) + abs(lam) * sum(
        abs(w) * (np.abs(np.asarray(x, dtype=np.float64)) + np.abs(b64)) for w, x in zip(weights, xs)
    )
    return res, scale


def assert_slerp_matches(got, a, b, t, dtype, name="", rtol32=1e-5, max_ulps=1):
    cands = ref_slerp(a, b, t)
    errs = []
    for ref, scale in cands:
        try:
            assert_matches_reference(got, ref, scale, dtype, name, rtol32=rtol32, max_ulps=max_ulps)
            return
        except AssertionError as e:  # try the other branch when near the threshold
            errs.append(str(e))
    raise AssertionError("slerp mismatch: " + " | ".join(errs))


# --------------------------------------------------------------------------------------
# tiny transformers models
# --------------------------------------------------------------------------------------
ARCHS = ("llama", "qwen2", "gpt_neox")


def tiny_config(arch: str, hidden=32, layers=2, vocab=128, inter=64, heads=4):
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=3,
    )
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=max(1, heads // 2), **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=max(1, heads // 2), **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common)
    if arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(num_key_value_heads=max(1, heads // 2), **common)
    if arch == "phi":
        from transformers import PhiConfig

        return PhiConfig(**common)
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=inter, vocab_size=vocab, n_positions=64,
                          bos_token_id=2, eos_token_id=1)
    raise ValueError(arch)


_TOKENIZER_DIR: Path | None = None


def _tokenizer_template(root: Path, vocab: int = 128) -> Path:
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is not None and _TOKENIZER_DIR.exists():
        return _TOKENIZER_DIR
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2", pad_token="t3"
    )
    d = root / "_tokenizer"
    fast.save_pretrained(str(d))
    _TOKENIZER_DIR = d
    return d


def build_model_dirs(
    root: Path,
    arch: str,
    dtype: str = "float32",
    sharded: bool = False,
    names=("base", "a", "b"),
    seed: int = 0,
    noise: float = 0.01,
    shard_size="20KB",
    **cfg_kw,
) -> dict:
    """Save a random-init tiny model ("base") and fine-tunes (base + seeded noise) as HF folders.

    Every parameter of the base gets a random offset as well, so no tensor is all zeros.
    Each folder's config.json carries a distinct "merge_fast_test_id" so tests can tell
    which input's config was copied. Returns name -> Path."""
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokdir = _tokenizer_template(root.parent if root.parent.exists() else root, cfg_kw.get("vocab", 128))
    cfg = tiny_config(arch, **cfg_kw)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out = {}
    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_config(cfg)
        model.load_state_dict(base_sd)
        if i > 0:
            gi = torch.Generator().manual_seed(seed * 1000 + 17 * i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gi) * noise)
        model = model.to(tdtype)
        model.config.merge_fast_test_id = f"{arch}-{dtype}-{name}"
        d = root / name
        kw = {"max_shard_size": shard_size} if sharded else {"max_shard_size": "100GB"}
        model.save_pretrained(str(d), **kw)
        for f in TOKENIZER_FILES:
            shutil.copy(tokdir / f, d / f)
        if sharded:
            assert (d / "model.safetensors.index.json").exists(), "fixture failed to shard"
        else:
            assert (d / "model.safetensors").exists()
        out[name] = d
    return out


@dataclass
class Family:
    arch: str
    dtype: str
    sharded: bool
    base: Path
    a: Path
    b: Path

    @property
    def dirs(self):
        return [self.base, self.a, self.b]


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def model_family(models_root):
    """Factory: model_family(arch, dtype="float32", sharded=False) -> Family (cached per session)."""
    cache: dict = {}

    def get(arch: str = "llama", dtype: str = "float32", sharded: bool = False, size: str = "tiny") -> Family:
        """size="tiny": hidden 32, every tensor <= 4096 elements (one engine chunk).
        size="medium": hidden 64, vocab 4096, intermediate 1100, so embeddings (262144 elements)
        and MLP matrices (70400) span several 65536-element engine chunks, incl. a ragged tail."""
        key = (arch, dtype, sharded, size)
        if key not in cache:
            root = models_root / f"{arch}_{dtype}_{'sharded' if sharded else 'single'}_{size}"
            if size == "tiny":
                d = build_model_dirs(root, arch, dtype, sharded)
            elif size == "medium":
                d = build_model_dirs(root, arch, dtype, sharded, shard_size="600KB",
                                     hidden=64, inter=1100, vocab=4096, layers=2, heads=4)
            else:
                raise ValueError(size)
            cache[key] = Family(arch, dtype, sharded, d["base"], d["a"], d["b"])
        return cache[key]

    return get


@pytest.fixture(scope="session")
def llama_f32(model_family) -> Family:
    return model_family("llama", "float32", False)


@pytest.fixture(scope="session")
def llama_f32_sharded(model_family) -> Family:
    return model_family("llama", "float32", True)


@pytest.fixture
def copy_family(tmp_path):
    """Copy a Family's folders into this test's tmp dir (so a test may corrupt them)."""

    def cp(fam: Family, prefix: str = "") -> Family:
        new = {}
        for name in ("base", "a", "b"):
            dst = tmp_path / f"{prefix}{name}"
            shutil.copytree(getattr(fam, name), dst)
            new[name] = dst
        return Family(fam.arch, fam.dtype, fam.sharded, new["base"], new["a"], new["b"])

    return cp


# --------------------------------------------------------------------------------------
# merge_fast import / CLI location
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mf():
    import merge_fast

    return merge_fast


def merge_fast_cli() -> list[str]:
    """argv prefix for the CLI: the installed `merge-fast` script next to this interpreter,
    else on PATH."""
    cand = Path(sys.executable).parent / "merge-fast"
    if cand.exists():
        return [str(cand)]
    w = shutil.which("merge-fast")
    if w:
        return [w]
    pytest.fail("merge-fast console script is not installed (maturin develop should install it)")


def run_py(code: str, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, **kw)


def leftovers(parent: Path, before: set) -> list:
    """Entries of `parent` that were not there before (temp dirs a failed merge left behind)."""
    return sorted(set(os.listdir(parent)) - set(before))
