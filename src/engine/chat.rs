//! Chat templates: the model's own `tokenizer.chat_template` (Jinja),
//! rendered with minijinja the way Hugging Face's `apply_chat_template` does
//! (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
//! `raise_exception`, an unescaped `tojson`), or llama.cpp's built-in
//! templates for a model without one (Gemma 3's GGUF has none) or when the
//! user names one (`--chat-template chatml`).

use anyhow::{anyhow, bail, Context as _, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use super::model::Model;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A template ready to render conversations.
pub enum ChatTemplate {
    /// Jinja source (the model's, or the user's).
    Jinja {
        env: Box<Environment<'static>>,
        bos: String,
        eos: String,
    },
    /// A template name llama.cpp knows (`llama_chat_apply_template`).
    Builtin(String),
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// The template to chat with: `user` (a llama.cpp template name, or Jinja
    /// source if it contains `{{` or `{%`), else the model's own, else the
    /// built-in template for the architecture's family, else ChatML.
    pub fn for_model(model: &Model, user: Option<&str>, arch: &str) -> Result<ChatTemplate> {
        let (bos, eos) = model.bos_eos_text();
        if let Some(t) = user {
            if t.contains("{{") || t.contains("{%") {
                return Self::jinja(t, bos, eos).context("--chat-template");
            }
            Self::check_builtin(model, t).with_context(|| {
                format!("--chat-template {t:?} is not a template llama.cpp knows")
            })?;
            return Ok(ChatTemplate::Builtin(t.to_string()));
        }
        if let Some(src) = model.chat_template() {
            return Self::jinja(&src, bos, eos).context("the model's chat template");
        }
        // The family is the architecture without its version digits (gemma3 -> gemma).
        let family = arch.trim_end_matches(|c: char| c.is_ascii_digit());
        for cand in [arch, family, "chatml"] {
            if !cand.is_empty() && Self::check_builtin(model, cand).is_ok() {
                tracing::warn!(
                    "the model has no chat template; using llama.cpp's built-in '{cand}' template"
                );
                return Ok(ChatTemplate::Builtin(cand.to_string()));
            }
        }
        bail!("this model has no chat template; pass --chat-template NAME or use --prompt")
    }

    /// A Jinja template from its source; errors in the source show here.
    pub fn jinja(source: &str, bos: String, eos: String) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("template syntax: {e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| anyhow!("invalid Jinja template: {e:#}"))?;
        Ok(ChatTemplate::Jinja {
            env: Box::new(env),
            bos,
            eos,
        })
    }

    fn check_builtin(model: &Model, name: &str) -> Result<()> {
        model
            .apply_chat_template(name, &[("user".to_string(), "hi".to_string())], true)
            .map(|_| ())
    }

    /// What the template is, for logs and `inspect`.
    pub fn describe(&self) -> String {
        match self {
            ChatTemplate::Jinja { .. } => "jinja".to_string(),
            ChatTemplate::Builtin(n) => format!("llama.cpp built-in '{n}'"),
        }
    }

    /// A Jinja template's rendering (no model needed); an error for a built-in.
    pub fn render_jinja(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        match self {
            ChatTemplate::Jinja { env, bos, eos } => render_jinja(env, bos, eos, messages, add_generation_prompt),
            ChatTemplate::Builtin(name) => bail!("'{name}' is one of llama.cpp's built-in templates: it renders through a loaded model"),
        }
    }

    /// The conversation as text; `add_generation_prompt` opens the
    /// assistant's turn.
    pub fn render(
        &self,
        model: &Model,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        match self {
            ChatTemplate::Jinja { env, bos, eos } => {
                render_jinja(env, bos, eos, messages, add_generation_prompt)
            }
            ChatTemplate::Builtin(name) => {
                let pairs: Vec<(String, String)> = messages
                    .iter()
                    .map(|m| (m.role.clone(), m.content.clone()))
                    .collect();
                model.apply_chat_template(name, &pairs, add_generation_prompt)
            }
        }
    }
}

fn render_jinja(
    env: &Environment<'static>,
    bos: &str,
    eos: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    let tmpl = env
        .get_template(TEMPLATE_NAME)
        .map_err(|e| anyhow!("{e:#}"))?;
    let ctx = minijinja::context! {
        messages => Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
        tools => Value::from(()),
    };
    tmpl.render(ctx)
        .map_err(|e| anyhow!("chat template: {e:#}"))
}

/// `tojson` as Hugging Face defines it (`json.dumps(x, ensure_ascii=False)`):
/// Python's `", "` / `": "` separators, no HTML escaping; `indent=N` pretty.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let err = |e: serde_json::Error| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
    };
    let mut out = Vec::new();
    match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            value.serialize(&mut ser).map_err(err)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            value.serialize(&mut ser).map_err(err)?;
        }
    }
    let s = String::from_utf8(out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(s))
}

/// serde_json output with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, msgs: &[ChatMessage], gen: bool) -> Result<String> {
        match ChatTemplate::jinja(src, "<s>".into(), "</s>".into())? {
            ChatTemplate::Jinja { env, bos, eos } => render_jinja(&env, &bos, &eos, msgs, gen),
            ChatTemplate::Builtin(_) => unreachable!(),
        }
    }

    #[test]
    fn python_string_methods_and_controls() {
        let src = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
                   [{{ m.role.upper() }}|{{ m.content.strip() }}|{{ m.content.startswith(' hi') }}|{{ m.content.split(',') | length }}]\
                   {% endfor %}{{ bos_token }}{% if add_generation_prompt %}>{% endif %}";
        let msgs = [
            ChatMessage::new("user", " hi, there "),
            ChatMessage::new("assistant", "a,b,c"),
            ChatMessage::new("user", "x"),
        ];
        assert_eq!(
            render(src, &msgs, true).unwrap(),
            "[USER|hi, there|True|2][ASSISTANT|a,b,c|False|3]<s>>"
        );
    }

    #[test]
    fn tojson_is_pythons_and_items_work() {
        let src = "{{ {'a': 1, 'b': [1, 'x<y']} | tojson }}|{% for k, v in {'k': 'v'}.items() %}{{ k }}={{ v }}{% endfor %}";
        assert_eq!(
            render(src, &[], false).unwrap(),
            r#"{"a": 1, "b": [1, "x<y"]}|k=v"#
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}ok";
        let e = render(src, &[ChatMessage::new("system", "s")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("first message must be the user"), "{e}");
        assert_eq!(
            render(src, &[ChatMessage::new("user", "u")], false).unwrap(),
            "ok"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_as_hugging_face() {
        let src = "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
        assert_eq!(
            render(
                src,
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false
            )
            .unwrap(),
            "a\nb\n"
        );
    }

    #[test]
    fn bad_source_is_a_clear_error() {
        let e = ChatTemplate::jinja("{% for %}", String::new(), String::new())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("invalid Jinja template"), "{e}");
    }
}
