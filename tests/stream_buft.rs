//! The Hypura buffer type: FFN tensors routed into it through
//! `tensor_buft_overrides` are all reported with the right size, their
//! bytes are never written (set_tensor is a no-op) and the address space is
//! only reserved.

mod common;

use hypura::engine::stream_buft::StreamBufferType;
use hypura::engine::{LoadMode, LoadOptions, Model};
use hypura::gguf::GgufFile;

const FFN: &str = r"^blk\.\d+\.ffn_(gate|up|down)\.weight$";

fn check(file: &str, load_mode: LoadMode, hide: bool) {
    let Some(path) = common::model(file) else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let want: Vec<_> = gguf
        .tensors
        .iter()
        .filter(|t| t.role.is_dense_ffn())
        .collect();
    assert!(!want.is_empty());

    let buft = StreamBufferType::new_host().unwrap();
    buft.set_hide_names(hide);
    let overrides = vec![(FFN.to_string(), buft.as_raw())];
    let model = Model::load(
        &path,
        LoadOptions {
            load_mode,
            repack: false,
            buft_overrides: &overrides,
            progress: None,
            n_gpu_layers: 0,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    buft.restore_names().unwrap();
    let got = buft.reported();

    assert_eq!(
        got.len(),
        want.len(),
        "{file}: every FFN tensor, and only those, is reported"
    );
    for t in &want {
        let r = got
            .iter()
            .find(|r| r.name == t.name)
            .unwrap_or_else(|| panic!("{} not reported", t.name));
        assert_eq!(r.nbytes as u64, t.size, "{}: size", t.name);
        // set_tensor is a no-op: the reserved pages still read as zeros, while
        // the file holds real weights there.
        let bytes = unsafe { std::slice::from_raw_parts(r.data as *const u8, r.nbytes) };
        assert!(
            bytes.iter().all(|&b| b == 0),
            "{}: data was written into the buffer",
            t.name
        );
        // After restore_names the tensor carries its real name again.
        let name = unsafe { std::ffi::CStr::from_ptr((*r.tensor).name.as_ptr()) };
        assert_eq!(name.to_str().unwrap(), t.name);
    }
    let total: u64 = want.iter().map(|t| t.size).sum();
    assert!(
        buft.reserved_bytes() as u64 >= total,
        "the buffer reserves room for every FFN tensor"
    );
    drop(model);
}

#[test]
fn smollm2_ffn_tensors_reported_mmap() {
    check(common::SMOLLM2, LoadMode::Mmap, false);
}

#[test]
fn gemma3_ffn_tensors_reported_hidden_names_dio() {
    check(common::GEMMA3, LoadMode::Dio, true);
}

#[test]
fn smollm2_ffn_tensors_reported_hidden_names_none() {
    check(common::SMOLLM2, LoadMode::None, true);
}
