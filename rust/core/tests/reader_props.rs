//! Property tests: the reader never panics on arbitrary or mutated files; it returns a
//! checkpoint or an `InvalidCheckpoint`/`Io` error.
use merge_fast_core::reader::Checkpoint;
use merge_fast_core::Error;
use proptest::prelude::*;

fn valid_file() -> Vec<u8> {
    let header = br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}"#;
    let mut h = header.to_vec();
    while h.len() % 8 != 0 {
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
