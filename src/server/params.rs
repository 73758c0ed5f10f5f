//! Request settings shared by both APIs: the server-wide defaults (the
//! `run`-style sampling flags of `hypura serve`), a request's overrides, and
//! their mapping onto the engine's [`SamplingParams`].

use std::sync::atomic::{AtomicU32, Ordering};

use serde::Deserialize;

use super::error::{Api, ApiError};
use crate::engine::sampling::SamplingParams;

/// GBNF for JSON output (`"format": "json"`, `response_format`): llama.cpp's
/// `grammars/json.gbnf` (MIT licence), copied into this directory.
pub const JSON_GRAMMAR: &str = include_str!("json.gbnf");

/// What a request gets when it does not say.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Sampling from the command line (`seed` unused: see `seed`).
    pub sampling: SamplingParams,
    /// `--seed`: every request without its own seed uses it; otherwise each
    /// request draws a fresh seed.
    pub seed: Option<u32>,
    /// `--max-tokens`: the default generation length (None: until the
    /// context is full or the model stops).
    pub max_tokens: Option<usize>,
}

/// A request's sampling settings (Ollama `options`, OpenAI parameters).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub temp: Option<f32>,
    pub top_k: Option<i32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub typical_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    /// Constrain the output to JSON (any document, or one schema's).
    pub json: JsonOutput,
}

/// A request's structured-output setting.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum JsonOutput {
    /// Free text (the server's `--grammar-file`, if any, applies).
    #[default]
    Off,
    /// Any JSON value (`"format": "json"`, `json_object`).
    Any,
    /// A JSON document that follows this JSON schema (the schema's text).
    Schema(String),
}

impl JsonOutput {
    /// The GBNF grammar for this setting (`None`: free text); a schema that
    /// llama.cpp's converter rejects is a 400.
    pub fn grammar(&self, api: Api) -> Result<Option<String>, ApiError> {
        match self {
            JsonOutput::Off => Ok(None),
            JsonOutput::Any => Ok(Some(JSON_GRAMMAR.to_string())),
            JsonOutput::Schema(schema) => crate::engine::grammar::json_schema_to_gbnf(schema)
                .map(Some)
                .map_err(|e| ApiError::bad_request(api, format!("{e}"))),
        }
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The non-empty stop strings.
    pub fn strings(self) -> Vec<String> {
        let v = match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        };
        v.into_iter().filter(|s| !s.is_empty()).collect()
    }
}

/// The engine's sampling settings for a request; a value out of range is a
/// 400 that names the setting.
pub fn sampling(d: &Defaults, o: &Overrides, api: Api) -> Result<SamplingParams, ApiError> {
    let b = &d.sampling;
    let seed = match o.seed {
        None => d.seed.unwrap_or_else(fresh_seed),
        // Ollama's -1 (and any negative value): a fresh seed.
        Some(s) if s < 0 => fresh_seed(),
        Some(s) => u32::try_from(s).map_err(|_| {
            ApiError::bad_request(api, format!("seed must be at most 4294967295 (got {s})"))
        })?,
    };
    let p = SamplingParams {
        temp: o.temp.unwrap_or(b.temp),
        top_k: o.top_k.unwrap_or(b.top_k),
        top_p: o.top_p.unwrap_or(b.top_p),
        min_p: o.min_p.unwrap_or(b.min_p),
        typical_p: o.typical_p.unwrap_or(b.typical_p),
        repeat_penalty: o.repeat_penalty.unwrap_or(b.repeat_penalty),
        repeat_last_n: o.repeat_last_n.unwrap_or(b.repeat_last_n),
        presence_penalty: o.presence_penalty.unwrap_or(b.presence_penalty),
        frequency_penalty: o.frequency_penalty.unwrap_or(b.frequency_penalty),
        seed,
        grammar: match o.json.grammar(api)? {
            Some(g) => Some(g),
            None => b.grammar.clone(),
        },
    };
    p.validate()
        .map_err(|e| ApiError::bad_request(api, e.to_string()))?;
    Ok(p)
}

/// A seed for a request that names none: the clock mixed with a counter, so
/// two requests in the same nanosecond still differ.
fn fresh_seed() -> u32 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(0x9E37_79B9, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    t ^ n
}

/// A generation length from a request: `None` or a negative value (Ollama's
/// -1 "no limit", -2 "fill the context") is the server default; 0 is a 400.
pub fn max_tokens(
    d: &Defaults,
    v: Option<i64>,
    name: &str,
    api: Api,
) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(d.max_tokens),
        Some(n) if n < 0 => Ok(None),
        Some(0) => Err(ApiError::bad_request(
            api,
            format!("{name} must be at least 1"),
        )),
        Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            sampling: SamplingParams::default(),
            seed: Some(7),
            max_tokens: None,
        }
    }

    #[test]
    fn overrides_map_and_validate() {
        let d = defaults();
        let o = Overrides {
            temp: Some(0.0),
            top_k: Some(5),
            seed: Some(42),
            json: JsonOutput::Any,
            ..Overrides::default()
        };
        let p = sampling(&d, &o, Api::OpenAi).unwrap();
        assert_eq!((p.temp, p.top_k, p.seed), (0.0, 5, 42));
        assert!(p.grammar.as_deref().unwrap().contains("root"));
        assert_eq!(
            sampling(&d, &Overrides::default(), Api::Ollama)
                .unwrap()
                .seed,
            7
        );
        let bad = Overrides {
            top_p: Some(1.5),
            ..Overrides::default()
        };
        let e = sampling(&d, &bad, Api::Ollama).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("top_p"), "{}", e.message);
        let big = Overrides {
            seed: Some(1 << 40),
            ..Overrides::default()
        };
        assert_eq!(sampling(&d, &big, Api::OpenAi).unwrap_err().status, 400);
    }

    #[test]
    fn lengths_and_stops() {
        let d = defaults();
        assert_eq!(
            max_tokens(&d, Some(-1), "num_predict", Api::Ollama).unwrap(),
            None
        );
        assert_eq!(
            max_tokens(&d, Some(9), "max_tokens", Api::OpenAi).unwrap(),
            Some(9)
        );
        assert!(max_tokens(&d, Some(0), "max_tokens", Api::OpenAi).is_err());
        let s: Stop = serde_json::from_str(r#"["a", "", "b"]"#).unwrap();
        assert_eq!(s.strings(), ["a", "b"]);
        let s: Stop = serde_json::from_str(r#""x""#).unwrap();
        assert_eq!(s.strings(), ["x"]);
    }
}
