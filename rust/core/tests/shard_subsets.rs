//! Running a plan one output shard at a time (`only_shards`, as the Ray executor's tasks
//! do) writes exactly the files of the full run, and `engine::layout` predicts the files
//! and the index of the full run without writing anything.
use merge_fast_core::dtype::{encode_f32, Dtype};
use merge_fast_core::engine::{self, Progress};
use merge_fast_core::plan::PlanSpec;
use merge_fast_core::reader::Checkpoint;
use merge_fast_core::writer::{OutSpec, ShardedWriter};
use std::collections::BTreeMap;
use std::path::Path;

fn write_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let shapes = [("a", vec![300, 40]), ("b", vec![64, 32]), ("c", vec![1000]), ("d", vec![7, 9])];
    let specs = shapes.iter().map(|(n, s)| OutSpec::new(n.to_string(), Dtype::BF16, s.clone())).collect();
    let w = ShardedWriter::create(dir, specs, u64::MAX, &BTreeMap::new()).unwrap();
    for (i, (_, s)) in shapes.iter().enumerate() {
        let n: usize = s.iter().product();
        let v: Vec<f32> = (0..n).map(|j| merge_fast_core::rng::normal(seed + i as u64, j as u64) as f32).collect();
        let mut bytes = vec![0u8; n * 2];
        encode_f32(Dtype::BF16, &v, &mut bytes);
        w.write(i, 0, &bytes).unwrap();
    }
    w.finish().unwrap();
}

fn plan(a: &Path, b: &Path, only: Option<Vec<usize>>) -> PlanSpec {
    let tensors: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| {
            serde_json::json!({"name": n, "method": "dare_linear", "params": {"weight": [0.5, 0.5], "density": 0.5},
            "base": {"kind": "tensor", "input": 0, "tensor": n},
            "inputs": [{"kind": "tensor", "input": 0, "tensor": n}, {"kind": "tensor", "input": 1, "tensor": n}]})
        })
        .collect();
    serde_json::from_value(serde_json::json!({"inputs": [a, b], "tensors": tensors, "seed": 3, "max_shard_size": 5000,
        "metadata": {"k": "v"}, "only_shards": only}))
    .unwrap()
}

fn run(p: &PlanSpec, out: &Path) -> engine::Summary {
    std::fs::create_dir_all(out).unwrap();
    let ckpts: Vec<Checkpoint> = p.inputs.iter().map(Checkpoint::open).collect::<Result<_, _>>().unwrap();
    engine::run(p, &ckpts, out, &engine::pool(Some(2)).unwrap(), &mut |_: &Progress| Ok(())).unwrap()
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn shard_subsets_write_the_full_runs_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_model(&a, 1);
    write_model(&b, 2);
    let full = tmp.path().join("full");
    run(&plan(&a, &b, None), &full);
    let want = files(&full);

    let ckpts = [Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap()];
    let (_, shards, index) = engine::layout(&plan(&a, &b, None), &ckpts).unwrap();
    assert!(shards.len() >= 3, "{shards:?}");
    assert_eq!(index.as_deref().map(str::as_bytes), want.get("model.safetensors.index.json").map(|v| &v[..]));

    // Each shard alone, in reverse order, one twice (a retried task), into one folder.
    let parts = tmp.path().join("parts");
    let mut tensors = 0;
    for i in (0..shards.len()).rev().chain([1]) {
        let s = run(&plan(&a, &b, Some(vec![i])), &parts);
        assert_eq!(s.files.len(), 1);
        assert_eq!(s.files[0].file_name().unwrap().to_string_lossy(), shards[i].file);
        tensors += s.tensors_written;
    }
    assert_eq!(tensors, 4 + shards[1].tensors.len());
    let mut got = files(&parts);
    got.insert("model.safetensors.index.json".into(), index.unwrap().into_bytes());
    assert_eq!(got, want);

    // A shard outside the layout is a config error, and nothing is written.
    let none = tmp.path().join("none");
    std::fs::create_dir_all(&none).unwrap();
    let ckpts: Vec<Checkpoint> = [&a, &b].iter().map(Checkpoint::open).collect::<Result<_, _>>().unwrap();
    let e = engine::run(&plan(&a, &b, Some(vec![99])), &ckpts, &none, &engine::pool(Some(1)).unwrap(), &mut |_: &Progress| Ok(()));
    assert!(e.unwrap_err().to_string().contains("shard 99"));
    assert!(files(&none).is_empty());
}
