"""In-memory API: merge_fast.slerp / linear / task_arithmetic on numpy (and torch) arrays,
checked against independent float64 numpy references of DESIGN.md section 3."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (
    BF16,
    assert_matches_reference,
    assert_slerp_matches,
    ref_linear,
    ref_slerp,
    ref_task_arithmetic,
)

RNG = np.random.default_rng(1234)


def rand(shape, dtype=np.float32, scale=1.0, rng=None):
    rng = rng or RNG
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


SHAPES = [(7,), (16, 9), (3, 4, 5), (257, 33)]


# ---------------------------------------------------------------- slerp
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_slerp_random_f32(mf, shape, t):
    a, b = rand(shape), rand(shape)
    got = mf.slerp(a, b, t=t)
    assert isinstance(got, np.ndarray)
    assert got.shape == shape
    assert_slerp_matches(got, a, b, t, np.float32, f"slerp t={t}")


def test_slerp_correlated_takes_slerp_branch(mf):
    # d around 0.9: the true slerp branch, clearly different from lerp
    a = rand((64, 32))
    b = (a + 0.5 * rand((64, 32))).astype(np.float32)
    (ref, _), = ref_slerp(a, b, 0.3)
    lerp = 0.7 * a.astype(np.float64) + 0.3 * b
    assert np.abs(ref - lerp).max() > 1e-3  # the test is meaningful
    got = mf.slerp(a, b, t=0.3)
    assert_slerp_matches(got, a, b, 0.3, np.float32, "correlated slerp")


def test_slerp_t0_is_first_t1_is_second(mf):
    a, b = rand((40, 8)), rand((40, 8))
    g0 = mf.slerp(a, b, t=0.0)
    g1 = mf.slerp(a, b, t=1.0)
    np.testing.assert_allclose(g0, a, rtol=1e-6, atol=1e-7, err_msg="t=0 must give the first (base)")
    np.testing.assert_allclose(g1, b, rtol=1e-6, atol=1e-7, err_msg="t=1 must give the second")


def test_slerp_colinear_lerps(mf):
    a = rand((50,))
    b = (2.0 * a).astype(np.float32)  # d = 1 -> lerp
    got = mf.slerp(a, b, t=0.25)
    ref = 0.75 * a.astype(np.float64) + 0.25 * b
    assert_matches_reference(got, ref, np.abs(a) * 2, np.float32, "colinear", rtol32=2e-6)


def test_slerp_opposite_lerps(mf):
    a = rand((50,))
    b = (-a).astype(np.float32)  # d = -1 -> |d| > 0.9995 -> lerp: (1-2t) a
    got = mf.slerp(a, b, t=0.3)
    ref = 0.4 * a.astype(np.float64)
    assert_matches_reference(got, ref, np.abs(a), np.float32, "opposite", rtol32=2e-6)
    assert np.all(np.isfinite(got))


def test_slerp_nearly_identical_lerps(mf):
    a = rand((100,))
    b = (a + 1e-4 * rand((100,))).astype(np.float32)
    got = mf.slerp(a, b, t=0.6)
    ref = 0.4 * a.astype(np.float64) + 0.6 * b
    assert_matches_reference(got, ref, np.abs(a) + np.abs(b), np.float32, "near-identical", rtol32=2e-6)


def test_slerp_zero_tensor(mf):
    # The angle to a zero tensor is undefined. mergekit leaves the zero copy unnormalized,
    # gets cos = 0, θ = π/2 and returns sin(tπ/2)·b, shrinking b (0.454·b at t=0.3). The
    # issue asks for the right thing instead: lerp, i.e. (1-t)·a + t·b.
    z = np.zeros((10, 3), np.float32)
    b = rand((10, 3))
    got = mf.slerp(z, b, t=0.3)
    ref = 0.3 * b.astype(np.float64)
    assert_matches_reference(got, ref, np.abs(b), np.float32, "zero first", rtol32=2e-6)
    got2 = mf.slerp(b, z, t=0.3)
    ref2 = 0.7 * b.astype(np.float64)
    assert_matches_reference(got2, ref2, np.abs(b), np.float32, "zero second", rtol32=2e-6)
    both = mf.slerp(z, z, t=0.5)
    assert np.all(both == 0) and np.all(np.isfinite(both))


def test_slerp_tiny_norm_lerps(mf):
    # norm 1e-9 <= 1e-8: numerically zero, so lerp as for an exact zero tensor.
    a = np.full((4,), 5e-10, np.float32)  # norm 1e-9
    b = rand((4,))
    got = mf.slerp(a, b, t=0.5)
    ref = 0.5 * a.astype(np.float64) + 0.5 * b.astype(np.float64)
    assert_matches_reference(got, ref, np.abs(b), np.float32, "tiny norm", rtol32=2e-6)
    assert_slerp_matches(got, a, b, 0.5, np.float32, "tiny norm")


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_half_dtypes_kept(mf, dtype, t):
    a, b = rand((64, 31), dtype), rand((64, 31), dtype)
    got = mf.slerp(a, b, t=t)
    assert got.dtype == np.dtype(dtype), f"dtype not kept: {got.dtype}"
    assert_slerp_matches(got, a, b, t, dtype, f"slerp {np.dtype(dtype)}")


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_slerp_half_correlated(mf, dtype):
    a = rand((128, 16), dtype)
    b = (a.astype(np.float32) + 0.3 * rand((128, 16))).astype(dtype)
    got = mf.slerp(a, b, t=0.7)
    assert_slerp_matches(got, a, b, 0.7, dtype, "half correlated")


def test_slerp_non_contiguous(mf):
    base_a, base_b = rand((20, 30)), rand((30, 20))
    a = base_a[:, ::2]          # strided
    b = base_b.T[:, ::2]        # transposed + strided
    assert not a.flags.c_contiguous and not b.flags.c_contiguous
    got = mf.slerp(a, b, t=0.4)
    assert got.shape == a.shape
    assert_slerp_matches(got, np.ascontiguousarray(a), np.ascontiguousarray(b), 0.4, np.float32, "non-contig")


def test_slerp_does_not_modify_inputs(mf):
    a, b = rand((33,)), rand((33,))
    a0, b0 = a.copy(), b.copy()
    mf.slerp(a, b, t=0.5)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


def test_slerp_shape_mismatch(mf):
    with pytest.raises(mf.TensorMismatch):
        mf.slerp(rand((4, 5)), rand((5, 4)), t=0.5)
    with pytest.raises(mf.TensorMismatch):
        mf.slerp(rand((20,)), rand((4, 5)), t=0.5)


def test_slerp_dtype_mismatch_is_merge_error_or_works(mf):
    a = rand((8,))
    b = rand((8,), np.float16)
    try:
        got = mf.slerp(a, b, t=0.5)
    except mf.MergeError:
        return
    assert got.dtype == np.float32  # first input's dtype
    assert_slerp_matches(got, a, b.astype(np.float32), 0.5, np.float32, "mixed dtype")


# ---------------------------------------------------------------- linear
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_normalized(mf, shape):
    xs = [rand(shape) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    got = mf.linear(xs, weights=w, normalize=True)
    ref, scale = ref_linear(xs, w, True)
    assert_matches_reference(got, ref, scale, np.float32, "linear")


def test_linear_normalize_divides_by_weight_sum(mf):
    xs = [rand((30,)) for _ in range(2)]
    w = [1.0, 3.0]
    got = mf.linear(xs, weights=w, normalize=True)
    ref, scale = ref_linear(xs, w, True)
    assert_matches_reference(got, ref, scale, np.float32, "linear normalize")
    got_raw = mf.linear(xs, weights=w, normalize=False)
    ref_raw, scale_raw = ref_linear(xs, w, False)
    assert_matches_reference(got_raw, ref_raw, scale_raw, np.float32, "linear no-normalize")


def test_linear_default_normalizes(mf):
    xs = [rand((30,)) for _ in range(2)]
    got = mf.linear(xs, weights=[2.0, 2.0])
    ref, scale = ref_linear(xs, [2.0, 2.0], True)
    assert_matches_reference(got, ref, scale, np.float32, "linear default normalize")


def test_linear_negative_weights(mf):
    xs = [rand((30,)) for _ in range(3)]
    w = [1.5, -0.25, 0.75]
    got = mf.linear(xs, weights=w, normalize=False)
    ref, scale = ref_linear(xs, w, False)
    assert_matches_reference(got, ref, scale, np.float32, "linear negative")


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_linear_half_dtypes(mf, dtype):
    xs = [rand((40, 7), dtype) for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    got = mf.linear(xs, weights=w, normalize=True)
    ref, scale = ref_linear(xs, w, True)
    assert_matches_reference(got, ref, scale, dtype, "linear half")


def test_linear_single_model_identity(mf):
    x = rand((11, 3))
    got = mf.linear([x], weights=[0.7], normalize=True)
    np.testing.assert_allclose(got, x, rtol=1e-6)


def test_linear_non_contiguous(mf):
    base = rand((3, 10, 12))
    xs = [base[i, ::2, 1::3] for i in range(3)]
    got = mf.linear(xs, weights=[1.0, 2.0, 3.0])
    ref, scale = ref_linear([np.ascontiguousarray(x) for x in xs], [1.0, 2.0, 3.0], True)
    assert_matches_reference(got, ref, scale, np.float32, "linear non-contig")


def test_linear_weights_length_mismatch(mf):
    xs = [rand((5,)) for _ in range(3)]
    with pytest.raises(mf.ConfigError):
        mf.linear(xs, weights=[0.5, 0.5])
    with pytest.raises(mf.ConfigError):
        mf.linear(xs, weights=[0.25, 0.25, 0.25, 0.25])


def test_linear_shape_mismatch(mf):
    with pytest.raises(mf.TensorMismatch):
        mf.linear([rand((5,)), rand((6,))], weights=[0.5, 0.5])


def test_linear_zero_weight_sum_normalized_is_error(mf):
    # Σw = 0 with normalize=True would divide by zero: must be a MergeError (DESIGN §4: a NaN
    # produced by a merge is an exception), never inf/NaN output
    xs = [rand((5,)) for _ in range(2)]
    with pytest.raises(mf.MergeError):
        mf.linear(xs, weights=[1.0, -1.0], normalize=True)


# ---------------------------------------------------------------- task arithmetic
@pytest.mark.parametrize("lam", [1.0, 0.5, 2.0])
def test_task_arithmetic(mf, lam):
    base = rand((25, 13))
    xs = [(base + 0.1 * rand((25, 13))).astype(np.float32) for _ in range(2)]
    w = [1.0, 0.5]
    got = mf.task_arithmetic(base, xs, weights=w, lam=lam)
    ref, scale = ref_task_arithmetic(base, xs, w, lam)
    assert_matches_reference(got, ref, scale, np.float32, "task arithmetic")


def test_task_arithmetic_zero_weights_gives_base(mf):
    base = rand((9,))
    xs = [rand((9,)), rand((9,))]
    got = mf.task_arithmetic(base, xs, weights=[0.0, 0.0], lam=1.0)
    np.testing.assert_array_equal(got, base)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["f16", "bf16"])
def test_task_arithmetic_half(mf, dtype):
    base = rand((32, 8), dtype)
    xs = [(base.astype(np.float32) + 0.05 * rand((32, 8))).astype(dtype) for _ in range(2)]
    got = mf.task_arithmetic(base, xs, weights=[0.7, 0.6], lam=1.5)
    ref, scale = ref_task_arithmetic(base, xs, [0.7, 0.6], 1.5)
    assert_matches_reference(got, ref, scale, dtype, "task arithmetic half")


def test_task_arithmetic_mismatch(mf):
    base = rand((4, 4))
    with pytest.raises(mf.ConfigError):
        mf.task_arithmetic(base, [rand((4, 4)), rand((4, 4))], weights=[1.0])
    with pytest.raises(mf.TensorMismatch):
        mf.task_arithmetic(base, [rand((4, 4)), rand((4, 5))], weights=[1.0, 1.0])


# ---------------------------------------------------------------- exception hierarchy
def test_exception_hierarchy(mf):
    assert issubclass(mf.MergeError, Exception)
    for cls in (mf.InvalidCheckpoint, mf.TensorMismatch, mf.ConfigError):
        assert issubclass(cls, mf.MergeError), cls


# ---------------------------------------------------------------- torch tensors in / out
def test_torch_in_torch_out(mf):
    torch = pytest.importorskip("torch", reason="torch not installed")
    a = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    b = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    got = mf.slerp(a, b, t=0.3)
    assert isinstance(got, torch.Tensor), type(got)
    assert got.dtype == torch.float32 and tuple(got.shape) == (12, 5)
    assert_slerp_matches(got.numpy(), a.numpy(), b.numpy(), 0.3, np.float32, "torch slerp")

    lin = mf.linear([a, b], weights=[0.25, 0.75])
    assert isinstance(lin, torch.Tensor)
    ref, scale = ref_linear([a.numpy(), b.numpy()], [0.25, 0.75])
    assert_matches_reference(lin.numpy(), ref, scale, np.float32, "torch linear")

    ta = mf.task_arithmetic(a, [b], weights=[0.5], lam=1.0)
    assert isinstance(ta, torch.Tensor)
    ref, scale = ref_task_arithmetic(a.numpy(), [b.numpy()], [0.5], 1.0)
    assert_matches_reference(ta.numpy(), ref, scale, np.float32, "torch task arithmetic")


def test_torch_bf16_kept(mf):
    torch = pytest.importorskip("torch", reason="torch not installed")
    a = torch.randn(40, 6, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    b = torch.randn(40, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    got = mf.slerp(a, b, t=0.6)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
    to_np = lambda x: x.view(torch.int16).numpy().view(BF16)  # noqa: E731
    assert_slerp_matches(to_np(got), to_np(a), to_np(b), 0.6, BF16, "torch bf16 slerp")


def test_torch_non_contiguous(mf):
    torch = pytest.importorskip("torch", reason="torch not installed")
    a = torch.randn(10, 8, generator=torch.Generator().manual_seed(4)).t()
    b = torch.randn(16, 10, generator=torch.Generator().manual_seed(5))[::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    got = mf.slerp(a, b, t=0.5)
    assert_slerp_matches(got.numpy(), a.contiguous().numpy(), b.contiguous().numpy(), 0.5, np.float32, "torch nc")


# ---------------------------------------------------------------- several engine chunks
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_large_arrays_multi_chunk(mf, dtype):
    """1.3M elements: many 65536-element engine chunks plus a ragged tail; slerp's dot and
    norms are folded across chunks."""
    rng = np.random.default_rng(99)
    shape = (1300, 1001)
    a = rand(shape, dtype, rng=rng)
    b = (a.astype(np.float32) + 0.7 * rand(shape, rng=rng)).astype(dtype)
    got = mf.slerp(a, b, t=0.35)
    assert got.dtype == np.dtype(dtype)
    assert_slerp_matches(got, a, b, 0.35, dtype, "large slerp")
    lin = mf.linear([a, b, a], weights=[0.5, 0.3, 0.2])
    ref, scale = ref_linear([a, b, a], [0.5, 0.3, 0.2])
    assert_matches_reference(lin, ref, scale, dtype, "large linear")


def test_array_non_finite_parameters(mf):
    a, b = rand((5,)), rand((5,))
    with pytest.raises(mf.ConfigError):
        mf.slerp(a, b, t=float("nan"))
    with pytest.raises(mf.ConfigError):
        mf.linear([a, b], weights=[float("inf"), 1.0])
    with pytest.raises(mf.ConfigError):
        mf.task_arithmetic(a, [b], weights=[1.0], lam=float("nan"))
