"""Drives a running `loraplex serve` with the official `openai` Python client (pinned in
scripts/test-deps.sh): structured outputs, the sampling fields, vLLM's tokenize and adapter
endpoints. Usage: python3 tests/e2e/structured_client.py BASE_URL ADAPTERS_DIR
Prints one JSON object of what each call returned; tests/openai_surface.rs checks it.
"""
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, List, Literal

import jsonschema
import openai
from pydantic import BaseModel, Field

base, adapters_dir = sys.argv[1], sys.argv[2]
root = base[: -len("/v1")]
client = openai.OpenAI(base_url=base, api_key="unused")
BASE = "SmolLM2-135M-Instruct.Q4_1"
MIX = [{"name": "qa-r8", "scale": 0.6}, {"name": "all-r16", "scale": 0.4}]
out = {}


def raw(path, body):
    req = urllib.request.Request(root + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# 1. `parse` with a nested pydantic model: on the base, an adapter as `model`, and a mix.
class Address(BaseModel):
    city: str = Field(max_length=24)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    role: Literal["engineer", "doctor", "teacher"]
    address: Address
    skills: List[Annotated[str, Field(max_length=16)]] = Field(max_length=3)


messages = [{"role": "user", "content": "Invent a person and give their details as JSON."}]
parsed = {}
for label, model, extra in [("base", BASE, None), ("adapter", "qa-r8", None), ("mix", BASE, {"adapters": MIX})]:
    r = client.beta.chat.completions.parse(
        model=model, messages=messages, response_format=Person, max_tokens=160, temperature=0, extra_body=extra,
    )
    msg = r.choices[0].message
    parsed[label] = {
        "finish_reason": r.choices[0].finish_reason,
        "parsed": msg.parsed.model_dump() if msg.parsed else None,
        "content": msg.content,
        "adapters": (r.model_extra or {}).get("adapters"),
    }
out["parse"] = parsed

# 2. json_object: valid JSON (both endpoints), streamed too.
ask = [{"role": "user", "content": "Give me a JSON object with a name and an age."}]
r = client.chat.completions.create(
    model="all-r16", messages=ask, response_format={"type": "json_object"}, max_tokens=120, temperature=0,
)
out["json_object_chat"] = {"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason}
stream = client.chat.completions.create(
    model="all-r16", messages=ask, response_format={"type": "json_object"}, max_tokens=120, temperature=0, stream=True,
)
out["json_object_stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
r = client.completions.create(
    model=BASE, prompt="A JSON object describing a dog:", max_tokens=120, temperature=0,
    extra_body={"response_format": {"type": "json_object"}, "adapters": MIX},
)
out["json_object_completion"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason}

# 3. Validity: 200 constrained completions over 12 schemas, four mixes, sampled.
schemas = {
    "nested_object": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30}, "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "born": {"type": "integer", "minimum": 1800, "maximum": 2020}}, "required": ["name", "born"], "additionalProperties": False}}, "required": ["title", "author"], "additionalProperties": False},
    "bounded_array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 50}, "minItems": 2, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L"]}}, "required": ["color", "size"], "additionalProperties": False},
    "number_ranges": {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -40, "maximum": 60}, "humidity": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100}}, "required": ["temperature", "humidity"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 8}]}, "ok": {"type": "boolean"}}, "required": ["id", "ok"], "additionalProperties": False},
    "ref_defs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}, "y": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["x", "y"], "additionalProperties": False}}, "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}, "required": ["start", "end"], "additionalProperties": False},
    "closed_optional": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": False},
    "string_pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}, "required": ["code", "date"], "additionalProperties": False},
    "array_of_objects": {"type": "array", "items": {"type": "object", "properties": {"item": {"type": "string", "maxLength": 15}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["item", "qty"], "additionalProperties": False}, "minItems": 1, "maxItems": 3},
    "const_and_bool": {"type": "object", "properties": {"version": {"const": 2}, "active": {"type": "boolean"}, "kind": {"const": "user"}}, "required": ["version", "active", "kind"], "additionalProperties": False},
    "string_lengths": {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}, "words": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 6}, "maxItems": 3}}, "required": ["word", "words"], "additionalProperties": False},
    "nullable_union": {"type": "object", "properties": {"score": {"type": ["number", "null"], "minimum": 0, "maximum": 10}, "note": {"type": ["string", "null"], "maxLength": 12}}, "required": ["score", "note"], "additionalProperties": False},
}
mixes = [(BASE, None), ("qa-r8", None), ("all-r16", None), (BASE, {"adapters": MIX})]
jobs = []
for i in range(200):
    name = list(schemas)[i % len(schemas)]
    model, extra = mixes[(i // len(schemas)) % len(mixes)]
    jobs.append((i, name, model, extra))


def run(job):
    i, name, model, extra = job
    body = dict(extra or {})
    body["response_format"] = {"type": "json_schema", "json_schema": {"name": name, "schema": schemas[name], "strict": True}}
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Give an example of `{name}` data as JSON."}],
        max_tokens=96, temperature=0.8, seed=i, extra_body=body,
    )
    c = r.choices[0]
    if c.finish_reason == "length":
        return name, "length", None
    try:
        jsonschema.validate(json.loads(c.message.content), schemas[name])
        return name, "valid", None
    except Exception as e:  # noqa: BLE001 (reported, counted)
        return name, "invalid", f"{c.message.content!r}: {e}"


with ThreadPoolExecutor(16) as pool:
    results = list(pool.map(run, jobs))
out["validity"] = {
    "total": len(results),
    "schemas": len(schemas),
    "valid": sum(r[1] == "valid" for r in results),
    "length": sum(r[1] == "length" for r in results),
    "invalid": [r[2] for r in results if r[1] == "invalid"],
    "length_by_schema": {n: sum(1 for r in results if r[0] == n and r[1] == "length") for n in schemas},
}

# 4. vLLM's structured_outputs: choice and regex.
r = client.completions.create(model=BASE, prompt="Is water wet? Answer:", max_tokens=8, temperature=0,
                              extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
out["choice"] = r.choices[0].text
r = client.completions.create(model="qa-r8", prompt="Call me at", max_tokens=16, temperature=0,
                              extra_body={"structured_outputs": {"regex": r" [0-9]{3}-[0-9]{4}"}})
out["regex"] = r.choices[0].text

# 5. The sampling fields.
prompt = "The capital of France is"
tok = json.loads(raw("/tokenize", {"prompt": " Lyon", "add_special_tokens": False})[1])["tokens"]
r = client.completions.create(model=BASE, prompt=prompt, max_tokens=3, temperature=0, logit_bias={str(tok[0]): 100})
out["logit_bias"] = {"forced": tok[0], "text": r.choices[0].text}
free = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0)
free_ids = json.loads(raw("/tokenize", {"prompt": free.choices[0].text, "add_special_tokens": False})[1])["tokens"]
out["free"] = free.choices[0].text
r = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0, extra_body={"stop_token_ids": [free_ids[2]]})
out["stop_token_ids"] = {"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason, "stop_id": free_ids[2]}
short = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Say hi."}], max_tokens=60, temperature=0)
n = short.usage.completion_tokens
r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Say hi."}], max_tokens=60, temperature=0, extra_body={"min_tokens": n + 8})
out["min_tokens"] = {"free_tokens": n, "free_finish": short.choices[0].finish_reason, "tokens": r.usage.completion_tokens, "min": n + 8}
r = client.completions.create(model=BASE, prompt="List: apple, apple, apple,", max_tokens=12, temperature=0, extra_body={"repetition_penalty": 1.8})
base_rep = client.completions.create(model=BASE, prompt="List: apple, apple, apple,", max_tokens=12, temperature=0)
out["repetition_penalty"] = {"penalised": r.choices[0].text, "free": base_rep.choices[0].text}
r = client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=1.0, seed=3, extra_body={"min_p": 0.9})
out["min_p_greedy_like"] = r.choices[0].text

# 6. vLLM's tokenize / detokenize, and its adapter endpoints.
s, body = raw("/tokenize", {"prompt": prompt, "return_token_strs": True})
t = json.loads(body)
s2, body2 = raw("/detokenize", {"tokens": t["tokens"]})
s3, body3 = raw("/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
out["tokenize"] = {"status": s, "count": t["count"], "strs": t["token_strs"], "detok_status": s2, "detok": json.loads(body2)["prompt"], "chat_count": json.loads(body3)["count"]}
out["load_lora"] = [
    raw("/v1/load_lora_adapter", {"lora_name": "extra-qa", "lora_path": adapters_dir + "/qa-r8"}),
    raw("/v1/load_lora_adapter", {"lora_name": "extra-qa", "lora_path": "qa-r8"}),
    raw("/v1/load_lora_adapter", {"lora_name": "extra-qa", "lora_path": "qa-r8", "load_inplace": True}),
    raw("/v1/load_lora_adapter", {"lora_name": "elsewhere", "lora_path": "/tmp"}),
]
r = client.completions.create(model="extra-qa", prompt=prompt, max_tokens=8, temperature=0)
out["loaded_adapter_text"] = r.choices[0].text
r = client.completions.create(model="qa-r8", prompt=prompt, max_tokens=8, temperature=0)
out["same_folder_text"] = r.choices[0].text
out["retrieved"] = client.models.retrieve("extra-qa").model_dump()
out["unload_lora"] = [
    raw("/v1/unload_lora_adapter", {"lora_name": "extra-qa"}),
    raw("/v1/unload_lora_adapter", {"lora_name": "never-loaded"}),
    # vLLM's semantics: gone, so a second unload is a 404 too.
    raw("/v1/unload_lora_adapter", {"lora_name": "extra-qa"}),
]
out["listed_after_unload"] = "extra-qa" in [m.id for m in client.models.list().data]
try:
    client.completions.create(model="extra-qa", prompt=prompt, max_tokens=2)
    out["request_after_unload"] = 200
except openai.APIStatusError as e:
    out["request_after_unload"] = e.status_code
try:
    client.models.retrieve("extra-qa")
    out["retrieve_after_unload"] = 200
except openai.APIStatusError as e:
    out["retrieve_after_unload"] = e.status_code
# Loaded again, it serves again.
out["reload_status"] = raw("/v1/load_lora_adapter", {"lora_name": "extra-qa", "lora_path": "qa-r8"})[0]
out["listed_after_reload"] = "extra-qa" in [m.id for m in client.models.list().data]

# 7. Tool calling: a round trip (call → result → answer) with `required` and a named
# function, streamed and not, on an adapter as `model` and on a mix through `adapters`.
tools = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": False}}},
]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_calls(stream):
    calls, finish, content = {}, None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish, content


rounds = {}
for label, model, extra, choice in [
    ("required_adapter", "qa-r8", None, "required"),
    ("named_mix", BASE, {"adapters": MIX}, {"type": "function", "function": {"name": "get_weather"}}),
]:
    r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=choice, parallel_tool_calls=False, max_tokens=96, temperature=0, extra_body=extra)
    msg = r.choices[0].message
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []]
    s_calls, s_finish, s_content = streamed_calls(client.chat.completions.create(
        model=model, messages=ask, tools=tools, tool_choice=choice, parallel_tool_calls=False, max_tokens=96, temperature=0, extra_body=extra, stream=True))
    history = ask + [msg.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"temperature": 18, "unit": "celsius"})} for c in calls
    ]
    answer = client.chat.completions.create(model=model, messages=history, tools=tools, tool_choice="none", max_tokens=48, temperature=0, extra_body=extra)
    a_calls, a_finish, a_content = streamed_calls(client.chat.completions.create(
        model=model, messages=history, tools=tools, tool_choice="none", max_tokens=48, temperature=0, extra_body=extra, stream=True))
    schemas_by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}

    def valid(c):
        try:
            jsonschema.validate(json.loads(c["arguments"]), schemas_by_name[c["name"]])
            return True
        except Exception:  # noqa: BLE001 (reported)
            return False

    rounds[label] = {
        "calls_valid": all(valid(c) for c in calls + s_calls),
        "finish_reason": r.choices[0].finish_reason,
        "content": msg.content,
        "calls": calls,
        "stream_calls": s_calls,
        "stream_finish": s_finish,
        "stream_content": s_content,
        "answer_finish": answer.choices[0].finish_reason,
        "answer": answer.choices[0].message.content,
        "answer_calls": len(answer.choices[0].message.tool_calls or []),
        "answer_stream": a_content,
        "answer_stream_calls": len(a_calls),
        "adapters": (r.model_extra or {}).get("adapters"),
    }
# `auto`: the model may answer or call; either way the answer is well-formed.
r = client.chat.completions.create(model=BASE, messages=ask, tools=tools, tool_choice="auto", max_tokens=60, temperature=0)
c = r.choices[0]
rounds["auto"] = {"finish_reason": c.finish_reason, "content": c.message.content,
                  "calls": [{"name": t.function.name, "arguments": t.function.arguments} for t in c.message.tool_calls or []]}
out["tools"] = rounds

# 8. Stateless /v1/responses: text, a function tool round trip (on a mix through `adapters`
# and on an adapter as `model`), streamed events, text.format through `responses.parse`.
resp_tools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
               "parameters": t["function"]["parameters"], "strict": True} for t in tools]
r = client.responses.create(model="qa-r8", input="What is the capital of France?", max_output_tokens=24, temperature=0, store=False)
chat_same = client.chat.completions.create(model="qa-r8", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0)
responses = {"text": r.output_text, "status": r.status, "usage": [r.usage.input_tokens, r.usage.output_tokens],
             "chat_text": chat_same.choices[0].message.content, "chat_usage": [chat_same.usage.prompt_tokens, chat_same.usage.completion_tokens]}
for label, model, extra in [("mix", BASE, {"adapters": MIX}), ("adapter", "all-r16", None)]:
    r = client.responses.create(model=model, input="What is the weather in Rome?", tools=resp_tools, tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=80, temperature=0, store=False, extra_body=extra)
    calls = [o for o in r.output if o.type == "function_call"]
    follow = client.responses.create(
        model=model, tools=resp_tools, tool_choice="none", max_output_tokens=40, temperature=0, store=False, extra_body=extra,
        input=[{"role": "user", "content": "What is the weather in Rome?"}] + [c.model_dump(exclude_none=True) for c in calls]
        + [{"type": "function_call_output", "call_id": c.call_id, "output": json.dumps({"temperature": 21})} for c in calls],
    )
    with client.responses.stream(model=model, input="What is the weather in Rome?", tools=resp_tools, tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=80, temperature=0, store=False, extra_body=extra) as st:
        kinds = [e.type for e in st]
        final = st.get_final_response()
    schemas_by_name = {t["name"]: t["parameters"] for t in resp_tools}
    responses[label] = {
        "status": r.status,
        "calls": [{"name": c.name, "arguments": c.arguments, "call_id": c.call_id} for c in calls],
        "calls_valid": all(jsonschema.Draft202012Validator(schemas_by_name[c.name]).is_valid(json.loads(c.arguments)) for c in calls),
        "follow_status": follow.status,
        "follow_text": follow.output_text,
        "stream_events": kinds,
        "stream_calls": [{"name": o.name, "arguments": o.arguments} for o in final.output if o.type == "function_call"],
        "adapters": (r.model_extra or {}).get("adapters"),
    }
with client.responses.stream(model=BASE, input="Say hello.", max_output_tokens=60, temperature=0, store=False) as st:
    deltas = "".join(e.delta for e in st if e.type == "response.output_text.delta")
    final = st.get_final_response()
responses["stream_text"] = {"deltas": deltas, "final": final.output_text}


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)


r = client.responses.parse(model=BASE, input="Name a city and its country.", text_format=City, max_output_tokens=60,
                           temperature=0, store=False, extra_body={"adapters": MIX})
responses["parsed"] = r.output_parsed.model_dump() if r.output_parsed else None
try:
    client.responses.create(model=BASE, input="x", store=True)
    responses["store_true"] = None
except openai.BadRequestError as e:
    responses["store_true"] = {"status": e.status_code, "param": e.body.get("param") if isinstance(e.body, dict) else None}
out["responses"] = responses

# 9. Bad input through the SDK: each a 400 naming the field; the server keeps serving.
bad = {}
for label, kwargs in [
    ("invalid_schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}),
    ("unsupported_keyword", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "not": {"const": "a"}}}}}),
    ("logit_bias_key", {"logit_bias": {"abc": 1}}),
    ("logit_bias_value", {"logit_bias": {"5": 1000}}),
    ("tool_parameters", {"tools": [{"type": "function", "function": {"name": "f", "parameters": "nope"}}]}),
    ("tool_choice_unknown", {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
]:
    try:
        client.chat.completions.create(model=BASE, messages=messages, max_tokens=4, **kwargs)
        bad[label] = None
    except openai.BadRequestError as e:
        bad[label] = {"status": e.status_code, "param": e.body.get("param") if isinstance(e.body, dict) else None, "message": e.message}
out["bad"] = bad
r = client.completions.create(model=BASE, prompt=prompt, max_tokens=4, temperature=0)
out["still_serving"] = r.choices[0].text

print(json.dumps(out))
