//! The module layering, checked against the source: a lower layer never
//! names a higher one through `crate::` (a cycle such as
//! config → profiler → engine → scheduler → config cannot come back
//! unnoticed). From the bottom: `util`; `gguf`, `io`; `scheduler`;
//! `profiler`; `config`; `engine`, `report`; `bench`, `cli`. The modules
//! above `config` are not checked here.

use std::path::Path;

/// Each checked module and the only other top-level modules it may import
/// (everything else, a module added later included, is refused).
const RULES: &[(&str, &[&str])] = &[
    ("util", &[]),
    ("gguf", &["util"]),
    ("io", &["util"]),
    // Pure planning: the machine's facts come in as numbers.
    ("scheduler", &["util", "gguf", "io"]),
    // Devices are measured by the engine and handed in.
    ("profiler", &["util", "gguf", "io", "scheduler"]),
    ("config", &["util", "gguf", "io", "scheduler", "profiler"]),
];

/// The code of a Rust file without its comments (`//` to the end of the
/// line, doc comments included, and `/* */` blocks); string literals are
/// kept as they are.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars().peekable();
    let (mut in_str, mut block) = (false, 0usize);
    while let Some(c) = chars.next() {
        if block > 0 {
            match (c, chars.peek()) {
                ('*', Some('/')) => {
                    chars.next();
                    block -= 1;
                }
                ('/', Some('*')) => {
                    chars.next();
                    block += 1;
                }
                ('\n', _) => out.push('\n'),
                _ => {}
            }
            continue;
        }
        if in_str {
            out.push(c);
            match c {
                '\\' => out.extend(chars.next()),
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                block = 1;
            }
            // The character literal '"' does not open a string.
            ('\'', Some('"')) => {
                out.push(c);
                out.extend(chars.next());
            }
            ('"', _) => {
                in_str = true;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// The top-level modules `code` names as `crate::NAME`, grouped imports
/// (`use crate::{a::x, b}`) included.
fn crate_imports(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let prev = code[..at].chars().next_back();
        if prev.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue; // `$crate::`, `mycrate::`
        }
        let rest = code[at + "crate::".len()..].trim_start();
        let Some(group) = rest.strip_prefix('{') else {
            found.push(ident(rest));
            continue;
        };
        // The top-level items of the group, up to its closing brace.
        let (mut depth, mut item_start) = (0usize, true);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if item_start && !c.is_whitespace() => {
                    item_start = false;
                    found.push(ident(&group[i..]));
                }
                _ => {}
            }
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A module's files: `src/NAME.rs` and everything under `src/NAME/`.
fn module_files(src: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        files.push(file);
    }
    let dir = src.join(name);
    if dir.is_dir() {
        rust_files(&dir, &mut files);
    }
    files
}

#[test]
fn lower_layers_do_not_import_higher_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut bad = Vec::new();
    for (module, allowed) in RULES {
        let files = module_files(&src, module);
        assert!(!files.is_empty(), "no sources for module {module}");
        for f in files {
            let code = strip_comments(&std::fs::read_to_string(&f).unwrap());
            for m in crate_imports(&code) {
                if m != *module && !allowed.contains(&m.as_str()) {
                    bad.push(format!(
                        "{} imports crate::{m}",
                        f.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
    }
    bad.sort();
    bad.dedup();
    assert!(
        bad.is_empty(),
        "layering broken (see src/layering.rs):\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_scanner_finds_every_form_of_import() {
    let code = strip_comments(
        "use crate::engine::device::Device;\n\
         use crate::{\n    io::{Backend, ALIGN},\n    profiler, scheduler::Plan,\n};\n\
         fn f() { crate::config::saved_lookahead(p); let q = '\"'; let s = \"// crate::bench\"; }\n\
         // crate::cli in a comment\n/* crate::report\n in a block */\n\
         /// [`crate::cli`] in a doc comment\n\
         macro_rules! m { () => { $crate::x::y } }\nuse mycrate::bench;\n",
    );
    assert_eq!(
        crate_imports(&code),
        ["engine", "io", "profiler", "scheduler", "config", "bench"]
    );
}
