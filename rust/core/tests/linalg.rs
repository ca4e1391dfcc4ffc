//! Integration tests for the linear-algebra module: exact and randomized SVD, Procrustes,
//! batches, determinism. References are computed independently in f64 (one-sided Jacobi
//! eigenvalues of XᵀX, matrices built from known factors).
use merge_fast_core as core_crate;

// One module so that `cargo test linalg` selects these tests by name.
mod linalg {
    use super::core_crate;

    use core_crate::linalg::{
        gaussian_matrix, orthonormalize, procrustes, procrustes_batch, svd, svd_batch, svd_topk, svd_topk_batch, MatRef, DEFAULT_OVERSAMPLE,
        DEFAULT_POWER_ITERS,
    };
    use core_crate::Error;

    // ---- helpers ---------------------------------------------------------------------------

    fn random(m: usize, n: usize, seed: u64) -> Vec<f32> {
        let g = gaussian_matrix(m, n, seed);
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = g[(i, j)];
            }
        }
        out
    }

    /// `m x k` row-major with orthonormal columns.
    fn random_orthonormal(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let q = orthonormalize(gaussian_matrix(m, k, seed).as_ref(), faer::Par::Seq);
        let mut out = vec![0.0; m * k];
        for i in 0..m {
            for j in 0..k {
                out[i * k + j] = q[(i, j)];
            }
        }
        out
    }

    /// Row-major matmul in f64: (m x k) (k x n).
    fn mm(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let aip = a[i * k + p] as f64;
                for j in 0..n {
                    c[i * n + j] += aip * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    fn transpose(a: &[f32], m: usize, n: usize) -> Vec<f32> {
        let mut t = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                t[j * m + i] = a[i * n + j];
            }
        }
        t
    }

    /// `U diag(s) Vᵀ` with U `m x r`, V `n x r` (row-major).
    fn compose(u: &[f32], s: &[f32], v: &[f32], m: usize, n: usize) -> Vec<f32> {
        let r = s.len();
        let mut us = u.to_vec();
        for i in 0..m {
            for j in 0..r {
                us[i * r + j] *= s[j];
            }
        }
        mm(&us, &transpose(v, n, r), m, r, n).iter().map(|&x| x as f32).collect()
    }

    fn frob(a: &[f32]) -> f64 {
        a.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// max |QᵀQ - I| for a row-major `m x k` Q.
    fn orth_err_cols(q: &[f32], m: usize, k: usize) -> f64 {
        let g = mm(&transpose(q, m, k), q, k, m, k);
        let eye: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
        max_abs_diff(&g, &eye)
    }

    /// max |Q Qᵀ - I| for a row-major `k x n` Q.
    fn orth_err_rows(q: &[f32], k: usize, n: usize) -> f64 {
        orth_err_cols(&transpose(q, k, n), n, k)
    }

    fn rel_recon_err(x: &[f32], d: &core_crate::linalg::Svd) -> f64 {
        let rec = d.reconstruct();
        let diff: Vec<f32> = x.iter().zip(&rec).map(|(a, b)| a - b).collect();
        frob(&diff) / frob(x).max(1e-30)
    }

    /// Singular values by cyclic Jacobi on the f64 Gram matrix XᵀX (descending).
    fn jacobi_singular_values(x: &[f32], m: usize, n: usize) -> Vec<f64> {
        let mut a = mm(&transpose(x, m, n), x, n, m, n);
        for _sweep in 0..100 {
            let off: f64 = (0..n).flat_map(|i| (0..n).map(move |j| (i, j))).filter(|(i, j)| i != j).map(|(i, j)| a[i * n + j].powi(2)).sum();
            if off < 1e-26 {
                break;
            }
            for p in 0..n {
                for q in p + 1..n {
                    let apq = a[p * n + q];
                    if apq.abs() < 1e-300 {
                        continue;
                    }
                    let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let s = t * c;
                    for k in 0..n {
                        let akp = a[k * n + p];
                        let akq = a[k * n + q];
                        a[k * n + p] = c * akp - s * akq;
                        a[k * n + q] = s * akp + c * akq;
                    }
                    for k in 0..n {
                        let apk = a[p * n + k];
                        let aqk = a[q * n + k];
                        a[p * n + k] = c * apk - s * aqk;
                        a[q * n + k] = s * apk + c * aqk;
                    }
                }
            }
        }
        let mut ev: Vec<f64> = (0..n).map(|i| a[i * n + i].max(0.0).sqrt()).collect();
        ev.sort_by(|a, b| b.partial_cmp(a).unwrap());
        ev.truncate(m.min(n));
        ev
    }

    /// `m x n` matrix with the given singular values and random orthonormal factors.
    fn with_spectrum(m: usize, n: usize, s: &[f32], seed: u64) -> Vec<f32> {
        let r = s.len();
        let u = random_orthonormal(m, r, seed);
        let v = random_orthonormal(n, r, seed + 1);
        compose(&u, s, &v, m, n)
    }

    // ---- exact SVD ---------------------------------------------------------------------------

    #[test]
    fn svd_reconstructs_and_is_orthonormal() {
        for &(m, n) in &[(50, 30), (30, 50), (64, 64), (1, 7), (7, 1), (200, 3), (129, 257)] {
            let x = random(m, n, (m * 1000 + n) as u64);
            let d = svd(&x, m, n).unwrap();
            let r = m.min(n);
            assert_eq!((d.u.len(), d.s.len(), d.vt.len()), (m * r, r, r * n));
            assert!(rel_recon_err(&x, &d) < 1e-5, "{m}x{n}: recon {}", rel_recon_err(&x, &d));
            assert!(orth_err_cols(&d.u, m, r) < 2e-5, "{m}x{n}: U");
            assert!(orth_err_rows(&d.vt, r, n) < 2e-5, "{m}x{n}: Vt");
            assert!(d.s.windows(2).all(|w| w[0] >= w[1]), "descending");
            assert!(d.s.iter().all(|&v| v >= 0.0));
        }
    }

    #[test]
    fn svd_matches_jacobi_reference() {
        for &(m, n) in &[(20, 12), (12, 20), (33, 33)] {
            let x = random(m, n, 7 + m as u64);
            let d = svd(&x, m, n).unwrap();
            let reference = jacobi_singular_values(&x, m, n);
            let smax = reference[0];
            for (got, want) in d.s.iter().zip(&reference) {
                // Relative where the value is well conditioned (s >= 1e-2 s_max).
                let tol = 1e-4 * want.max(1e-2 * smax);
                assert!((*got as f64 - want).abs() <= tol, "{m}x{n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn svd_recovers_constructed_spectrum() {
        let s: Vec<f32> = (0..40).map(|i| 10.0 * 0.85f32.powi(i)).collect();
        for &(m, n) in &[(120, 40), (40, 120), (40, 40)] {
            let x = with_spectrum(m, n, &s, 99);
            let d = svd(&x, m, n).unwrap();
            for (got, want) in d.s.iter().zip(&s) {
                assert!(((got - want) / want).abs() < 1e-4, "{m}x{n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn svd_rank_deficient() {
        let (m, n, rank) = (60, 45, 3);
        let x = with_spectrum(m, n, &[5.0, 3.0, 1.0], 3);
        let d = svd(&x, m, n).unwrap();
        let r = m.min(n);
        assert!(rel_recon_err(&x, &d) < 1e-5);
        assert!(d.s[rank - 1] > 0.9);
        assert!(d.s[rank..].iter().all(|&v| v < 1e-5), "{:?}", &d.s[rank..rank + 3]);
        // The null-space singular vectors are still an orthonormal completion.
        assert!(orth_err_cols(&d.u, m, r) < 2e-5);
        assert!(orth_err_rows(&d.vt, r, n) < 2e-5);
    }

    #[test]
    fn svd_zero_and_empty() {
        let d = svd(&[0.0; 12], 3, 4).unwrap();
        assert_eq!(d.s, vec![0.0; 3]);
        assert!(orth_err_cols(&d.u, 3, 3) < 1e-6);
        assert!(orth_err_rows(&d.vt, 3, 4) < 1e-6);
        let e = svd(&[], 0, 5).unwrap();
        assert_eq!((e.rank(), e.m, e.n), (0, 0, 5));
    }

    #[test]
    fn svd_rejects_bad_input() {
        assert!(matches!(svd(&[1.0; 5], 2, 3), Err(Error::TensorMismatch { .. })));
        assert!(matches!(svd(&[1.0, f32::NAN, 0.0, 1.0], 2, 2), Err(Error::Numerical { .. })));
        assert!(matches!(svd_topk(&[1.0; 4], 2, 2, 0, 10, 2, 0), Err(Error::Config(_))));
        assert!(matches!(procrustes(&[1.0; 6], &[1.0; 4], 3, 2, 2), Err(Error::TensorMismatch { .. })));
        assert!(matches!(procrustes(&[1.0; 6], &[f32::INFINITY; 6], 3, 2, 2), Err(Error::Numerical { .. })));
    }

    #[test]
    fn truncate_keeps_leading_components() {
        let (m, n) = (30, 20);
        let x = random(m, n, 5);
        let full = svd(&x, m, n).unwrap();
        let mut t = full.clone();
        t.truncate(4);
        assert_eq!(t.s, full.s[..4]);
        for i in 0..m {
            assert_eq!(t.u[i * 4..i * 4 + 4], full.u[i * 20..i * 20 + 4]);
        }
        assert_eq!(t.vt, full.vt[..4 * n]);
    }

    // ---- randomized top-k --------------------------------------------------------------------

    #[test]
    fn topk_energy_matches_exact_on_decaying_spectrum() {
        let (m, n) = (400, 300);
        let s: Vec<f32> = (0..300).map(|i| 0.9f32.powi(i)).collect();
        let x = with_spectrum(m, n, &s, 11);
        let exact = svd(&x, m, n).unwrap();
        let total: f64 = exact.s.iter().map(|&v| (v as f64).powi(2)).sum();
        for k in [5, 10, 20] {
            let t = svd_topk(&x, m, n, k, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, 42).unwrap();
            assert!(!t.exact);
            assert_eq!(t.svd.rank(), k);
            let want: f64 = exact.s[..k].iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / total;
            assert!((t.energy - want).abs() < 1e-3, "k={k}: {} vs {want}", t.energy);
            for (a, b) in t.svd.s.iter().zip(&exact.s) {
                assert!(((a - b) / b).abs() < 1e-3, "k={k}: {a} vs {b}");
            }
            assert!(orth_err_cols(&t.svd.u, m, k) < 2e-5);
            assert!(orth_err_rows(&t.svd.vt, k, n) < 2e-5);
            // Leading singular vectors agree with the exact ones (same sign convention).
            for j in 0..3 {
                let dot: f64 = (0..n).map(|c| (t.svd.vt[j * n + c] * exact.vt[j * n + c]) as f64).sum();
                assert!(dot > 0.999, "k={k} component {j}: {dot}");
            }
        }
    }

    #[test]
    fn topk_wide_and_low_rank() {
        // Exactly rank 8 and wide: the randomized range finder captures all of it.
        let (m, n) = (90, 500);
        let s: Vec<f32> = (0..8).map(|i| 8.0 - i as f32).collect();
        let x = with_spectrum(m, n, &s, 21);
        let t = svd_topk(&x, m, n, 8, 10, 1, 1).unwrap();
        assert!(!t.exact);
        assert!((t.energy - 1.0).abs() < 1e-5);
        assert!(rel_recon_err(&x, &t.svd) < 1e-5);
    }

    #[test]
    fn topk_falls_back_to_exact() {
        let (m, n) = (40, 30);
        let x = random(m, n, 8);
        let t = svd_topk(&x, m, n, 10, 10, 2, 0).unwrap();
        assert!(t.exact);
        let mut e = svd(&x, m, n).unwrap();
        e.truncate(10);
        assert_eq!(t.svd, e);
        // k above min(m, n) is capped.
        let all = svd_topk(&x, m, n, 1000, 10, 2, 0).unwrap();
        assert_eq!(all.svd.rank(), 30);
        assert!((all.energy - 1.0).abs() < 1e-6);
    }

    #[test]
    fn topk_zero_matrix() {
        let t = svd_topk(&vec![0.0; 200 * 100], 200, 100, 5, 10, 2, 0).unwrap();
        assert_eq!(t.svd.s, vec![0.0; 5]);
        assert_eq!(t.energy, 1.0);
    }

    #[test]
    fn gaussian_generator_looks_gaussian() {
        let g = gaussian_matrix(1000, 100, 3);
        let v: Vec<f64> = g.col_iter().flat_map(|c| c.iter().map(|&x| x as f64).collect::<Vec<_>>()).collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "{mean} {var}");
        assert_ne!(gaussian_matrix(10, 3, 1), gaussian_matrix(10, 3, 2));
        // Entry (i, j) does not depend on the matrix shape beyond its linear index.
        assert_eq!(gaussian_matrix(10, 3, 5)[(4, 1)], gaussian_matrix(10, 4, 5)[(4, 1)]);
    }

    // ---- Procrustes ------------------------------------------------------------------------

    #[test]
    fn procrustes_recovers_rotation() {
        let (m, k) = (200, 24);
        let a = random(m, k, 1);
        let q = random_orthonormal(k, k, 2); // k x k orthogonal
                                             // B = A Qᵀ, so A = B Q exactly.
        let b: Vec<f32> = mm(&a, &transpose(&q, k, k), m, k, k).iter().map(|&x| x as f32).collect();
        let r = procrustes(&a, &b, m, k, k).unwrap();
        let err = max_abs_diff(&r.iter().map(|&x| x as f64).collect::<Vec<_>>(), &q.iter().map(|&x| x as f64).collect::<Vec<_>>());
        assert!(err < 1e-5, "{err}");
        assert!(orth_err_cols(&r, k, k) < 1e-5);
    }

    #[test]
    fn procrustes_semi_orthogonal_both_ways() {
        let m = 150;
        for &(ka, kb) in &[(16, 40), (40, 16)] {
            // B with orthonormal columns and A = B R0 make Bᵀ A = R0, so R = R0.
            let b = random_orthonormal(m, kb, 10 + ka as u64);
            let r0 = if kb >= ka { random_orthonormal(kb, ka, 20) } else { transpose(&random_orthonormal(ka, kb, 20), ka, kb) };
            let a: Vec<f32> = mm(&b, &r0, m, kb, ka).iter().map(|&x| x as f32).collect();
            let r = procrustes(&a, &b, m, ka, kb).unwrap();
            assert_eq!(r.len(), kb * ka);
            if kb >= ka {
                assert!(orth_err_cols(&r, kb, ka) < 1e-5);
            } else {
                assert!(orth_err_rows(&r, kb, ka) < 1e-5);
            }
            let err = r.iter().zip(&r0).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5, "ka={ka} kb={kb}: {err}");
        }
    }

    #[test]
    fn procrustes_is_optimal_against_perturbations() {
        let (m, k) = (80, 6);
        let a = random(m, k, 30);
        let b = random(m, k, 31);
        let r = procrustes(&a, &b, m, k, k).unwrap();
        let loss = |r: &[f32]| {
            let br = mm(&b, r, m, k, k);
            a.iter().zip(&br).map(|(&x, y)| (x as f64 - y).powi(2)).sum::<f64>()
        };
        let best = loss(&r);
        // Any other orthogonal matrix (here: R times random small rotations) does no better.
        for s in 0..20 {
            let g = random(k, k, 100 + s);
            let skew: Vec<f32> = (0..k * k).map(|i| 0.05 * (g[i] - g[(i % k) * k + i / k])).collect();
            // Cayley-like orthogonal perturbation via QR of I + skew.
            let p: Vec<f32> = (0..k * k).map(|i| skew[i] + if i / k == i % k { 1.0 } else { 0.0 }).collect();
            let pq = orthonormalize(faer::MatRef::from_row_major_slice(&p, k, k), faer::Par::Seq);
            let pq: Vec<f32> = (0..k * k).map(|i| pq[(i / k, i % k)]).collect();
            let r2: Vec<f32> = mm(&r, &pq, k, k, k).iter().map(|&x| x as f32).collect();
            assert!(loss(&r2) >= best - 1e-4, "{} < {best}", loss(&r2));
        }
    }

    #[test]
    fn procrustes_rank_deficient_still_orthogonal() {
        let (m, k) = (50, 10);
        // A of rank 2: Bᵀ A has rank <= 2, R is not unique but must stay orthogonal.
        let a = with_spectrum(m, k, &[3.0, 1.0], 40);
        let b = random(m, k, 41);
        let r = procrustes(&a, &b, m, k, k).unwrap();
        assert!(orth_err_cols(&r, k, k) < 1e-5);
        // Degenerate extreme: A = 0.
        let r = procrustes(&vec![0.0; m * k], &b, m, k, k).unwrap();
        assert!(orth_err_cols(&r, k, k) < 1e-5);
        let r = procrustes(&vec![0.0; m * 4], &b, m, 4, k).unwrap();
        assert!(orth_err_cols(&r, k, 4) < 1e-5);
    }

    // ---- batches and determinism ---------------------------------------------------------------

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    #[test]
    fn batches_equal_single_calls_and_are_thread_count_independent() {
        let shapes = [(64, 48), (48, 64), (300, 200), (10, 10), (257, 129)];
        let data: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(i, &(m, n))| random(m, n, i as u64)).collect();
        let mats: Vec<MatRef> = data.iter().zip(&shapes).map(|(d, &(m, n))| MatRef::new(d, m, n).unwrap()).collect();

        let s1 = in_pool(1, || svd_batch(&mats).unwrap());
        let s2 = in_pool(2, || svd_batch(&mats).unwrap());
        let s3 = in_pool(3, || svd_batch(&mats).unwrap());
        assert_eq!(s1, s2);
        assert_eq!(s1, s3);
        for (one, mat) in s1.iter().zip(&mats) {
            assert_eq!(*one, svd(mat.data, mat.rows, mat.cols).unwrap());
        }

        let t1 = in_pool(1, || svd_topk_batch(&mats, 4, 10, 2, 9).unwrap());
        let t2 = in_pool(2, || svd_topk_batch(&mats, 4, 10, 2, 9).unwrap());
        assert_eq!(t1, t2);
        assert!(t1.iter().any(|t| !t.exact));
        for (one, mat) in t1.iter().zip(&mats) {
            assert_eq!(*one, svd_topk(mat.data, mat.rows, mat.cols, 4, 10, 2, 9).unwrap());
        }

        let pairs: Vec<(MatRef, MatRef)> = vec![(mats[0], mats[0]), (mats[2], mats[2]), (mats[3], mats[3])];
        let p1 = in_pool(1, || procrustes_batch(&pairs).unwrap());
        let p2 = in_pool(2, || procrustes_batch(&pairs).unwrap());
        assert_eq!(p1, p2);
        // Procrustes of A onto itself is the identity.
        let k = 200;
        let eye_err = p1[1].iter().enumerate().map(|(i, &x)| (x - if i / k == i % k { 1.0 } else { 0.0 }).abs()).fold(0.0f32, f32::max);
        assert!(eye_err < 1e-4, "{eye_err}");
    }

    #[test]
    fn topk_same_seed_same_bits_different_seed_differs() {
        let (m, n) = (300, 250);
        let x = random(m, n, 77);
        let a = svd_topk(&x, m, n, 8, 10, 2, 123).unwrap();
        let b = svd_topk(&x, m, n, 8, 10, 2, 123).unwrap();
        let bits = |t: &core_crate::linalg::TopkSvd| t.svd.u.iter().chain(&t.svd.s).chain(&t.svd.vt).map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        let c = svd_topk(&x, m, n, 8, 10, 2, 124).unwrap();
        assert_ne!(bits(&a), bits(&c));
    }

    #[test]
    fn batch_errors_are_reported_in_order() {
        let good = vec![1.0f32; 4];
        let bad = vec![f32::NAN; 4];
        let mats = [MatRef::new(&good, 2, 2).unwrap(), MatRef::new(&bad, 2, 2).unwrap(), MatRef::new(&bad, 1, 4).unwrap()];
        assert!(matches!(svd_batch(&mats), Err(Error::Numerical { .. })));
        assert!(MatRef::new(&good, 3, 2).is_err());
        let pairs = [(mats[0], MatRef::new(&good, 1, 4).unwrap())];
        assert!(matches!(procrustes_batch(&pairs), Err(Error::TensorMismatch { .. })));
    }

    // ---- timings (run by hand) -------------------------------------------------------------

    /// Process CPU time (user + system) from /proc, in seconds; 0 where unavailable.
    fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Exact SVD timings, faer vs the configured backend (LAPACK with `--features lapack`):
    /// `LINALG_BENCH_SIZES=1024,4096 cargo test --release -p merge_fast_core --features lapack
    /// --test linalg bench_exact_svd -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_exact_svd() {
        let sizes = std::env::var("LINALG_BENCH_SIZES").unwrap_or_else(|_| "1024,4096".into());
        let backend = if cfg!(feature = "lapack") { "lapack sgesdd" } else { "faer" };
        for n in sizes.split(',').map(|v| v.trim().parse::<usize>().unwrap()) {
            let x = random(n, n, 1);
            let time = |label: &str, f: &dyn Fn() -> f32| {
                let (t, c) = (std::time::Instant::now(), cpu_seconds());
                let s0 = f();
                let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
                println!("{n}x{n} {label:<28} wall {wall:8.3}s  cpu {cpu:8.2}s  s_max {s0}");
            };
            time(&format!("svd() [{backend}]"), &|| svd(&x, n, n).unwrap().s[0]);
            let xt = faer::MatRef::from_column_major_slice(&x, n, n);
            time("faer Par::Seq", &|| core_crate::linalg::svd_faer_mat(xt, faer::Par::Seq).unwrap().1[0]);
            time("faer Par::rayon(2)", &|| core_crate::linalg::svd_faer_mat(xt, faer::Par::rayon(2)).unwrap().1[0]);
            time("svd_topk(k=64)", &|| svd_topk(&x, n, n, 64, 10, 2, 0).unwrap().svd.s[0]);
        }
    }
}
