//! Greedy sampling over Gemma 3's 262,144-token vocabulary: llama.cpp's
//! sampler chain (`llama_sampler_init_greedy` on a full candidate array)
//! against Hypura's vectorised argmax on the raw logits, which the Session
//! uses when greedy has no penalties or grammar. Same picks, asserted.
//!
//!     cargo bench --bench greedy
//!
//! A measurement, not a test: it prints the median time per token of each,
//! side by side in one run, and their ratio.

use std::time::Instant;

use hypura::engine::sampling::{argmax, Sampler, SamplingParams};

fn main() {
    const VOCAB: usize = 262_144;
    const ROUNDS: usize = 300;
    let mut rng = hypura::util::rng::Rng::new(0x5EED);
    let rows: Vec<Vec<f32>> = (0..8)
        .map(|_| (0..VOCAB).map(|_| rng.next_f32() * 30.0 - 15.0).collect())
        .collect();
    let mut chain = Sampler::chain_only(&SamplingParams::greedy(), VOCAB).expect("sampler chain");
    let (mut t_chain, mut t_fast) = (Vec::with_capacity(ROUNDS), Vec::with_capacity(ROUNDS));
    for i in 0..ROUNDS {
        let row = &rows[i % rows.len()];
        let t = Instant::now();
        let a = chain.sample(row);
        t_chain.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let b = argmax(std::hint::black_box(row)) as i32;
        t_fast.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(a, b, "the chain's greedy and the argmax disagree");
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c, f) = (med(&mut t_chain), med(&mut t_fast));
    println!("greedy over {VOCAB} logits, median of {ROUNDS}: chain {c:.1} us/token, argmax {f:.1} us/token, chain/argmax {:.1}x", c / f);
}
