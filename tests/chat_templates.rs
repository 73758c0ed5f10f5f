//! Chat templates: Hypura's rendering (minijinja) of each real model's own
//! Jinja template equals a reference rendering made with Python's jinja2
//! (`scripts/chat-template-refs.py`, outputs committed in tests/data/chat/),
//! both from the library and as `run --interactive --verbose-prompt` prints
//! the text it feeds the model; Gemma 3 (no template in its file) uses
//! llama.cpp's built-in Gemma format.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use hypura::engine::chat::{ChatMessage, ChatTemplate};
use hypura::gguf::GgufFile;

const MODELS: [(&str, &str); 3] = [
    ("smollm2", common::SMOLLM2),
    ("qwen05", common::QWEN05),
    ("qwen15", common::QWEN15),
];

fn expected(name: &str, case: &str) -> String {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/chat/{name}.{case}.txt"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn token_text(g: &GgufFile, key: &str) -> String {
    let id = g.get(key).and_then(|v| v.as_u64());
    let toks = g.get("tokenizer.ggml.tokens").and_then(|v| {
        v.as_array()
            .and_then(|a| a.as_strings().map(|s| s.to_vec()))
    });
    match (id, toks) {
        (Some(i), Some(t)) => t.get(i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

fn cases() -> Vec<(&'static str, Vec<ChatMessage>)> {
    vec![
        (
            "system_user",
            vec![
                ChatMessage::new("system", "You are a terse assistant. Answer in one word."),
                ChatMessage::new("user", "What is the capital of France?"),
            ],
        ),
        (
            "user_only",
            vec![ChatMessage::new("user", "Say hi, then stop.")],
        ),
        (
            "multi_turn",
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Capital of France?"),
                ChatMessage::new("assistant", "Paris."),
                ChatMessage::new("user", "And of Germany? Say it 'quoted' & \"double\"."),
            ],
        ),
    ]
}

#[test]
fn jinja_rendering_matches_python_jinja2() {
    for (name, file) in MODELS {
        let Some(path) = common::model(file) else {
            continue;
        };
        let g = GgufFile::open(&path).unwrap();
        let src = g
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str().map(str::to_string))
            .expect("a chat template");
        let t = ChatTemplate::jinja(
            &src,
            token_text(&g, "tokenizer.ggml.bos_token_id"),
            token_text(&g, "tokenizer.ggml.eos_token_id"),
        )
        .unwrap();
        for (case, msgs) in cases() {
            let got = render_jinja(&t, &msgs);
            assert_eq!(got, expected(name, case), "{name} {case}");
        }
    }
}

/// Renders through the public API without a loaded model (Jinja needs none).
fn render_jinja(t: &ChatTemplate, msgs: &[ChatMessage]) -> String {
    t.render_jinja(msgs, true).unwrap()
}

/// The prompt `run --interactive --verbose-prompt` prints for one user line.
fn verbose_prompt(model: &Path, system: Option<&str>, user: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "run",
        model.to_str().unwrap(),
        "--interactive",
        "--verbose-prompt",
        "--temp",
        "0",
        "-n",
        "1",
        "--threads",
        "2",
    ];
    if let Some(s) = system {
        args.extend(["--system", s]);
    }
    args.extend(extra);
    let mut child = common::hypura()
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{user}\n").as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "chat failed: {err}");
    let start = err.find("--- prompt ---\n").expect("a prompt block") + "--- prompt ---\n".len();
    let end = err[start..]
        .find("\n--- end prompt ---")
        .expect("the end of the prompt block")
        + start;
    err[start..end].to_string()
}

#[test]
fn interactive_feeds_the_rendered_template() {
    for (name, file) in MODELS {
        let Some(path) = common::model(file) else {
            continue;
        };
        let got = verbose_prompt(
            &path,
            Some("You are a terse assistant. Answer in one word."),
            "What is the capital of France?",
            &[],
        );
        assert_eq!(got, expected(name, "system_user"), "{name}");
        let got = verbose_prompt(&path, None, "Say hi, then stop.", &[]);
        assert_eq!(got, expected(name, "user_only"), "{name}");
    }
}

#[test]
fn gemma_without_a_template_uses_the_builtin_format() {
    let Some(path) = common::model(common::GEMMA3) else {
        return;
    };
    let g = GgufFile::open(&path).unwrap();
    assert!(
        g.get("tokenizer.chat_template").is_none(),
        "the test assumes Gemma's file has no template"
    );
    let got = verbose_prompt(&path, Some("Be brief."), "Hello there", &[]);
    // llama.cpp's Gemma format: the system message opens the first user turn;
    // the BOS token is added by the tokenizer, not written in the text.
    assert_eq!(
        got,
        "<start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn a_named_template_overrides_the_models_own() {
    let Some(path) = common::model(common::SMOLLM2) else {
        return;
    };
    let got = verbose_prompt(&path, None, "Hi", &["--chat-template", "gemma"]);
    assert_eq!(
        got,
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    );
    let o = common::hypura()
        .args([
            "run",
            path.to_str().unwrap(),
            "--interactive",
            "--chat-template",
            "no-such-template",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("no-such-template") && err.lines().count() <= 3,
        "{err}"
    );
}
