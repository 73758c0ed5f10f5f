//! A seeded mutation fuzzer for the GGUF layer: the reader, model validation
//! and what `inspect` builds from a file (report, text, JSON, placement
//! plans), all without llama.cpp.
//!
//! Seeds: the header, metadata and tensor infos of the real test models
//! (SmolLM2, Gemma 3) and of synthetic llama, qwen3moe and Mixtral models,
//! held in memory and parsed with [`GgufFile::parse_prefix`] (the full file
//! size is declared, so tensor layout checks run as on the real file). Each
//! case applies one to three mutations: bit flips and random bytes anywhere,
//! boundary values (0, 1, -1, 2^31, 2^32, u64/i64 extremes, 512/1024 and
//! their neighbours, the old value ±1, ×2) in the integer fields a walk of the
//! seed found (counts, lengths, value and tensor types, dims, offsets,
//! hyper-parameters), huge counts and lengths, truncations, copies of one
//! string over another of the same length (duplicate tokens, keys, tensor
//! names) and byte-range splices.
//!
//! Properties, per case: no panic (`catch_unwind`); the bytes allocated at
//! once stay under 8 times the input plus 4 MiB (a counting global
//! allocator); an error is one line of at most 1,000 characters that names
//! the file. Case `i` is reproducible from the seed and `i` alone.
//!
//! `HYPURA_FUZZ_CASES` (default 20,000), `HYPURA_FUZZ_FIRST_CASE` (default 0)
//! and `HYPURA_FUZZ_SEED` set the run;
//! `HYPURA_FUZZ_THREADS` the workers (default: the CPUs, at most 2). The
//! long run: `HYPURA_FUZZ_CASES=1000000 cargo test --release --test
//! fuzz_gguf -- --nocapture` (`HYPURA_FUZZ_PREFIX_DIR`: see [`real_seed`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use hypura::cli::inspect::{render_text, Report};
use hypura::gguf::synth::{generate, SynthArch, SynthConfig};
use hypura::gguf::GgufFile;
use hypura::scheduler::{GpuInput, Mode, Plan, PlanInput};
use hypura::util::rng::Rng;

mod common;

// ---- a per-thread counting allocator ----------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// This thread runs the code under test for a fuzz case (its panics are
    /// caught and reported as failures).
    static IN_FUZZ: Cell<bool> = const { Cell::new(false) };
}

fn track(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call forwards to the system allocator with the same
// arguments; the bookkeeping touches only const-initialised thread-locals
// (no allocation, no destructor), so it cannot re-enter the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            track(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from this allocator (the system one) with `l`.
        unsafe { System.dealloc(p, l) };
        track(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: `p` came from this allocator with `l`; the caller's contract.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            track(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, returning its result and the most bytes it held at once.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get) - base;
    (r, peak.max(0) as usize)
}

// ---- seeds and their fields --------------------------------------------

/// What an integer field of the file holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Tensor or key/value count of the header.
    HeaderCount,
    /// A string's length prefix (key, value, token, tensor name).
    StrLen,
    /// A metadata value type id (or an array's element type id).
    ValueType,
    /// An array's element count.
    ArrayLen,
    /// An integer metadata value (hyper-parameters, token ids, flags).
    Value,
    /// A tensor's dimension count.
    NDims,
    /// A tensor dimension.
    Dim,
    /// A tensor's ggml type id.
    GgmlType,
    /// A tensor's data offset.
    Offset,
}

const KINDS: [Kind; 9] = [
    Kind::HeaderCount,
    Kind::StrLen,
    Kind::ValueType,
    Kind::ArrayLen,
    Kind::Value,
    Kind::NDims,
    Kind::Dim,
    Kind::GgmlType,
    Kind::Offset,
];

#[derive(Clone, Copy, Debug)]
struct Field {
    at: usize,
    width: usize,
    kind: Kind,
}

struct Seed {
    name: String,
    bytes: Vec<u8>,
    file_size: u64,
    /// Fields by kind, in `KINDS` order.
    fields: Vec<Vec<Field>>,
    /// (offset, length) of every string's bytes.
    strings: Vec<(usize, usize)>,
}

/// Walks a valid GGUF prefix and records its fields.
struct Walk<'a> {
    b: &'a [u8],
    p: usize,
    fields: Vec<Vec<Field>>,
    strings: Vec<(usize, usize)>,
}

impl Walk<'_> {
    fn field(&mut self, width: usize, kind: Kind) -> u64 {
        let i = KINDS.iter().position(|k| *k == kind).unwrap();
        self.fields[i].push(Field {
            at: self.p,
            width,
            kind,
        });
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(&self.b[self.p..self.p + width]);
        self.p += width;
        u64::from_le_bytes(v)
    }
    fn string(&mut self) {
        let n = self.field(8, Kind::StrLen) as usize;
        self.strings.push((self.p, n));
        self.p += n;
    }
    fn scalar(&mut self, t: u64) {
        match t {
            0 | 1 | 7 => self.field(1, Kind::Value),
            2 | 3 => self.field(2, Kind::Value),
            4 | 5 => self.field(4, Kind::Value),
            6 => {
                self.p += 4;
                0
            }
            10 | 11 => self.field(8, Kind::Value),
            12 => {
                self.p += 8;
                0
            }
            8 => {
                self.string();
                0
            }
            _ => panic!("seed has value type {t}"),
        };
    }
}

fn walk(b: &[u8]) -> (Vec<Vec<Field>>, Vec<(usize, usize)>) {
    let mut w = Walk {
        b,
        p: 8,
        fields: vec![Vec::new(); KINDS.len()],
        strings: Vec::new(),
    };
    let n_tensors = w.field(8, Kind::HeaderCount);
    let n_kv = w.field(8, Kind::HeaderCount);
    for _ in 0..n_kv {
        w.string();
        let t = w.field(4, Kind::ValueType);
        if t == 9 {
            let et = w.field(4, Kind::ValueType);
            let n = w.field(8, Kind::ArrayLen);
            for _ in 0..n {
                w.scalar(et);
            }
        } else {
            w.scalar(t);
        }
    }
    for _ in 0..n_tensors {
        w.string();
        let nd = w.field(4, Kind::NDims);
        for _ in 0..nd {
            w.field(8, Kind::Dim);
        }
        w.field(4, Kind::GgmlType);
        w.field(8, Kind::Offset);
    }
    (w.fields, w.strings)
}

fn seed_from(name: &str, path: &Path) -> Seed {
    use std::io::Read;
    let g = GgufFile::open(path).unwrap_or_else(|e| panic!("seed {name}: {e}"));
    // Only the header, metadata and tensor infos.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .take(g.data_offset)
        .read_to_end(&mut bytes)
        .unwrap();
    seed_of(name, bytes, g.file_size)
}

fn seed_of(name: &str, bytes: Vec<u8>, file_size: u64) -> Seed {
    let (fields, strings) = walk(&bytes);
    Seed {
        name: name.to_string(),
        bytes,
        file_size,
        fields,
        strings,
    }
}

/// A real model's seed: from the model, or from `HYPURA_FUZZ_PREFIX_DIR`,
/// where `NAME.prefix` holds its first bytes and `NAME.size` its size (for
/// a machine without the models: `HYPURA_FUZZ_WRITE_PREFIXES=DIR` writes them).
fn real_seed(name: &str, model: &str) -> Option<Seed> {
    if let Some(dir) = std::env::var_os("HYPURA_FUZZ_PREFIX_DIR").map(PathBuf::from) {
        let bytes = std::fs::read(dir.join(format!("{name}.prefix"))).ok()?;
        let size = std::fs::read_to_string(dir.join(format!("{name}.size"))).unwrap();
        return Some(seed_of(name, bytes, size.trim().parse().unwrap()));
    }
    let s = seed_from(name, &common::model(model)?);
    if let Some(dir) = std::env::var_os("HYPURA_FUZZ_WRITE_PREFIXES").map(PathBuf::from) {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.prefix")), &s.bytes).unwrap();
        std::fs::write(dir.join(format!("{name}.size")), s.file_size.to_string()).unwrap();
    }
    Some(s)
}

/// The seeds, with how often each is drawn (the real headers are large,
/// the synthetic ones reach the MoE checks and are cheap).
fn seeds(dir: &Path) -> Vec<(Seed, u32)> {
    let mut out = Vec::new();
    for (arch, name) in [
        (SynthArch::Llama, "synth-llama"),
        (SynthArch::Qwen3Moe, "synth-qwen3moe"),
        (SynthArch::Mixtral, "synth-mixtral"),
    ] {
        let path = dir.join(format!("{name}.gguf"));
        let mut cfg = SynthConfig::new(arch);
        cfg.n_layer = 3;
        cfg.n_embd = 64;
        cfg.n_ff = 128;
        cfg.n_ff_exp = 64;
        cfg.n_vocab = 512;
        generate(&cfg, &path, &mut |_, _| {}).unwrap();
        out.push((seed_from(name, &path), 2));
    }
    out.extend(real_seed("smollm2", common::SMOLLM2).map(|s| (s, 3)));
    out.extend(real_seed("gemma3", common::GEMMA3).map(|s| (s, 1)));
    out
}

// ---- mutations -------------------------------------------------------------

fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// A boundary value for a field holding `old`.
fn boundary(rng: &mut Rng, old: u64, width: usize) -> u64 {
    let c = [
        0,
        1,
        2,
        3,
        u64::MAX,
        u64::MAX - 1,
        i64::MAX as u64,
        i64::MIN as u64,
        i32::MAX as u64,
        1 << 31,
        u32::MAX as u64,
        1 << 32,
        255,
        256,
        511,
        512,
        513,
        1023,
        1024,
        1025,
        65535,
        65536,
        old.wrapping_add(1),
        old.wrapping_sub(1),
        old.wrapping_mul(2),
        old / 2,
        rng.next_u64(),
    ];
    let v = c[below(rng, c.len())];
    if width == 8 {
        v
    } else {
        v & ((1u64 << (8 * width)) - 1)
    }
}

fn put(buf: &mut [u8], f: Field, v: u64) {
    if f.at + f.width <= buf.len() {
        buf[f.at..f.at + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
    }
}

fn get(buf: &[u8], f: Field) -> u64 {
    let mut v = [0u8; 8];
    if f.at + f.width <= buf.len() {
        v[..f.width].copy_from_slice(&buf[f.at..f.at + f.width]);
    }
    u64::from_le_bytes(v)
}

/// Applies one mutation; returns what it did.
fn mutate_once(seed: &Seed, buf: &mut Vec<u8>, rng: &mut Rng) -> String {
    let len = buf.len();
    // An earlier mutation of the case may have truncated the file: every
    // arm below stays within what is left.
    if len < 2 {
        return format!("nothing left to mutate ({len} bytes)");
    }
    match below(rng, 100) {
        // Bit flips anywhere.
        0..=19 => {
            let at = below(rng, len);
            let bit = below(rng, 8);
            buf[at] ^= 1 << bit;
            format!("flip bit {bit} of byte {at}")
        }
        // A random byte.
        20..=24 => {
            let at = below(rng, len);
            let v = rng.next_u64() as u8;
            buf[at] = v;
            format!("byte {at} = {v}")
        }
        // A boundary value in a field of a random kind.
        25..=69 => {
            let kinds: Vec<usize> = (0..KINDS.len())
                .filter(|&k| !seed.fields[k].is_empty())
                .collect();
            let k = kinds[below(rng, kinds.len())];
            let f = seed.fields[k][below(rng, seed.fields[k].len())];
            let v = boundary(rng, get(buf, f), f.width);
            put(buf, f, v);
            format!("{:?} at {} = {v}", f.kind, f.at)
        }
        // A huge count or length, about what is left of the file.
        70..=74 => {
            let k = [Kind::HeaderCount, Kind::StrLen, Kind::ArrayLen][below(rng, 3)];
            let i = KINDS.iter().position(|x| *x == k).unwrap();
            let f = seed.fields[i][below(rng, seed.fields[i].len())];
            let left = len.saturating_sub(f.at) as u64;
            let v = [left, left / 8, left + 1, left * 3, 1 << 40][below(rng, 5)];
            put(buf, f, v);
            format!("huge {:?} at {} = {v}", f.kind, f.at)
        }
        // Truncation: anywhere, or just inside a field.
        75..=84 => {
            let at = if rng.next_u64().is_multiple_of(2) {
                below(rng, len)
            } else {
                let all: Vec<&Field> = seed.fields.iter().flatten().collect();
                let f = all[below(rng, all.len())];
                f.at + below(rng, f.width)
            };
            buf.truncate(at);
            format!("truncate to {at}")
        }
        // One string copied over another of the same length.
        85..=92 => {
            let (a, n) = seed.strings[below(rng, seed.strings.len())];
            // Look near it first (tokens of one length cluster), then anywhere.
            let near = (0..64).find_map(|_| {
                let j = below(rng, seed.strings.len());
                let (b, m) = seed.strings[j];
                (m == n && b != a).then_some(b)
            });
            match near {
                Some(b) if b + n <= buf.len() && a + n <= buf.len() => {
                    let src = buf[a..a + n].to_vec();
                    buf[b..b + n].copy_from_slice(&src);
                    format!("string at {a} copied over {b} ({n} bytes)")
                }
                _ => "no same-length string".to_string(),
            }
        }
        // A byte range copied elsewhere.
        _ => {
            let n = 1 + below(rng, 64.min(len - 1));
            let from = below(rng, len - n);
            let to = below(rng, len - n);
            let src = buf[from..from + n].to_vec();
            buf[to..to + n].copy_from_slice(&src);
            format!("splice {n} bytes {from} -> {to}")
        }
    }
}

// ---- one case -------------------------------------------------------------

/// What `inspect` does with a file that parsed, plus plans at other budgets,
/// depths and with a GPU: none of it may panic.
fn inspect_level(g: &GgufFile, rng: &mut Rng) {
    let mut report = Report::build(g, true);
    let model = g.tensor_bytes();
    let lookahead = [None, Some(0), Some(1), Some(3), Some(513), Some(usize::MAX)][below(rng, 6)];
    let budgets = [u64::MAX, model, model / 3, 1 << 20, 0];
    let gpu = GpuInput {
        device: "fuzz".into(),
        budget: model / 2,
        h2d_gbps: Some(25.0),
        direct: rng.next_u64().is_multiple_of(2),
        direct_slots: rng.next_u64().is_multiple_of(2),
        unified: rng.next_u64().is_multiple_of(4),
    };
    for (i, &ram_budget) in budgets.iter().enumerate() {
        let input = PlanInput {
            gguf: g,
            ram_budget,
            mode: [None, Some(Mode::Dense), Some(Mode::Experts)][i % 3],
            lookahead,
            disk_gbps: Some(2.0),
            mem_gbps: Some(40.0),
            gpu: (i % 2 == 1).then(|| gpu.clone()),
        };
        if let Ok(p) = Plan::new(&input) {
            report.plan = Some(p);
        }
    }
    let _ = hypura::scheduler::gpu_headroom(g, u32::MAX, u64::MAX);
    let mut text = Vec::new();
    render_text(&report, &mut text).unwrap();
    serde_json::to_string(&report).unwrap();
}

/// The most bytes held at once by a case of a real model's header (1 MiB
/// or more), per thousand input bytes.
static PEAK_PER_MILLE: AtomicUsize = AtomicUsize::new(0);

/// Checks one case; `Err` describes a violated property.
fn run_case(seed: &Seed, case: u64, base: u64, path: &Path) -> Result<bool, String> {
    let mut rng = Rng::for_stream(base, case);
    let mut buf = seed.bytes.clone();
    let n = 1 + below(&mut rng, 3);
    let what: Vec<String> = (0..n)
        .map(|_| mutate_once(seed, &mut buf, &mut rng))
        .collect();
    let what = format!("{} case {case}: {}", seed.name, what.join("; "));
    let input = buf.len();
    let (r, peak) = measured(|| {
        // Only the code under test runs with its panic message silenced: a
        // panic of the harness itself (the mutation) is printed as usual.
        IN_FUZZ.with(|f| f.set(true));
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
            match GgufFile::parse_prefix(path, &buf, seed.file_size) {
                Ok(g) => {
                    inspect_level(&g, &mut rng);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }));
        IN_FUZZ.with(|f| f.set(false));
        r
    });
    if input >= 1 << 20 {
        PEAK_PER_MILLE.fetch_max(peak * 1000 / input, Ordering::Relaxed);
    }
    let limit = 8 * input + (4 << 20);
    if peak > limit {
        return Err(format!("{what}: held {peak} bytes at once (limit {limit})"));
    }
    match r {
        Err(_) => Err(format!("{what}: panicked")),
        Ok(Ok(())) => Ok(true),
        Ok(Err(msg)) => {
            let shown = path.display().to_string();
            if !msg.contains(&shown) {
                return Err(format!("{what}: error does not name the file: {msg}"));
            }
            if msg.contains('\n') || msg.len() > 1000 {
                return Err(format!(
                    "{what}: error is not one short line ({} bytes): {:.300}",
                    msg.len(),
                    msg
                ));
            }
            Ok(false)
        }
    }
}

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_gguf_headers_never_panic_or_blow_up() {
    let cases = env_u64("HYPURA_FUZZ_CASES", 20_000);
    // A long run may be split: cases [first, first + cases) of one seed.
    let first = env_u64("HYPURA_FUZZ_FIRST_CASE", 0);
    let base = env_u64("HYPURA_FUZZ_SEED", 0x4859_5055_5241);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let threads = env_u64("HYPURA_FUZZ_THREADS", cpus.min(2)).max(1);
    let dir = tempfile::tempdir().unwrap();
    let seeds = seeds(dir.path());
    let weights: Vec<u32> = seeds.iter().map(|(_, w)| *w).collect();
    let total: u32 = weights.iter().sum();
    // The path errors must name: never opened (the bytes are in memory).
    let path = PathBuf::from("/fuzz/mutated model.gguf");
    // Panics of cases are caught and reported as failures: no message from
    // the fuzz workers (other threads keep the default hook).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !IN_FUZZ.with(Cell::get) {
            default_hook(info)
        }
    }));
    let next = AtomicU64::new(first);
    let accepted = AtomicUsize::new(0);
    let per_seed: Vec<AtomicUsize> = seeds.iter().map(|_| AtomicUsize::new(0)).collect();
    let failures = Mutex::new(Vec::new());
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let case = next.fetch_add(1, Ordering::Relaxed);
                if case >= first + cases {
                    break;
                }
                // The seed is a function of the case alone.
                let mut pick =
                    (Rng::for_stream(base ^ 0x5eed, case).next_u64() % total as u64) as u32;
                let mut i = 0;
                while pick >= weights[i] {
                    pick -= weights[i];
                    i += 1;
                }
                per_seed[i].fetch_add(1, Ordering::Relaxed);
                match run_case(&seeds[i].0, case, base, &path) {
                    Ok(true) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(f) => failures.lock().unwrap().push(f),
                }
            });
        }
    });
    let _ = std::panic::take_hook();
    let secs = t0.elapsed().as_secs_f64();
    let per: Vec<String> = seeds
        .iter()
        .zip(&per_seed)
        .map(|((s, _), n)| format!("{} {}", s.name, n.load(Ordering::Relaxed)))
        .collect();
    eprintln!(
        "fuzz: {cases} cases from #{first} (seed {base:#x}, {threads} threads) in {secs:.1} s: {} accepted, {} rejected with an error; by seed: {}; most held at once by a real header's case: {:.2}x its bytes",
        accepted.load(Ordering::Relaxed),
        cases as usize - accepted.load(Ordering::Relaxed),
        per.join(", "),
        PEAK_PER_MILLE.load(Ordering::Relaxed) as f64 / 1000.0
    );
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {cases} cases broke a property; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
}

#[test]
fn the_walk_finds_every_field_kind_and_unmutated_seeds_parse() {
    let dir = tempfile::tempdir().unwrap();
    for (s, _) in seeds(dir.path()) {
        for (k, f) in KINDS.iter().zip(&s.fields) {
            assert!(!f.is_empty(), "{}: no {k:?} field found", s.name);
        }
        let path = Path::new("/fuzz/seed.gguf");
        let g = GgufFile::parse_prefix(path, &s.bytes, s.file_size)
            .unwrap_or_else(|e| panic!("{}: {e}", s.name));
        assert!(!g.tensors.is_empty());
        // One byte short of the tensor infos is an error naming the file.
        let last = s.fields[KINDS.len() - 1].last().unwrap();
        let cut = &s.bytes[..last.at + last.width - 1];
        let e = GgufFile::parse_prefix(path, cut, s.file_size).expect_err("a cut prefix parses");
        assert!(e.to_string().contains("/fuzz/seed.gguf"), "{e}");
    }
}
