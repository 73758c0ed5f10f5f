//! Grammars for structured output: llama.cpp's JSON-schema -> GBNF converter
//! (`common/json-schema-to-grammar.cpp`, the one llama-server uses), so a
//! request's JSON schema constrains generation through the grammar sampler.

use anyhow::{anyhow, bail, Result};

use hypura_sys as sys;

/// The GBNF grammar (root rule `root`) that accepts exactly the JSON
/// documents `schema_json` describes. A schema that is not JSON or that the
/// converter does not support (unknown `$ref`, bad `pattern`, ...) is an
/// error.
pub fn json_schema_to_gbnf(schema_json: &str) -> Result<String> {
    let text = std::ffi::CString::new(schema_json)
        .map_err(|_| anyhow!("the JSON schema contains a NUL byte"))?;
    let mut out: *mut std::os::raw::c_char = std::ptr::null_mut();
    // SAFETY: `text` is NUL-terminated and outlives the call; `out` is a valid
    // place for the result pointer, which the wrapper sets to a malloc'd
    // string or leaves NULL; C++ exceptions are caught inside the wrapper.
    let status = unsafe { sys::llama_rs_json_schema_to_grammar(text.as_ptr(), false, &mut out) };
    if out.is_null() {
        bail!(
            "the JSON schema is not supported by llama.cpp's converter (status {})",
            status as i64
        );
    }
    // SAFETY: `out` is the NUL-terminated string the wrapper allocated; it is
    // copied, then freed once with the wrapper's own free function.
    let grammar = unsafe {
        let s = std::ffi::CStr::from_ptr(out).to_string_lossy().into_owned();
        sys::llama_rs_string_free(out);
        s
    };
    if status != sys::LLAMA_RS_STATUS_OK {
        bail!("the JSON schema is not supported by llama.cpp's converter");
    }
    Ok(grammar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_schema_names_its_properties() {
        let g = json_schema_to_gbnf(
            r#"{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}"#,
        )
        .unwrap();
        assert!(g.contains("root ::="), "{g}");
        assert!(g.contains("\\\"name\\\""), "{g}");
        assert!(g.contains("\\\"age\\\""), "{g}");
    }

    #[test]
    fn bad_schemas_are_errors() {
        assert!(json_schema_to_gbnf("{not json").is_err());
        assert!(json_schema_to_gbnf("{\"$ref\": \"#/definitions/missing\"}").is_err());
        assert!(json_schema_to_gbnf("a\0b").is_err());
    }
}
