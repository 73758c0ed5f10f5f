#!/usr/bin/env python3
"""Reference renderings of the test models' chat templates, made with an
independent Jinja implementation (Python's jinja2, configured as Hugging
Face's `apply_chat_template`: trim_blocks, lstrip_blocks, loop controls,
raise_exception, an unescaped tojson). Run once when writing the tests; the
outputs are committed under tests/data/chat/ and tests/chat_templates.rs
compares Hypura's rendering (minijinja) with them.

    python3 -m venv target/refs-venv && target/refs-venv/bin/pip install gguf jinja2
    target/refs-venv/bin/python scripts/chat-template-refs.py models tests/data/chat
"""
import json
import sys
from pathlib import Path

import jinja2
from gguf import GGUFReader
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen05": "qwen2.5-coder-0.5b-q4_k_m.gguf",
    "qwen15": "qwen2.5-coder-1.5b-q4_k_m.gguf",
}

# The conversations the test feeds, one user line per turn (the test's
# replies are the model's, so only the first turn's prompt is fixed text).
CASES = {
    "system_user": [
        {"role": "system", "content": "You are a terse assistant. Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "user_only": [
        {"role": "user", "content": "Say hi, then stop."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Germany? Say it 'quoted' & \"double\"."},
    ],
}


def field_str(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def token_text(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return ""
    tid = int(f.parts[f.data[0]][0])
    toks = reader.fields["tokenizer.ggml.tokens"]
    return bytes(toks.parts[toks.data[tid]]).decode("utf-8")


def raise_exception(msg):
    raise jinja2.exceptions.TemplateError(msg)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main(models_dir, out_dir):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, file in MODELS.items():
        r = GGUFReader(str(Path(models_dir) / file))
        src = field_str(r, "tokenizer.chat_template")
        tmpl = env.from_string(src)
        for case, messages in CASES.items():
            text = tmpl.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=token_text(r, "tokenizer.ggml.bos_token_id"),
                eos_token=token_text(r, "tokenizer.ggml.eos_token_id"),
                tools=None,
            )
            p = out / f"{name}.{case}.txt"
            p.write_text(text, encoding="utf-8")
            print(f"wrote {p} ({len(text)} chars)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
