//! No command writes the model file: its bytes and modification time are the
//! same after `run` (resident and streaming), `inspect`, `bench` and
//! `profile --file` (which reads it for the storage figures).

mod common;

use std::path::Path;
use std::time::SystemTime;

fn snapshot(p: &Path) -> (Vec<u8>, SystemTime, u64) {
    let meta = std::fs::metadata(p).unwrap();
    (
        std::fs::read(p).unwrap(),
        meta.modified().unwrap(),
        meta.len(),
    )
}

#[test]
fn no_command_writes_the_model() {
    let Some(src) = common::model(common::SMOLLM2) else {
        return;
    };
    let (dir, model) = common::copy_model(&src);
    // An mtime in the past, so that any write would move it visibly.
    let past = SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&model)
        .unwrap()
        .set_modified(past)
        .unwrap();
    let before = snapshot(&model);
    let m = model.to_str().unwrap();
    let out = dir.path().join("bench-out");
    let cache = dir.path().join("cache");
    let commands: Vec<Vec<&str>> = vec![
        vec![
            "run",
            m,
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
            "--temp",
            "0",
        ],
        vec![
            "run",
            m,
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
            "--temp",
            "0",
            "--ram-budget",
            "60M",
            "--mode",
            "dense",
        ],
        vec![
            "run",
            m,
            "--prompt",
            "Hello",
            "--max-tokens",
            "4",
            "--io-backend",
            "pread",
            "--ram-budget",
            "60M",
        ],
        vec!["inspect", m, "--tensors"],
        vec![
            "bench",
            m,
            "--lookahead",
            "0,1",
            "--baseline",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeat",
            "1",
            "--warmup",
            "0",
            "--ram-budget",
            "60M",
            "--out",
            out.to_str().unwrap(),
        ],
        vec!["profile", "--quick", "--force", "--file", m],
    ];
    for args in &commands {
        let o = common::hypura()
            .args(args)
            .env("XDG_CACHE_HOME", &cache)
            .env("XDG_CONFIG_HOME", &cache)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let after = snapshot(&model);
        assert_eq!(after.2, before.2, "{args:?} changed the size");
        assert_eq!(after.1, before.1, "{args:?} changed the mtime");
        assert!(after.0 == before.0, "{args:?} changed the bytes");
    }
}
