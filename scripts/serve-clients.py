#!/usr/bin/env python3
"""Drives a running `hypura serve` through the real `openai` and `ollama`
Python packages: list models, chat and generate (streaming and not), stop
sequences, usage, seed reproducibility, JSON output, greedy text equal to
`hypura run --temp 0` for the same prompt.

usage: serve-clients.py BASE_URL MODEL_NAME PROMPT N_TOKENS GREEDY_TEXT_FILE
Exits non-zero (with the failed check) on the first failure.
"""

import json
import sys

import ollama
import openai

base, name, prompt, n, greedy_file = sys.argv[1:6]
n = int(n)
with open(greedy_file, encoding="utf-8") as f:
    greedy = f.read()

checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


# ---- openai ----
oa = openai.OpenAI(base_url=base + "/v1", api_key="unused")
ids = [m.id for m in oa.models.list().data]
check(ids == [name], f"openai models.list: {ids}")

r = oa.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=n)
check(r.choices[0].text == greedy, f"openai completion greedy {r.choices[0].text!r} != {greedy!r}")
check(r.choices[0].finish_reason == "length", "openai completion finish_reason")
check(r.usage.completion_tokens == n, f"openai completion usage {r.usage}")

text = "".join(
    c.choices[0].text
    for c in oa.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=n, stream=True)
    if c.choices
)
check(text == greedy, f"openai streamed completion greedy {text!r}")

msgs = [{"role": "user", "content": "Name three colours."}]
r = oa.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=16)
reply = r.choices[0].message.content
check(r.choices[0].message.role == "assistant" and reply, f"openai chat: {r}")
u = r.usage
check(u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens, f"openai usage {u}")

chunks = list(
    oa.chat.completions.create(
        model=name, messages=msgs, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    )
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(text == reply, f"openai streamed chat {text!r} != {reply!r}")
check(chunks[-1].usage is not None and chunks[-1].choices == [], "openai include_usage chunk")
check(chunks[-1].usage.completion_tokens == u.completion_tokens, "openai streamed usage")

half = len(reply) // 2
stop = reply[half:half + 3]
r = oa.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=16, stop=[stop])
check(r.choices[0].message.content == reply[: reply.find(stop)], f"openai stop {stop!r}: {r.choices[0].message.content!r}")
check(r.choices[0].finish_reason == "stop", "openai stop finish_reason")

turn2 = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And three animals?"}]
r = oa.chat.completions.create(model=name, messages=turn2, temperature=0, max_tokens=8)
cached = r.usage.prompt_tokens_details.cached_tokens
turn2_tokens = r.usage.prompt_tokens
check(cached > 0 and cached < r.usage.prompt_tokens, f"openai cached_tokens {r.usage}")

a = oa.completions.create(model=name, prompt="Once upon a time", temperature=1.0, seed=77, max_tokens=16)
b = oa.completions.create(model=name, prompt="Once upon a time", temperature=1.0, seed=77, max_tokens=16)
check(a.choices[0].text == b.choices[0].text, "openai seed reproducibility")

r = oa.chat.completions.create(
    model=name, messages=[{"role": "user", "content": "A JSON object with a name."}],
    temperature=0, max_tokens=48, response_format={"type": "json_object"},
)
out = r.choices[0].message.content.strip()
check(out.startswith("{"), f"openai json_object {out!r}")
if r.choices[0].finish_reason == "stop":
    json.loads(out)

# A JSON schema (llama.cpp's schema -> grammar converter): a document of it.
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
    "required": ["colour", "legs"],
    "additionalProperties": False,
}


def check_schema_doc(out, what):
    doc = json.loads(out)
    check(set(doc) == {"colour", "legs"} and doc["colour"] in ("red", "green", "blue") and 0 <= doc["legs"] <= 8, f"{what}: {out!r}")


r = oa.chat.completions.create(
    model=name, messages=[{"role": "user", "content": "A spider as JSON."}], temperature=0.7, seed=9, max_tokens=96,
    response_format={"type": "json_schema", "json_schema": {"name": "animal", "strict": True, "schema": SCHEMA}},
)
check(r.choices[0].finish_reason == "stop", "openai json_schema finished")
check_schema_doc(r.choices[0].message.content, "openai json_schema")

try:
    oa.chat.completions.create(model=name, messages=msgs, n=2)
    check(False, "openai n=2 accepted")
except openai.BadRequestError as e:
    check(e.status_code == 400 and "n must be 1" in str(e), f"openai n=2: {e}")

# ---- ollama ----
ol = ollama.Client(host=base)
names = [m.model for m in ol.list().models]
check(names == [name], f"ollama list: {names}")
s = ol.show(name)
check(s.modelfile and s.template and s.details.format == "gguf", f"ollama show: {s}")
check(s.modelinfo["general.architecture"] == "llama", "ollama show model_info")

r = ol.generate(model=name, prompt=prompt, raw=True, options={"temperature": 0, "num_predict": n})
check(r.response == greedy, f"ollama generate greedy {r.response!r}")
check(r.done and r.done_reason == "length" and r.eval_count == n, f"ollama generate final {r}")
check(r.prompt_eval_count > 0 and r.total_duration > 0 and r.context, "ollama generate counters")

text = "".join(
    c.response
    for c in ol.generate(model=name, prompt=prompt, raw=True, stream=True, options={"temperature": 0, "num_predict": n})
)
check(text == greedy, f"ollama streamed generate {text!r}")

r = ol.chat(model=name, messages=msgs, options={"temperature": 0, "num_predict": 16})
check(r.message.content == reply, f"ollama chat {r.message.content!r} != openai {reply!r}")
parts = list(ol.chat(model=name, messages=msgs, stream=True, options={"temperature": 0, "num_predict": 16}))
check("".join(p.message.content for p in parts) == reply, "ollama streamed chat")
check(parts[-1].done and parts[-1].eval_count > 0, "ollama streamed chat final")

r = ol.chat(model=name, messages=msgs, options={"temperature": 0, "num_predict": 16, "stop": [stop]})
check(r.message.content == reply[: reply.find(stop)] and r.done_reason == "stop", f"ollama stop {r}")

r2 = ol.chat(model=name, messages=turn2, options={"temperature": 0, "num_predict": 8})
check(
    r2.prompt_eval_count < turn2_tokens / 2,
    f"ollama second turn evaluated {r2.prompt_eval_count} of {turn2_tokens} prompt tokens",
)

a = ol.generate(model=name, prompt="Once upon a time", raw=True, options={"temperature": 1.0, "seed": 5, "num_predict": 16})
b = ol.generate(model=name, prompt="Once upon a time", raw=True, options={"temperature": 1.0, "seed": 5, "num_predict": 16})
check(a.response == b.response, "ollama seed reproducibility")

r = ol.generate(model=name, prompt="Describe a cat as JSON.", format="json", options={"temperature": 0, "num_predict": 48})
out = r.response.strip()
check(out.startswith("{"), f"ollama format json {out!r}")
if r.done_reason == "stop":
    json.loads(out)

r = ol.generate(model=name, prompt="A cat as JSON.", format=SCHEMA, options={"temperature": 0.7, "seed": 4, "num_predict": 96})
check(r.done_reason == "stop", "ollama format schema finished")
check_schema_doc(r.response, "ollama format schema")

try:
    ol.generate(model=name, prompt="x", options={"top_p": 7})
    check(False, "ollama top_p 7 accepted")
except ollama.ResponseError as e:
    check(e.status_code == 400 and "top_p" in e.error, f"ollama bad option: {e}")

print(f"{checks} passed, 0 failed")
