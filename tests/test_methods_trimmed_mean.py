"""trimmed_mean against numpy: per element, sort the models' values, drop ⌊trim·N⌋ at each
end (at most (N−1)/2), average the rest."""
import numpy as np
import pytest

import merge_fast as mf


@pytest.mark.parametrize("n, trim", [(5, 0.2), (5, 0.5), (4, 0.5), (3, 0.0), (6, 0.34)])
def test_trimmed_mean_matches_numpy(n, trim):
    rng = np.random.default_rng(n)
    xs = [rng.standard_normal((70, 1000)).astype(np.float32) for _ in range(n)]  # > one chunk
    xs[0][3, 7] = 1e4  # an outlier that the trim removes
    got = mf.merge("trimmed_mean", xs, params={"trim": trim})
    k = min(int(np.floor(trim * n)), (n - 1) // 2)
    ref = np.sort(np.stack(xs).astype(np.float64), axis=0)[k : n - k].mean(axis=0)
    np.testing.assert_allclose(got, ref.astype(np.float32), rtol=1e-6, atol=1e-7)
    if trim == 0.5:
        np.testing.assert_allclose(got, np.median(np.stack(xs), axis=0), rtol=1e-6)
    with pytest.raises(mf.ConfigError, match="'trim' must be in \\[0, 0.5\\]"):
        mf.merge("trimmed_mean", xs, params={"trim": 0.6})
