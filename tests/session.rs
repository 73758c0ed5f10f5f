//! The engine Session through the library API: KV prefix reuse, stop
//! strings, cancellation, seeded sampling, grammars and prompt limits, on a
//! real model (SmolLM2), resident and streaming.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use hypura::engine::sampling::SamplingParams;
use hypura::engine::{Finish, GenerateRequest, Generation, Session, SessionOptions};

fn session(model: &Path, ram_budget: Option<u64>) -> Session {
    let mut o = SessionOptions::new(2);
    o.n_ctx = Some(512);
    o.placement.ram_budget = ram_budget;
    Session::load(model, &o, None).unwrap()
}

fn gen(
    s: &mut Session,
    prompt: &[i32],
    n: usize,
    p: &SamplingParams,
    stop: &[String],
) -> Generation {
    let req = GenerateRequest {
        max_tokens: n,
        sampling: p,
        stop,
        cancel: None,
        logits_out: None,
    };
    let mut streamed = String::new();
    let g = s.generate(prompt, req, &mut |t| {
        streamed.push_str(t);
        Ok(())
    });
    let g = g.unwrap();
    assert_eq!(streamed, g.text, "the streamed text is the returned text");
    g
}

const PROMPT: &str = "The three primary colors are red, yellow and";

#[test]
fn prefix_reuse_prefills_only_the_new_tokens_and_changes_nothing() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let greedy = SamplingParams::greedy();
    let mut s = session(&m, None);
    let a = s.tokenize(PROMPT, true, false).unwrap();
    let g1 = gen(&mut s, &a, 8, &greedy, &[]);
    assert_eq!((g1.reused_tokens, g1.stats.prompt_tokens), (0, a.len()));
    // The cache holds the prompt and the generated tokens that were decoded.
    assert_eq!(s.cached_tokens().len(), a.len() + g1.tokens.len() - 1);

    // A longer prompt that starts with the first: only its tail is prefilled.
    let b = s
        .tokenize(
            &format!("{PROMPT} blue. The three secondary colors are"),
            true,
            false,
        )
        .unwrap();
    assert_eq!(&b[..a.len()], &a[..], "the test needs a shared prefix");
    let g2 = gen(&mut s, &b, 8, &greedy, &[]);
    assert!(
        g2.reused_tokens >= a.len(),
        "reused {} of a {}-token prefix",
        g2.reused_tokens,
        a.len()
    );
    assert_eq!(g2.stats.prompt_tokens, b.len() - g2.reused_tokens);
    let fresh = gen(&mut session(&m, None), &b, 8, &greedy, &[]);
    assert_eq!(
        g2.tokens, fresh.tokens,
        "reusing the cache gives the tokens a fresh prefill gives"
    );

    // The same prompt again: everything but the last token comes from the cache.
    let g3 = gen(&mut s, &b, 8, &greedy, &[]);
    assert_eq!(g3.reused_tokens, b.len() - 1);
    assert_eq!(g3.tokens, fresh.tokens);

    // A different prompt: nothing to reuse beyond the common start.
    let c = s.tokenize("Once upon a time", true, false).unwrap();
    let g4 = gen(&mut s, &c, 4, &greedy, &[]);
    assert!(g4.reused_tokens <= 1, "reused {}", g4.reused_tokens);
    assert_eq!(
        g4.tokens,
        gen(&mut session(&m, None), &c, 4, &greedy, &[]).tokens
    );
}

#[test]
fn prefix_reuse_while_streaming() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let greedy = SamplingParams::greedy();
    let mut s = session(&m, Some(60 << 20));
    assert_ne!(
        s.plan().mode,
        hypura::scheduler::Mode::Resident,
        "a 60 MiB budget must stream SmolLM2"
    );
    let a = s.tokenize(PROMPT, true, false).unwrap();
    let b = s
        .tokenize(
            &format!("{PROMPT} blue. The three secondary colors are"),
            true,
            false,
        )
        .unwrap();
    gen(&mut s, &a, 6, &greedy, &[]);
    let g = gen(&mut s, &b, 8, &greedy, &[]);
    assert!(g.reused_tokens >= a.len());
    assert!(
        g.gen_metrics.is_some_and(|m| m.bytes_read > 0),
        "layers streamed during generation"
    );
    assert_eq!(
        g.tokens,
        gen(&mut session(&m, None), &b, 8, &greedy, &[]).tokens,
        "streaming with reuse = resident from scratch"
    );
}

#[test]
fn stop_strings_end_generation_and_are_not_returned() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let greedy = SamplingParams::greedy();
    let mut s = session(&m, None);
    let p = s
        .tokenize("List the days of the week: Monday, Tuesday,", true, false)
        .unwrap();
    let full = gen(&mut s, &p, 24, &greedy, &[]);
    assert_eq!(full.finish, Finish::Length);
    let t = &full.text;
    assert!(t.chars().count() > 12, "need some text: {t:?}");
    // A stop string from the middle of the text (it may span tokens).
    let start = t.char_indices().nth(t.chars().count() / 2).unwrap().0;
    let stop: String = t[start..].chars().take(4).collect();
    let cut = &t[..t.find(&stop).unwrap()];
    let g = gen(
        &mut s,
        &p,
        24,
        &greedy,
        &[String::from("never appears \u{1F600}"), stop.clone()],
    );
    assert_eq!(g.finish, Finish::Stop);
    assert_eq!(g.text, cut, "text up to the stop string {stop:?}");
}

#[test]
fn cancel_stops_within_a_token() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let mut s = session(&m, None);
    let p = s.tokenize(PROMPT, true, false).unwrap();
    let cancel = AtomicBool::new(false);
    let greedy = SamplingParams::greedy();
    let req = GenerateRequest {
        max_tokens: 50,
        sampling: &greedy,
        stop: &[],
        cancel: Some(&cancel),
        logits_out: None,
    };
    let g = s
        .generate(&p, req, &mut |_| {
            cancel.store(true, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
    assert_eq!(g.finish, Finish::Cancelled);
    assert!(
        g.tokens.len() <= 2,
        "{} tokens after cancel",
        g.tokens.len()
    );
    // The session still works afterwards.
    assert_eq!(gen(&mut s, &p, 3, &greedy, &[]).tokens.len(), 3);
}

#[test]
fn a_fixed_seed_reproduces_the_text() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let mut s = session(&m, None);
    let p = s
        .tokenize("Write a short poem about the sea.", true, false)
        .unwrap();
    let at = |seed| SamplingParams {
        temp: 1.0,
        seed,
        ..SamplingParams::default()
    };
    let a = gen(&mut s, &p, 24, &at(42), &[]);
    let b = gen(&mut s, &p, 24, &at(42), &[]);
    let c = gen(&mut s, &p, 24, &at(43), &[]);
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens, "another seed, another text");
    // top-k 1 is greedy at any temperature.
    let k1 = gen(
        &mut s,
        &p,
        12,
        &SamplingParams {
            temp: 1.5,
            top_k: 1,
            ..SamplingParams::default()
        },
        &[],
    );
    assert_eq!(
        k1.tokens,
        gen(&mut s, &p, 12, &SamplingParams::greedy(), &[]).tokens
    );
}

#[test]
fn a_grammar_constrains_the_output() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let mut s = session(&m, None);
    let p = s.tokenize("Is the sky blue? Answer:", true, false).unwrap();
    for temp in [0.0, 1.0] {
        let sp = SamplingParams {
            temp,
            seed: 3,
            grammar: Some(r#"root ::= ("yes" | "no") "." "#.into()),
            ..SamplingParams::default()
        };
        let g = gen(&mut s, &p, 16, &sp, &[]);
        assert!(
            g.text == "yes." || g.text == "no.",
            "temp {temp}: {:?}",
            g.text
        );
        assert_eq!(
            g.finish,
            Finish::Stop,
            "a finished grammar allows only the end"
        );
    }
    let sp = SamplingParams {
        grammar: Some("root ::= (".into()),
        ..SamplingParams::default()
    };
    let req = GenerateRequest {
        max_tokens: 4,
        sampling: &sp,
        stop: &[],
        cancel: None,
        logits_out: None,
    };
    let e = s
        .generate(&p, req, &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("grammar"), "{e}");
}

#[test]
fn prompts_beyond_the_context_are_refused_with_the_numbers() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let mut s = session(&m, None);
    let long: Vec<i32> =
        std::iter::repeat_n(s.tokenize(" the", false, false).unwrap()[0], 600).collect();
    let greedy = SamplingParams::greedy();
    let req = GenerateRequest {
        max_tokens: 4,
        sampling: &greedy,
        stop: &[],
        cancel: None,
        logits_out: None,
    };
    let e = s
        .generate(&long, req, &mut |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("600") && e.contains("512"), "{e}");
    // Generation stops at the end of the context.
    let p: Vec<i32> = long[..508].to_vec();
    let g = gen(&mut s, &p, 100, &greedy, &[]);
    assert!(g.tokens.len() <= 4 && g.finish != Finish::Cancelled);
}
