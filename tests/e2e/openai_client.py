"""Drives a running `loraplex serve` with the official `openai` Python client.

Usage: python3 tests/e2e/openai_client.py BASE_URL
Prints one JSON object with what each call returned; tests/e2e_server.rs compares it with
`loraplex generate --json` for the same inputs.
"""
import json
import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="unused")
prompt = "The capital of France is"
out = {}

r = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=16, temperature=0)
out["completion"] = r.choices[0].text
assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 16, r.usage

r = client.completions.create(model="qa-r8", prompt=prompt, max_tokens=16, temperature=0)
out["completion_model_adapter"] = r.choices[0].text

r = client.completions.create(
    model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=16, temperature=0,
    extra_body={"adapters": [{"name": "qa-r8", "scale": 0.7}, {"name": "all-r16", "scale": 0.3}]},
)
out["completion_mix"] = r.choices[0].text
out["completion_mix_adapters"] = r.model_extra.get("adapters")

stream = client.completions.create(model="qa-r8", prompt=prompt, max_tokens=16, temperature=0, stream=True)
out["completion_stream"] = "".join(c.choices[0].text for c in stream if c.choices)

r = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=prompt, max_tokens=4, temperature=0, logprobs=5)
out["completion_logprobs"] = {
    "tokens": r.choices[0].logprobs.tokens,
    "token_logprobs": r.choices[0].logprobs.token_logprobs,
    "top_len": [len(t) for t in r.choices[0].logprobs.top_logprobs],
}

messages = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="rslora-r4", messages=messages, max_tokens=24, temperature=0)
out["chat"] = r.choices[0].message.content

stream = client.chat.completions.create(
    model="rslora-r4", messages=messages, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
parts, usage = [], None
for c in stream:
    if c.choices and c.choices[0].delta.content:
        parts.append(c.choices[0].delta.content)
    if c.usage:
        usage = c.usage.completion_tokens
out["chat_stream"] = "".join(parts)
out["chat_stream_usage"] = usage

r = client.chat.completions.create(
    model="SmolLM2-135M-Instruct.Q4_1", messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3,
)
out["chat_logprobs_top"] = [len(t.top_logprobs) for t in r.choices[0].logprobs.content]

try:
    client.completions.create(model="no-such-adapter", prompt=prompt, max_tokens=4)
    out["unknown_adapter_status"] = 200
except openai.NotFoundError as e:
    out["unknown_adapter_status"] = e.status_code

out["models"] = sorted(m.id for m in client.models.list().data)
print(json.dumps(out))
