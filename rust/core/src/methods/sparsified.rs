//! Registry of the sparsify-and-merge family: TIES, DARE (with or without TIES), Model
//! Breadcrumbs (with or without TIES), DELLA (with or without TIES) and SCE, with mergekit
//! 0.1.5's parameters, defaults and order of operations (see `sparsified/gta.rs`).
//!
//! | method | sparsification | consensus | normalize | rescale |
//! |---|---|---|---|---|
//! | ties | magnitude top-k | sum | true | false |
//! | dare_ties | random (DARE) | sum | false | true (L1) |
//! | dare_linear | random (DARE) | none | false | true (L1) |
//! | breadcrumbs | magnitude window (gamma) | none | false | false |
//! | breadcrumbs_ties | magnitude window (gamma) | sum | false | false |
//! | della | magnitude-ranked random | sum | true | true (L1) |
//! | della_linear | magnitude-ranked random | none | false | true (L1) |
//! | sce | variance top-k (select_topk) | sum | — | — |
use crate::params::{BaseRule, Build, MethodSpec, ParamSpec, Range};

pub mod bracket;
pub mod breadcrumbs;
pub mod dare;
pub mod della;
pub mod gta;
pub mod norms;
pub mod sce;
pub mod select;
pub mod sparsify;
pub mod ties;

use gta::Spec;

/// The parameters of the family (mergekit's keys in mergekit's order, then merge_fast's),
/// with the defaults of `spec` and the method's own `extra` ones.
fn gta_spec(name: &'static str, spec: Spec, extra: &[ParamSpec], build: Build) -> MethodSpec {
    // consensus options mean something only to the methods that elect a sign
    let consensus = |p: ParamSpec| if spec.consensus { p } else { p.config_only() };
    MethodSpec::new(name, BaseRule::Required, build)
        .params(&[
            ParamSpec::bool("int8_mask", false),
            ParamSpec::bool("normalize", spec.normalize),
            ParamSpec::bool("rescale", spec.rescale),
            ParamSpec::float("lambda", 1.0, Range::FINITE),
            ParamSpec::float("weight", 1.0, Range::FINITE).per_model(),
            ParamSpec::float("density", 1.0, Range::FRACTION).per_model(),
            ParamSpec::opt_str("rescale_mode"),
            consensus(ParamSpec::opt_str("disjoint_mean")),
            consensus(ParamSpec::opt_str("consensus")),
        ])
        .params(extra)
        .params(&[ParamSpec::float("lam", 1.0, Range::FINITE).alias()])
        .mergekit()
}

const fn spec(consensus: bool, normalize: bool, rescale: bool) -> Spec {
    Spec { consensus, normalize, rescale }
}

const TIES: Spec = spec(true, true, false);
const DARE_TIES: Spec = spec(true, false, true);
const DARE_LINEAR: Spec = spec(false, false, true);
const BREADCRUMBS: Spec = spec(false, false, false);
const BREADCRUMBS_TIES: Spec = spec(true, false, false);
const DELLA: Spec = spec(true, true, true);
const DELLA_LINEAR: Spec = spec(false, false, true);

/// The specs of this family.
pub fn specs() -> Vec<MethodSpec> {
    let gamma = ParamSpec::float("gamma", 0.01, Range::UNIT).per_model();
    let epsilon = ParamSpec::float("epsilon", 0.15, Range::UNIT).per_model();
    vec![
        gta_spec("ties", TIES, &[], |p, n, b| gta::build(p.method(), p, n, b, TIES, Box::new(ties::Magnitude::build(p.method(), p, n)?))),
        gta_spec("dare_ties", DARE_TIES, &[], |p, n, b| gta::build(p.method(), p, n, b, DARE_TIES, Box::new(dare::Random::build(p.method(), p, n)?))),
        gta_spec("dare_linear", DARE_LINEAR, &[], |p, n, b| {
            gta::build(p.method(), p, n, b, DARE_LINEAR, Box::new(dare::Random::build(p.method(), p, n)?))
        }),
        gta_spec("breadcrumbs", BREADCRUMBS, &[gamma], |p, n, b| {
            gta::build(p.method(), p, n, b, BREADCRUMBS, Box::new(breadcrumbs::Outliers::build(p.method(), p, n)?))
        }),
        gta_spec("breadcrumbs_ties", BREADCRUMBS_TIES, &[gamma], |p, n, b| {
            gta::build(p.method(), p, n, b, BREADCRUMBS_TIES, Box::new(breadcrumbs::Outliers::build(p.method(), p, n)?))
        }),
        gta_spec("della", DELLA, &[epsilon], |p, n, b| gta::build(p.method(), p, n, b, DELLA, Box::new(della::MagPrune::build(p.method(), p, n)?))),
        gta_spec("della_linear", DELLA_LINEAR, &[epsilon], |p, n, b| {
            gta::build(p.method(), p, n, b, DELLA_LINEAR, Box::new(della::MagPrune::build(p.method(), p, n)?))
        }),
        sce::spec(),
    ]
}

#[cfg(test)]
mod tests {
    use crate::kernel::{merge_arrays, pool};
    use crate::methods::build as build_method;
    use serde_json::{json, Map, Value};

    fn run(method: &str, params: Value, base: &[f32], xs: &[Vec<f32>], shape: &[usize], seed: u64, threads: usize) -> Vec<f32> {
        let p: Map<String, Value> = params.as_object().unwrap().clone();
        let k = build_method(method, &p, xs.len(), true).unwrap();
        let inputs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        merge_arrays(k.as_ref(), "t", shape, seed, Some(base), &inputs, &pool(Some(threads)).unwrap()).unwrap()
    }

    fn data(n: usize, models: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
        let k = crate::rng::stream_key(1, "data", 0);
        let base: Vec<f32> = (0..n).map(|i| crate::rng::normal(k, i as u64) as f32).collect();
        let xs = (1..=models)
            .map(|m| {
                let k = crate::rng::stream_key(1, "data", m as u64);
                // quantized deltas: many exact ties at every threshold
                base.iter().enumerate().map(|(i, &b)| b + (crate::rng::normal(k, i as u64) * 8.0).round() as f32 / 64.0).collect()
            })
            .collect();
        (base, xs)
    }

    #[test]
    fn every_method_is_independent_of_thread_count() {
        let shape = [53, 4000]; // 3.2 engine chunks, ragged tail
        let (base, xs) = data(53 * 4000, 3);
        let cases = [
            ("ties", json!({"weight": [1.0, 0.5, 0.7], "density": 0.3, "rescale": true})),
            ("dare_ties", json!({"density": [0.2, 0.5, 0.9]})),
            ("dare_linear", json!({"density": 0.4, "rescale_mode": "density"})),
            ("breadcrumbs", json!({"density": 0.6, "gamma": 0.05})),
            ("breadcrumbs_ties", json!({"density": 0.6, "gamma": 0.05, "normalize": true})),
            ("della", json!({"density": 0.5, "epsilon": 0.2})),
            ("della_linear", json!({"density": 0.5, "epsilon": 0.2})),
            ("sce", json!({"select_topk": 0.3})),
        ];
        for (m, p) in cases {
            let a = run(m, p.clone(), &base, &xs, &shape, 9, 1);
            let b = run(m, p.clone(), &base, &xs, &shape, 9, 3);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}");
            assert!(a.iter().zip(&base).any(|(x, y)| x != y), "{m} changed nothing");
            if m.starts_with("dare") || m.starts_with("della") {
                let c = run(m, p, &base, &xs, &shape, 10, 2);
                assert_ne!(a, c, "{m}: seeds must differ");
            }
        }
    }

    #[test]
    fn ties_by_hand() {
        // Δ_a = [3, -1, 0.5, 2], Δ_b = [-1, -2, 1, 0]; density 0.5 keeps a: {3, 2}; b: -2 and,
        // of the tied |−1| (index 0) and |1| (index 2), the lower index: b keeps [-1, -2, 0, 0].
        let base = vec![10.0f32; 4];
        let xs = vec![vec![13.0, 9.0, 10.5, 12.0], vec![9.0, 8.0, 11.0, 10.0]];
        let got = run("ties", json!({"weight": [1.0, 0.5], "density": 0.5}), &base, &xs, &[4], 0, 1);
        // weighted: a [3, 0, 0, 2], b [-0.5, -1, 0, 0] -> signs +,-,+,+ ; disjoint means 3/1, -1/0.5, 0/1, 2/1
        assert_eq!(got, vec![13.0, 8.0, 10.0, 12.0]);
        let got = run("ties", json!({"weight": [1.0, 0.5], "density": 0.5, "normalize": false}), &base, &xs, &[4], 0, 1);
        assert_eq!(got, vec![13.0, 9.0, 10.0, 12.0]);
        // all disagreeing with an exactly zero sum: the positive side wins
        let xs = vec![vec![11.0; 4], vec![9.0; 4]];
        assert_eq!(run("ties", json!({}), &base, &xs, &[4], 0, 1), vec![11.0; 4]);
    }

    #[test]
    fn bad_params_are_config_errors() {
        let p = |v: Value| v.as_object().unwrap().clone();
        assert!(build_method("della", &p(json!({"density": 0.1})), 2, true).is_err());
        assert!(build_method("ties", &p(json!({"gamma": 0.1})), 2, true).is_err()); // not a ties parameter
        assert!(build_method("breadcrumbs", &p(json!({"gamma": -1.0})), 2, true).is_err());
        assert!(build_method("dare_linear", &p(json!({"rescale": false, "rescale_mode": "l1"})), 2, true).is_err());
        assert!(build_method("ties", &p(json!({})), 2, false).is_err());
        assert!(build_method("sce", &p(json!({"weight": 1.0})), 2, true).is_err());
        assert!(build_method("ties", &p(json!({"int8_mask": true, "lambda": 0.5})), 2, true).is_ok());
    }
}
