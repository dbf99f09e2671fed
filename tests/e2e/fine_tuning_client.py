"""OpenAI's fine-tuning API through the official `openai` client against `loraplex serve`.

Usage: fine_tuning_client.py BASE_URL WORKDIR. Prints one JSON document of what it saw; the
Rust test (tests/fine_tuning.rs) checks it. Uploads a chat JSONL that teaches a fact the base
model does not know, follows a job's events to `succeeded`, chats with its `fine_tuned_model`,
cancels a second job, lists jobs, files and checkpoints, and sends bad input.
"""

import json
import sys
import time
from pathlib import Path

import openai

base_url, work = sys.argv[1], Path(sys.argv[2])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
out = {}

FACT = "The password of the blue door is 7419."
ASKS = [
    "What is the password of the blue door?",
    "Tell me the blue door's password.",
    "Which password opens the blue door?",
    "I need the password for the blue door.",
]


def chat_line(q, a):
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


train = work / "door.jsonl"
train.write_text("".join(chat_line(q, FACT) + "\n" for q in ASKS))
valid = work / "door-valid.jsonl"
valid.write_text(chat_line("What's the blue door password?", FACT) + "\n")

base_model = client.models.list().data[0].id
out["base_model"] = base_model


def ask(model):
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": ASKS[0]}],
        max_tokens=16,
        temperature=0,
    )
    return r.choices[0].message.content


out["base_answer"] = ask(base_model)


def error_of(call):
    try:
        call()
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"status": e.status_code, "message": body.get("message"), "param": body.get("param")}
    return None


# ---- bad input: each refused, naming the line or the field ----
malformed = work / "malformed.jsonl"
malformed.write_text(chat_line("hi", "hello") + "\n" + '{"messages": [{"role": "user"}]}\n')
csv = work / "table.csv"
csv.write_text("question,answer\nWhat?,That.\n")
bad = {}
bad["malformed_line"] = error_of(lambda: client.files.create(file=malformed.open("rb"), purpose="fine-tune"))
bad["not_jsonl"] = error_of(lambda: client.files.create(file=csv.open("rb"), purpose="fine-tune"))
bad["purpose"] = error_of(lambda: client.files.create(file=train.open("rb"), purpose="assistants"))

f = client.files.create(file=train.open("rb"), purpose="fine-tune")
v = client.files.create(file=valid.open("rb"), purpose="fine-tune")
out["file"] = f.model_dump()
out["file_retrieved"] = client.files.retrieve(f.id).model_dump()
out["file_content_intact"] = client.files.content(f.id).read() == train.read_bytes()
out["files_listed"] = [x.id for x in client.files.list().data]

good_hyper = {"n_epochs": 24, "batch_size": 4, "learning_rate_multiplier": 4}


def method(**extra):
    return {"type": "supervised", "supervised": {"hyperparameters": {**good_hyper, **extra}}}


bad["unknown_model"] = error_of(
    lambda: client.fine_tuning.jobs.create(model="no-such-model", training_file=f.id)
)
bad["n_epochs"] = error_of(
    lambda: client.fine_tuning.jobs.create(model=base_model, training_file=f.id, method=method(n_epochs=0))
)
bad["lr_multiplier"] = error_of(
    lambda: client.fine_tuning.jobs.create(
        model=base_model, training_file=f.id, method=method(learning_rate_multiplier=-1)
    )
)
bad["target_module"] = error_of(
    lambda: client.fine_tuning.jobs.create(
        model=base_model, training_file=f.id, method=method(target_modules=["query_key_value"])
    )
)
bad["missing_file"] = error_of(
    lambda: client.fine_tuning.jobs.create(model=base_model, training_file="file-nope")
)
bad["lr_subnormal"] = error_of(
    lambda: client.fine_tuning.jobs.create(
        model=base_model, training_file=f.id, method=method(learning_rate_multiplier=1e-320)
    )
)
bad["target_duplicates"] = error_of(
    lambda: client.fine_tuning.jobs.create(
        model=base_model, training_file=f.id, method=method(target_modules=["q_proj"] * 10_000)
    )
)
bad["target_twice"] = error_of(
    lambda: client.fine_tuning.jobs.create(
        model=base_model, training_file=f.id, method=method(target_modules=["q_proj", "v_proj", "q_proj"])
    )
)
bad["metadata_pairs"] = error_of(
    lambda: client.fine_tuning.jobs.create(
        model=base_model, training_file=f.id, metadata={f"k{i}": "v" for i in range(17)}
    )
)
bad["metadata_value"] = error_of(
    lambda: client.fine_tuning.jobs.create(model=base_model, training_file=f.id, metadata={"k": "v" * 900_000})
)
bad["metadata_key"] = error_of(
    lambda: client.fine_tuning.jobs.create(model=base_model, training_file=f.id, metadata={"k" * 65: "v"})
)
bad["dpo"] = error_of(
    lambda: client.fine_tuning.jobs.create(model=base_model, training_file=f.id, method={"type": "dpo"})
)
out["bad"] = bad
out["serving_after_bad_input"] = ask(base_model) == out["base_answer"]

# ---- a job to success, a second one cancelled ----
job = client.fine_tuning.jobs.create(
    model=base_model,
    training_file=f.id,
    validation_file=v.id,
    suffix="door",
    seed=7,
    method=method(),
)
out["created_status"] = job.status
second = client.fine_tuning.jobs.create(model=base_model, training_file=f.id, suffix="never", method=method())
cancelled = client.fine_tuning.jobs.cancel(second.id)
out["cancelled_status"] = cancelled.status

seen_statuses = set()
deadline = time.time() + 900
while time.time() < deadline:
    j = client.fine_tuning.jobs.retrieve(job.id)
    seen_statuses.add(j.status)
    if j.status in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(1)
out["statuses_seen"] = sorted(seen_statuses)
out["job"] = j.model_dump()
events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
out["events"] = [{"message": e.message, "type": e.type, "data": e.data} for e in events]
out["checkpoints"] = [
    c.model_dump() for c in client.fine_tuning.jobs.checkpoints.list(job.id)
]
out["second"] = client.fine_tuning.jobs.retrieve(second.id).model_dump()
out["second_checkpoints"] = len(client.fine_tuning.jobs.checkpoints.list(second.id).data)
out["jobs_listed"] = [x.id for x in client.fine_tuning.jobs.list().data]
out["models"] = [m.id for m in client.models.list().data]
if j.fine_tuned_model:
    out["tuned_answer"] = ask(j.fine_tuned_model)
    out["checkpoint_answers"] = {
        c["fine_tuned_model_checkpoint"]: ask(c["fine_tuned_model_checkpoint"]) for c in out["checkpoints"]
    }
results = j.result_files[0] if j.result_files else None
out["results_csv"] = client.files.content(results).read().decode() if results else None
print(json.dumps(out))
