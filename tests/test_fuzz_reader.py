"""Fuzzing the checkpoint reader: random bytes, mutated headers, mutated index.json.

Every attempt must either merge (and then write a valid folder) or raise MergeError (and then
write nothing). Any other exception, a panic (pyo3 PanicException) or a crash fails.
The same loop also runs once in a subprocess, so a segfault/abort fails a test instead of
killing pytest. Run directly: python tests/test_fuzz_reader.py [iterations] [seed]."""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import build_model_dirs, st_read  # noqa: E402

DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "F8_E5M2", "F13", "", "f32", "C64"]
BIG = [0, 1, -1, 2, 7, 8, 31, 32, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]


# ------------------------------------------------------------------------ core
def make_seeds(root: Path) -> dict:
    """Tiny valid models: single-file a/b, sharded sa/sb."""
    kw = dict(hidden=8, inter=16, layers=1, vocab=16, heads=2)
    single = build_model_dirs(root / "single", "llama", "float32", False, names=("a", "b"), **kw)
    sharded = build_model_dirs(root / "sharded", "llama", "bfloat16", True, names=("a", "b"),
                               shard_size="1KB", **kw)
    return {"a": single["a"], "b": single["b"], "sa": sharded["a"], "sb": sharded["b"]}


def attempt(mf, victim_src: Path, other: Path, mutate_file: str, content: bytes) -> str:
    """Copy `victim_src`, replace `mutate_file` with `content`, merge with `other`.

    Returns "ok" or "error"; raises AssertionError on anything that is not allowed."""
    work = Path(tempfile.mkdtemp(prefix="mf_fuzz_"))
    try:
        victim = work / "victim"
        shutil.copytree(victim_src, victim)
        (victim / mutate_file).write_bytes(content)
        out = work / "out"
        try:
            mf.slerp(str(victim), str(other), t=0.3, out=str(out))
        except BaseException as e:  # noqa: BLE001 - we classify everything
            if not isinstance(e, mf.MergeError):
                raise AssertionError(
                    f"non-MergeError {type(e).__module__}.{type(e).__name__}: {e!r} "
                    f"for {mutate_file} content {content[:200]!r}"
                ) from e
            assert str(e), "empty error message"
            assert not out.exists(), f"failed merge left an output folder ({e})"
            leftover = sorted(set(os.listdir(work)) - {"victim"})
            assert not leftover, f"failed merge left {leftover}"
            return "error"
        assert out.is_dir()
        shards = list(out.glob("*.safetensors"))
        assert shards, "merge succeeded but wrote no safetensors"
        for f in shards:
            st_read(f)  # a successful merge must produce valid files
        return "ok"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mutate_bytes(raw: bytes, ops: list, header_only: bool = True) -> bytes:
    """Apply (kind, pos, val) ops: flip / set / truncate / insert / delete / prefix."""
    b = bytearray(raw)
    (n,) = struct.unpack("<Q", raw[:8]) if len(raw) >= 8 else (len(raw),)
    span = max(1, min(len(b), 8 + n) if header_only else len(b))
    for kind, pos, val in ops:
        if not b:
            break
        p = pos % min(span, len(b))
        if kind == "flip":
            b[p] ^= 1 << (val % 8)
        elif kind == "set":
            b[p] = val % 256
        elif kind == "truncate":
            del b[p:]
        elif kind == "insert":
            b[p:p] = bytes([val % 256]) * (1 + val % 5)
        elif kind == "delete":
            del b[p : p + 1 + val % 4]
        elif kind == "prefix":
            if len(b) >= 8:
                b[:8] = struct.pack("<Q", val % 2**64)
    return bytes(b)


def mutate_header(raw: bytes, rnd_choice) -> bytes:
    """Structured mutation: change one field of one tensor entry to a random value."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    name, field, value = rnd_choice
    name = names[name % len(names)]
    if field == "dtype":
        header[name]["dtype"] = value if isinstance(value, str) else DTYPES[value % len(DTYPES)]
    elif field == "shape":
        header[name]["shape"] = value
    elif field == "offsets":
        header[name]["data_offsets"] = value
    elif field == "drop":
        del header[name]
    elif field == "rename":
        header[str(value)] = header.pop(name)
    elif field == "metadata":
        header["__metadata__"] = value
    elif field == "entry":
        header[name] = value
    hb = json.dumps(header).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def mutate_index(raw: bytes, rnd_choice) -> bytes:
    idx = json.loads(raw)
    names = sorted(idx["weight_map"])
    name, field, value = rnd_choice
    name = names[name % len(names)]
    if field == "file":
        idx["weight_map"][name] = value
    elif field == "drop":
        del idx["weight_map"][name]
    elif field == "add":
        idx["weight_map"][str(value)] = idx["weight_map"][name]
    elif field == "total":
        idx.setdefault("metadata", {})["total_size"] = value
    elif field == "map":
        idx["weight_map"] = value
    return json.dumps(idx).encode()


# ------------------------------------------------------------------------ plain random loop
def random_loop(mf, seeds: dict, iterations: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts = {"ok": 0, "error": 0}
    single = (seeds["a"] / "model.safetensors").read_bytes()
    shard_names = sorted(p.name for p in seeds["sa"].glob("*.safetensors"))
    idx_raw = (seeds["sa"] / "model.safetensors.index.json").read_bytes()
    kinds = ["flip", "set", "truncate", "insert", "delete", "prefix"]
    junk = [None, 0, -1, 2**70, "x", [], {}, [1, 2], [-3], ["a"], [0, 2**64], [5, 1], 1.5, True]
    for _ in range(iterations):
        r = rng.random()
        if r < 0.15:
            content = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
            res = attempt(mf, seeds["a"], seeds["b"], "model.safetensors", content)
        elif r < 0.5:
            ops = [(rng.choice(kinds), rng.randrange(10**6), rng.choice(BIG + [rng.randrange(256)]))
                   for _ in range(rng.randrange(1, 4))]
            res = attempt(mf, seeds["a"], seeds["b"], "model.safetensors", mutate_bytes(single, ops))
        elif r < 0.75:
            field = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "metadata", "entry"])
            value = {
                "dtype": rng.choice(DTYPES),
                "shape": [rng.choice(BIG + [rng.randrange(64)]) for _ in range(rng.randrange(0, 4))],
                "offsets": [rng.choice(BIG + [rng.randrange(4096)]) for _ in range(rng.choice([0, 1, 2, 2, 2, 3]))],
                "drop": None,
                "rename": rng.choice(["", "__metadata__", "x" * 300, "model.norm.weight"]),
                "metadata": rng.choice(junk + [{"format": 5}, {"a": "b"}]),
                "entry": rng.choice(junk),
            }[field]
            shard = rng.choice(shard_names)
            raw = (seeds["sa"] / shard).read_bytes()
            res = attempt(mf, seeds["sa"], seeds["sb"], shard, mutate_header(raw, (rng.randrange(100), field, value)))
        else:
            if rng.random() < 0.5:
                ops = [(rng.choice(kinds), rng.randrange(10**6), rng.randrange(256)) for _ in range(rng.randrange(1, 4))]
                content = mutate_bytes(idx_raw, ops, header_only=False)
            else:
                field = rng.choice(["file", "drop", "add", "total", "map"])
                value = rng.choice(junk + shard_names + ["../a/model.safetensors", "/etc/passwd", "", "nope.safetensors"])
                content = mutate_index(idx_raw, (rng.randrange(100), field, value))
            res = attempt(mf, seeds["sa"], seeds["sb"], "model.safetensors.index.json", content)
        counts[res] += 1
    return counts


# ------------------------------------------------------------------------ pytest side
try:
    import pytest
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # running as a plain script without pytest/hypothesis
    pytest = None

if pytest is not None:
    FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

    @pytest.fixture(scope="module")
    def seeds(tmp_path_factory):
        return make_seeds(tmp_path_factory.mktemp("fuzzseeds"))

    def test_seed_models_merge(mf, seeds):
        """Control: unmutated seeds merge (otherwise the fuzzing would be vacuous)."""
        assert attempt(mf, seeds["a"], seeds["b"], "config.json", (seeds["a"] / "config.json").read_bytes()) == "ok"
        idx = (seeds["sa"] / "model.safetensors.index.json").read_bytes()
        assert attempt(mf, seeds["sa"], seeds["sb"], "model.safetensors.index.json", idx) == "ok"

    @FUZZ
    @given(content=st.binary(max_size=400))
    def test_random_bytes(mf, seeds, content):
        attempt(mf, seeds["a"], seeds["b"], "model.safetensors", content)

    @FUZZ
    @given(content=st.binary(min_size=8, max_size=64).map(lambda b: b[:8] + b"{" + b[8:]))
    def test_random_bytes_with_small_prefix(mf, seeds, content):
        content = struct.pack("<Q", len(content) - 8) + content[8:]
        attempt(mf, seeds["a"], seeds["b"], "model.safetensors", content)

    OPS = st.lists(
        st.tuples(
            st.sampled_from(["flip", "set", "truncate", "insert", "delete", "prefix"]),
            st.integers(0, 10**6),
            st.one_of(st.integers(0, 255), st.sampled_from(BIG)),
        ),
        min_size=1,
        max_size=4,
    )

    @FUZZ
    @given(ops=OPS)
    def test_header_byte_mutations(mf, seeds, ops):
        raw = (seeds["a"] / "model.safetensors").read_bytes()
        attempt(mf, seeds["a"], seeds["b"], "model.safetensors", mutate_bytes(raw, ops))

    JSONISH = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=6,
    )
    FIELD = st.one_of(
        st.tuples(st.integers(0, 99), st.just("dtype"), st.one_of(st.sampled_from(DTYPES), st.text(max_size=6))),
        st.tuples(st.integers(0, 99), st.just("shape"),
                  st.one_of(st.lists(st.one_of(st.integers(-5, 70), st.sampled_from(BIG)), max_size=4), JSONISH)),
        st.tuples(st.integers(0, 99), st.just("offsets"),
                  st.one_of(st.lists(st.one_of(st.integers(-5, 5000), st.sampled_from(BIG)), max_size=3), JSONISH)),
        st.tuples(st.integers(0, 99), st.just("drop"), st.none()),
        st.tuples(st.integers(0, 99), st.just("rename"), st.text(max_size=10)),
        st.tuples(st.integers(0, 99), st.just("metadata"), JSONISH),
        st.tuples(st.integers(0, 99), st.just("entry"), JSONISH),
    )

    @FUZZ
    @given(choice=FIELD, shard=st.integers(0, 99))
    def test_header_field_mutations(mf, seeds, choice, shard):
        shards = sorted(p.name for p in seeds["sa"].glob("*.safetensors"))
        name = shards[shard % len(shards)]
        raw = (seeds["sa"] / name).read_bytes()
        attempt(mf, seeds["sa"], seeds["sb"], name, mutate_header(raw, choice))

    @FUZZ
    @given(choice=st.one_of(
        st.tuples(st.integers(0, 99), st.just("file"),
                  st.one_of(JSONISH, st.sampled_from(["", "../a/model.safetensors", "/etc/passwd", "x.safetensors",
                                                      "model-00001-of-00009.safetensors"]))),
        st.tuples(st.integers(0, 99), st.just("drop"), st.none()),
        st.tuples(st.integers(0, 99), st.just("add"), st.text(max_size=10)),
        st.tuples(st.integers(0, 99), st.just("total"), JSONISH),
        st.tuples(st.integers(0, 99), st.just("map"), JSONISH),
    ))
    def test_index_mutations(mf, seeds, choice):
        raw = (seeds["sa"] / "model.safetensors.index.json").read_bytes()
        attempt(mf, seeds["sa"], seeds["sb"], "model.safetensors.index.json", mutate_index(raw, choice))

    @FUZZ
    @given(ops=OPS)
    def test_index_byte_mutations(mf, seeds, ops):
        raw = (seeds["sa"] / "model.safetensors.index.json").read_bytes()
        attempt(mf, seeds["sa"], seeds["sb"], "model.safetensors.index.json",
                mutate_bytes(raw, [(k, p, v % 256) for k, p, v in ops], header_only=False))

    def test_fuzz_loop_in_subprocess(tmp_path):
        """The plain random loop in a child process: a segfault/abort shows up as a bad exit code."""
        import subprocess

        r = subprocess.run([sys.executable, __file__, "400", "7", str(tmp_path)],
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, (
            f"fuzz child exited with {r.returncode} (negative = killed by signal)\n"
            f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
        )
        assert "FUZZ-OK" in r.stdout, r.stdout[-2000:]


if __name__ == "__main__":
    import merge_fast

    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    root = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(tempfile.mkdtemp(prefix="mf_fuzz_seeds_"))
    seeds_ = make_seeds(root)
    counts = random_loop(merge_fast, seeds_, iters, seed)
    print("FUZZ-OK", counts, flush=True)
