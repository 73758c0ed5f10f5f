//! Rules of the code base that a reviewer would otherwise have to check by
//! hand: every `unsafe` block or impl outside `hypura-sys` and `src/io` says
//! why it is sound (`// SAFETY:` on it or in the lines just above), and no
//! Rust file grows past 900 lines.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The code of a line without its `//` comment (good enough: no string in
/// this code base holds `//` before an `unsafe`).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

fn is_unsafe_site(line: &str) -> bool {
    let c = code(line);
    let mut rest = c;
    while let Some(i) = rest.find("unsafe") {
        let after = rest[i + 6..].trim_start();
        let word_start = i == 0
            || !rest.as_bytes()[i - 1].is_ascii_alphanumeric() && rest.as_bytes()[i - 1] != b'_';
        if word_start && (after.starts_with('{') || after.starts_with("impl")) {
            return true;
        }
        rest = &rest[i + 6..];
    }
    false
}

#[test]
fn every_unsafe_block_outside_sys_and_io_has_a_safety_comment() {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let io = root().join("src/io");
    let mut missing = Vec::new();
    for f in files.iter().filter(|f| !f.starts_with(&io)) {
        let text = std::fs::read_to_string(f).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if is_unsafe_site(l)
                && !lines[i.saturating_sub(6)..=i]
                    .iter()
                    .any(|x| x.contains("SAFETY"))
            {
                missing.push(format!(
                    "{}:{}: {}",
                    f.strip_prefix(root()).unwrap().display(),
                    i + 1,
                    l.trim()
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "unsafe without a SAFETY comment:\n{}",
        missing.join("\n")
    );
}

#[test]
fn no_rust_file_is_over_900_lines() {
    let mut files = Vec::new();
    for d in ["src", "tests", "hypura-sys/src", "examples", "benches"] {
        rust_files(&root().join(d), &mut files);
    }
    assert!(files.len() > 20, "found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 900).then(|| {
                format!(
                    "{} has {n} lines",
                    f.strip_prefix(root()).unwrap().display()
                )
            })
        })
        .collect();
    assert!(long.is_empty(), "{}", long.join("\n"));
}

#[test]
fn the_detector_sees_what_it_should() {
    assert!(is_unsafe_site("    let x = unsafe { f() };"));
    assert!(is_unsafe_site("unsafe impl Send for X {}"));
    assert!(!is_unsafe_site("pub unsafe fn f() {"));
    assert!(!is_unsafe_site("// unsafe { not code }"));
    assert!(!is_unsafe_site("let not_unsafe = 1;"));
}
