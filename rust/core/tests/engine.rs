//! End-to-end tests of the core: write checkpoints with the writer, read them back with the
//! reader, run plans through the engine, and check values against formulas computed here.
use merge_fast_core::dtype::Dtype;
use merge_fast_core::engine::{self, Progress};
use merge_fast_core::plan::PlanSpec;
use merge_fast_core::reader::Checkpoint;
use merge_fast_core::writer::{OutSpec, ShardedWriter, WriteMode};
use merge_fast_core::Error;
use std::collections::BTreeMap;
use std::path::Path;

fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n).map(|i| merge_fast_core::rng::normal(seed, i as u64) as f32).collect()
}

/// Writes `tensors` (name, shape, values) as one checkpoint of `dtype` into `dir`.
fn write_model(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], dtype: Dtype, max_shard: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let specs = tensors.iter().map(|(n, s, _)| OutSpec::new(n.to_string(), dtype, s.clone())).collect();
    let w = ShardedWriter::create(dir, specs, max_shard, &BTreeMap::new()).unwrap();
    for (i, (_, _, v)) in tensors.iter().enumerate() {
        let mut bytes = vec![0u8; v.len() * dtype.size()];
        merge_fast_core::dtype::encode_f32(dtype, v, &mut bytes);
        // Write in two pieces, second first: the writer accepts any order.
        let half = (v.len() / 2) * dtype.size();
        w.write(i, half, &bytes[half..]).unwrap();
        w.write(i, 0, &bytes[..half]).unwrap();
    }
    w.finish().unwrap();
}

fn model(seed: u64) -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    vec![
        ("embed.weight", vec![300, 500], values(150_000, seed)), // spans 3 engine chunks
        ("layers.0.w", vec![64, 32], values(2048, seed + 100)),
        ("norm.weight", vec![32], values(32, seed + 200)),
    ]
}

fn plan(inputs: &[&Path], method: &str, params: serde_json::Value, base: bool, shard: u64) -> PlanSpec {
    let names = ["embed.weight", "layers.0.w", "norm.weight"];
    let tensors: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            let src = |i: usize| serde_json::json!({"kind": "tensor", "input": i, "tensor": n});
            let first = usize::from(base);
            serde_json::json!({
                "name": n, "method": method, "params": params,
                "base": if base { src(0) } else { serde_json::Value::Null },
                "inputs": (first..inputs.len()).map(src).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({"inputs": inputs, "tensors": tensors, "max_shard_size": shard})).unwrap()
}

fn run(plan: &PlanSpec, out: &Path, threads: usize) -> Result<engine::Summary, Error> {
    std::fs::create_dir_all(out).unwrap();
    let ckpts: Vec<Checkpoint> = plan.inputs.iter().map(Checkpoint::open).collect::<Result<_, _>>()?;
    let pool = engine::pool(Some(threads))?;
    engine::run(plan, &ckpts, out, &pool, &mut |_p: &Progress| Ok(()))
}

fn read_all(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let c = Checkpoint::open(dir).unwrap();
    c.names()
        .map(|n| {
            let i = c.info(n).unwrap();
            let mut v = vec![0f32; i.numel()];
            c.read_f32(i, 0..i.numel(), &mut v).unwrap();
            (n.to_owned(), v)
        })
        .collect()
}

#[test]
fn writer_reader_roundtrip_sharded_and_single() {
    let tmp = tempfile::tempdir().unwrap();
    // 600000 + 8192 + 128 bytes: at 10 kB the embedding gets a shard alone, the rest share one.
    for (shard, files) in [(u64::MAX, 1usize), (10_000, 2)] {
        let d = tmp.path().join(format!("m{files}"));
        write_model(&d, &model(1), Dtype::F32, shard);
        let got = read_all(&d);
        for (n, _, v) in model(1) {
            assert_eq!(&got[n], &v, "{n}");
        }
        let st: Vec<_> =
            std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == "safetensors")).collect();
        assert_eq!(st.len(), files);
        assert_eq!(d.join("model.safetensors.index.json").exists(), files > 1);
    }
}

/// Threads that find a shard busy hand their pieces to the thread writing it (buffered), or
/// stage them into blocks for the writer thread (direct): with many threads writing small
/// pieces of two tensors of one file at once, every piece must still land at its place
/// (`finish` counts the bytes; the values are read back), and both ways give the same file.
#[test]
fn concurrent_writers_of_one_shard_lose_no_piece() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = [("a", values(300_000, 7)), ("b", values(77_777, 8))];
    for mode in [WriteMode::Buffered, WriteMode::Direct] {
        let dir = tmp.path().join(format!("{mode:?}"));
        std::fs::create_dir(&dir).unwrap();
        let specs = tensors.iter().map(|(n, v)| OutSpec::new(n.to_string(), Dtype::F32, vec![v.len()])).collect();
        let w = ShardedWriter::create_with(&dir, specs, u64::MAX, &BTreeMap::new(), None, mode).unwrap();
        // Pieces of 1000 values (the last shorter), dealt round-robin to 6 threads.
        let pieces: Vec<(usize, usize)> =
            tensors.iter().enumerate().flat_map(|(t, (_, v))| (0..v.len()).step_by(1000).map(move |s| (t, s))).collect();
        std::thread::scope(|sc| {
            for k in 0..6 {
                let (w, pieces, tensors) = (&w, &pieces, &tensors);
                sc.spawn(move || {
                    for &(t, s) in pieces.iter().skip(k).step_by(6) {
                        let v = &tensors[t].1[s..(s + 1000).min(tensors[t].1.len())];
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        w.write(t, s * 4, &bytes).unwrap();
                    }
                });
            }
        });
        w.finish().unwrap();
        let got = read_all(&dir);
        for (n, v) in &tensors {
            assert!(got[*n] == *v, "{mode:?} {n}");
        }
    }
    let file = |m: &str| std::fs::read(tmp.path().join(m).join("model.safetensors")).unwrap();
    assert!(file("Buffered") == file("Direct"));
}

/// A durable plan (`direct_io`) writes every shard and the index exactly as a buffered one.
#[test]
fn direct_io_plans_write_the_same_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_model(&a, &model(1), Dtype::BF16, u64::MAX);
    write_model(&b, &model(2), Dtype::BF16, u64::MAX);
    let mut p = plan(&[&a, &b], "linear", serde_json::json!({"weight": [1.0, 3.0]}), false, 10_000);
    run(&p, &tmp.path().join("buffered"), 2).unwrap();
    p.direct_io = true;
    run(&p, &tmp.path().join("direct"), 2).unwrap();
    let files = |d: &str| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(tmp.path().join(d))
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
            .collect()
    };
    let (x, y) = (files("buffered"), files("direct"));
    assert_eq!(x.len(), 3); // two shards and the index
    assert!(x == y);
}

#[test]
fn linear_slerp_task_arithmetic_match_formulas_in_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    write_model(&a, &model(1), Dtype::BF16, u64::MAX);
    write_model(&b, &model(2), Dtype::BF16, 20_000);
    write_model(&c, &model(3), Dtype::BF16, u64::MAX);
    let (ra, rb, rc) = (read_all(&a), read_all(&b), read_all(&c));
    let bf = |x: f32| half::bf16::from_f32(x).to_f32();

    let out = tmp.path().join("lin");
    run(&plan(&[&a, &b, &c], "linear", serde_json::json!({"weight": [1.0, 2.0, 1.0]}), false, u64::MAX), &out, 2).unwrap();
    for (n, v) in read_all(&out) {
        for j in 0..v.len() {
            let expect = bf((0.25 * ra[&n][j] as f64 + 0.5 * rb[&n][j] as f64 + 0.25 * rc[&n][j] as f64) as f32);
            assert!((v[j] - expect).abs() <= expect.abs() * 2f32.powi(-7) + 1e-6, "{n}[{j}]: {} vs {expect}", v[j]);
        }
    }

    let out = tmp.path().join("ta");
    run(&plan(&[&a, &b, &c], "task_arithmetic", serde_json::json!({"weight": [1.0, 0.5], "lambda": 0.8}), true, 10_000), &out, 2).unwrap();
    for (n, v) in read_all(&out) {
        for j in 0..v.len() {
            let base = ra[&n][j] as f64;
            let expect = bf((base + 0.8 * ((rb[&n][j] as f64 - base) + 0.5 * (rc[&n][j] as f64 - base))) as f32);
            assert!((v[j] - expect).abs() <= expect.abs() * 2f32.powi(-7) + 1e-6, "{n}[{j}]");
        }
    }

    let out = tmp.path().join("slerp");
    run(&plan(&[&a, &b], "slerp", serde_json::json!({"t": 0.3}), true, u64::MAX), &out, 2).unwrap();
    for (n, v) in read_all(&out) {
        let (x, y) = (&ra[&n], &rb[&n]);
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let th = (dot / (nx * ny)).acos();
        let (c0, c1) = ((0.7 * th).sin() / th.sin(), (0.3 * th).sin() / th.sin());
        for j in 0..v.len() {
            let expect = bf((c0 * x[j] as f64 + c1 * y[j] as f64) as f32);
            assert!((v[j] - expect).abs() <= expect.abs() * 2f32.powi(-7) + 1e-6, "{n}[{j}]");
        }
    }
}

#[test]
fn output_is_identical_for_any_thread_count_and_shard_size_values() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_model(&a, &model(5), Dtype::F32, u64::MAX);
    write_model(&b, &model(6), Dtype::F32, u64::MAX);
    let p = plan(&[&a, &b], "slerp", serde_json::json!({"t": 0.5}), true, u64::MAX);
    let (o1, o2) = (tmp.path().join("o1"), tmp.path().join("o2"));
    run(&p, &o1, 1).unwrap();
    run(&p, &o2, 3).unwrap();
    assert_eq!(std::fs::read(o1.join("model.safetensors")).unwrap(), std::fs::read(o2.join("model.safetensors")).unwrap());
}

#[test]
fn plan_errors_name_the_tensor_before_any_write() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_model(&a, &model(1), Dtype::F32, u64::MAX);
    let mut other = model(2);
    other[1].1 = vec![32, 64]; // transposed shape
    write_model(&b, &other, Dtype::F32, u64::MAX);
    let out = tmp.path().join("o");
    let err = run(&plan(&[&a, &b], "linear", serde_json::json!({}), false, u64::MAX), &out, 1).unwrap_err();
    assert!(matches!(&err, Error::TensorMismatch { tensor, .. } if tensor == "layers.0.w"), "{err}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "nothing written");
    let err = run(&plan(&[&a, &a], "linear", serde_json::json!({"wieght": 1}), false, u64::MAX), &out, 1).unwrap_err();
    assert!(err.to_string().contains("unknown parameter(s) wieght"), "{err}");
    let err = run(&plan(&[&a, &a], "nope", serde_json::json!({}), false, u64::MAX), &out, 1).unwrap_err();
    assert!(err.to_string().contains("unknown merge method 'nope'"), "{err}");
}

#[test]
fn non_finite_results_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let mut m = model(1);
    m[2].2[3] = f32::INFINITY;
    write_model(&a, &m, Dtype::F32, u64::MAX);
    let err = run(&plan(&[&a, &a], "task_arithmetic", serde_json::json!({}), true, u64::MAX), &tmp.path().join("o"), 1).unwrap_err();
    assert!(matches!(&err, Error::Numerical { tensor, .. } if tensor == "norm.weight"), "{err}");
}

/// Tensors merge side by side: when several fail, the error reported is the first failing
/// tensor's in plan order, not the first to finish (here the small second tensor fails at
/// once, the first one only at its last chunk, of 32).
#[test]
fn the_first_failing_tensor_in_plan_order_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let mut big = values(1 << 21, 1);
    *big.last_mut().unwrap() = f32::NAN;
    let mut small = values(64, 2);
    small[3] = f32::INFINITY;
    write_model(&a, &[("big", vec![1 << 21], big), ("small", vec![64], small)], Dtype::F32, u64::MAX);
    let tensors: Vec<serde_json::Value> = ["big", "small"]
        .iter()
        .map(|n| serde_json::json!({"name": n, "method": "linear", "inputs": [{"kind": "tensor", "input": 0, "tensor": n}, {"kind": "tensor", "input": 1, "tensor": n}]}))
        .collect();
    let p: PlanSpec = serde_json::from_value(serde_json::json!({"inputs": [&a, &a], "tensors": tensors, "max_shard_size": u64::MAX})).unwrap();
    for threads in [1, 2, 3] {
        let err = run(&p, &tmp.path().join(format!("o{threads}")), threads).unwrap_err();
        assert!(matches!(&err, Error::Numerical { tensor, .. } if tensor == "big"), "{threads} threads: {err}");
    }
}

#[test]
fn progress_error_stops_the_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    write_model(&a, &model(1), Dtype::F32, u64::MAX);
    let p = plan(&[&a, &a], "linear", serde_json::json!({}), false, u64::MAX);
    let ckpts = vec![Checkpoint::open(&a).unwrap(), Checkpoint::open(&a).unwrap()];
    let out = tmp.path().join("o");
    std::fs::create_dir_all(&out).unwrap();
    let pool = engine::pool(Some(1)).unwrap();
    let mut seen = 0;
    let err = engine::run(&p, &ckpts, &out, &pool, &mut |pr: &Progress| {
        seen = pr.tensors_done;
        if pr.tensors_done == 1 {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    })
    .unwrap_err();
    assert!(matches!(err, Error::Interrupted));
    assert_eq!(seen, 1);
}
