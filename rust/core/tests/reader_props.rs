//! Property tests: the reader never panics on arbitrary or mutated files; it returns a
//! checkpoint or an `InvalidCheckpoint`/`Io` error.
use merge_fast_core::reader::Checkpoint;
use merge_fast_core::Error;
use proptest::prelude::*;

fn valid_file() -> Vec<u8> {
    let header = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}"#;
    let mut h = header.to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = (h.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(&h);
    f.extend((0..32u8).collect::<Vec<_>>());
    f
}

fn check(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    std::fs::write(&p, bytes).unwrap();
    match Checkpoint::open(&p) {
        Ok(c) => {
            // A file that opens must be fully readable.
            for n in c.names() {
                let i = c.info(n).unwrap();
                if i.dtype.is_some() {
                    let mut v = vec![0f32; i.numel()];
                    c.read_f32(i, 0..i.numel(), &mut v).unwrap();
                }
            }
        }
        Err(Error::InvalidCheckpoint { .. }) | Err(Error::Io { .. }) => {}
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        check(&bytes);
    }

    #[test]
    fn mutated_valid_files_never_panic(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                       cut in proptest::option::of(any::<prop::sample::Index>())) {
        let mut f = valid_file();
        for (i, b) in edits {
            let k = i.index(f.len());
            f[k] = b;
        }
        if let Some(c) = cut {
            f.truncate(c.index(f.len()));
        }
        check(&f);
    }

    #[test]
    fn random_header_fields_never_panic(dtype in prop::sample::select(vec!["F32", "BF16", "F16", "F64", "I64", "F8_E4M3", "BOGUS"]),
                                        shape in proptest::collection::vec(0usize..1_000_000, 0..4),
                                        start in 0usize..64, end in 0usize..64) {
        let header = format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{start},{end}]}}}}"#);
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend(vec![0u8; 32]);
        check(&f);
    }
}

#[test]
fn the_valid_file_opens() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    std::fs::write(&p, valid_file()).unwrap();
    let c = Checkpoint::open(&p).unwrap();
    assert_eq!(c.names().len(), 2);
}

/// A shard holding `names` (F32 scalars... of 2 elements each), as raw bytes.
fn shard(names: &[&str]) -> Vec<u8> {
    let mut header = String::from("{");
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(r#""{n}":{{"dtype":"F32","shape":[2],"data_offsets":[{},{}]}}"#, i * 8, i * 8 + 8));
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header.as_bytes());
    f.extend(vec![0u8; names.len() * 8]);
    f
}

fn index_entry() -> impl Strategy<Value = (String, serde_json::Value)> {
    let name = prop::sample::select(vec!["a", "b", "c", "d", "missing", ""]).prop_map(str::to_owned);
    let file = prop_oneof![
        prop::sample::select(vec![
            "s1.safetensors",
            "s2.safetensors",
            "nope.safetensors",
            "../s1.safetensors",
            "/etc/passwd",
            "sub/s1.safetensors",
            "",
            "."
        ])
        .prop_map(|s| serde_json::Value::String(s.to_owned())),
        Just(serde_json::Value::Null),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::json!(["s1.safetensors"])),
    ];
    (name, file)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Sharded folders with a random `model.safetensors.index.json`: open gives a checkpoint
    /// whose every tensor is readable, or an `InvalidCheckpoint`/`Io` error; never a panic.
    #[test]
    fn random_index_files_never_panic(entries in proptest::collection::vec(index_entry(), 0..7),
                                      shape in 0u8..6, junk in proptest::collection::vec(any::<u8>(), 0..40)) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s1.safetensors"), shard(&["a", "b"])).unwrap();
        std::fs::write(dir.path().join("s2.safetensors"), shard(&["c", "d"])).unwrap();
        let map: serde_json::Map<String, serde_json::Value> = entries.into_iter().collect();
        let text = match shape {
            0 => serde_json::json!({"metadata": {"total_size": 32}, "weight_map": map}).to_string(),
            1 => serde_json::json!({"weight_map": map}).to_string(),
            2 => serde_json::json!({"weight_map": [map]}).to_string(),
            3 => serde_json::json!({"metadata": {}}).to_string(),
            4 => String::from_utf8_lossy(&junk).into_owned(),
            _ => {
                let mut t = serde_json::json!({"weight_map": map}).to_string();
                t.truncate(junk.len() % (t.len() + 1));
                t
            }
        };
        std::fs::write(dir.path().join("model.safetensors.index.json"), text).unwrap();
        match Checkpoint::open(dir.path()) {
            Ok(c) => {
                for i in c.infos() {
                    let mut v = vec![0f32; i.numel()];
                    c.read_f32(i, 0..i.numel(), &mut v).unwrap();
                    prop_assert!(c.info(&i.name).is_some());
                }
            }
            Err(Error::InvalidCheckpoint { .. }) | Err(Error::Io { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error kind: {}", e),
        }
    }
}
