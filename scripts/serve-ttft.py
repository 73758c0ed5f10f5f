#!/usr/bin/env python3
"""Time to first token of a conversation's first and second turns against a
running `hypura serve`, with a ~1,500-token system prompt: the second turn
reuses the KV cache's prefix and prefills only its new tokens.

usage: serve-ttft.py BASE_URL   (standard library only)
"""

import http.client
import json
import sys
import time
import urllib.parse

base = urllib.parse.urlparse(sys.argv[1])
# About 1,500 tokens of varied text (SmolLM2: 1,5xx with the template) (a numbered list of facts).
facts = " ".join(f"Fact {i}: the number {i} squared is {i * i}, and its double is {2 * i}." for i in range(1, 58))
system = "You are a careful assistant. Use these notes when answering.\n" + facts


def turn(messages):
    c = http.client.HTTPConnection(base.hostname, base.port)
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": 16, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    ttft, text, usage = None, "", None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for ch in chunk.get("choices", []):
            if ch["delta"].get("content"):
                ttft = ttft or time.monotonic() - t0
                text += ch["delta"]["content"]
    return ttft, text, usage


msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What is 7 squared?"}]
# Something else first, so the first turn starts from an unrelated cache.
turn([{"role": "user", "content": "Hello"}])
t1, reply, u1 = turn(msgs)
msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And 9 squared?"}]
t2, _, u2 = turn(msgs)
print(f"turn 1: {u1['prompt_tokens']} prompt tokens, {u1['prompt_tokens_details']['cached_tokens']} cached, "
      f"first token after {t1 * 1000:.0f} ms")
print(f"turn 2: {u2['prompt_tokens']} prompt tokens, {u2['prompt_tokens_details']['cached_tokens']} cached, "
      f"first token after {t2 * 1000:.0f} ms ({t1 / t2:.1f}x faster)")
