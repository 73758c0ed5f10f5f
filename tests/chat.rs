//! `hypura run --interactive`: turns come from stdin, replies go to stdout,
//! `/exit` leaves, and the KV cache is kept across turns (only the new turn
//! is prefilled).

mod common;

use std::io::Write;
use std::process::Stdio;

fn chat(model: &std::path::Path, input: &str) -> (String, serde_json::Value) {
    let mut child = common::hypura()
        .args([
            "run",
            model.to_str().unwrap(),
            "--interactive",
            "--temp",
            "0",
            "--max-tokens",
            "24",
            "--threads",
            "2",
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "chat failed: {err}");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        common::report(&err),
    )
}

#[test]
fn two_turns_keep_the_kv_cache() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let (one, r1) = chat(&m, "What is the capital of France?\n/exit\nnot read\n");
    assert!(!one.trim().is_empty(), "a reply to the first turn");
    let first_prompt = r1["prompt_tokens"].as_u64().unwrap();

    let (two, r2) = chat(&m, "What is the capital of France?\nAnd of Germany?\n");
    let replies: Vec<&str> = two.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(replies.len() >= 2, "two replies: {two:?}");
    assert!(
        two.starts_with(one.trim_end()),
        "the first turn's reply does not depend on what follows"
    );
    // Prefilled in all: the first turn, then only the second turn's new text
    // (not the whole conversation again).
    let total = r2["prompt_tokens"].as_u64().unwrap();
    let second = total - first_prompt;
    assert!(
        second > 0 && second < first_prompt + 8,
        "second turn prefilled {second} tokens, first {first_prompt}"
    );
}
