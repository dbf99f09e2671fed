"""Agent frameworks against a running `loraplex serve`, unchanged (versions pinned in
scripts/test-deps.sh): the OpenAI Agents SDK (an Agent with a function tool and a pydantic
`output_type`, on the Chat Completions model and on the default Responses model, on an
adapter and on a mix) and langchain-openai (`bind_tools` round trip, `with_structured_output`
by json_schema and by function calling).

Usage: agents_client.py BASE_URL. Prints one JSON document of what each framework got back;
tests/agents.rs checks it. A framework's exception is recorded with its type and message.
"""

import json
import sys
import traceback

from pydantic import BaseModel, Field

base = sys.argv[1]
out = {}
MIX = [{"name": "qa-r8", "scale": 0.6}, {"name": "all-r16", "scale": 0.4}]


class Weather(BaseModel):
    # Bounded so that a small model's greedy text cannot run past the token limit.
    city: str = Field(max_length=40)
    summary: str = Field(max_length=80)


def record(key, fn):
    try:
        out[key] = {"ok": True, **fn()}
    except Exception as e:  # what the framework raised is the finding
        out[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-2000:]}


# ---- the OpenAI Agents SDK ----
from agents import (  # noqa: E402
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI  # noqa: E402

set_tracing_disabled(True)
client = AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
tool_calls = []


@function_tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    tool_calls.append(city)
    return f"It is 18 C and sunny in {city}."


def agent_run(model_cls, model_name, extra, tool_choice):
    """An agent with a tool and a typed output: both go to the server in every request (the
    body the SDK sends: `tools` and `response_format` / `text.format`). With `required` and
    `stop_on_first_tool` the call is the answer (the call path); with `none` the text is, and
    it must parse as the output type (the format path)."""
    def run():
        tool_calls.clear()
        model = model_cls(model=model_name, openai_client=client)
        settings = ModelSettings(temperature=0, max_tokens=160, tool_choice=tool_choice,
            parallel_tool_calls=False, extra_body=extra)
        agent = Agent(
            name="weather",
            instructions="Answer with the city and a short summary of its weather.",
            tools=[get_weather],
            output_type=Weather,
            model=model,
            model_settings=settings,
            tool_use_behavior="stop_on_first_tool" if tool_choice == "required" else "run_llm_again",
        )
        result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3,
            run_config=RunConfig(tracing_disabled=True))
        final = result.final_output
        return {"final": final.model_dump() if isinstance(final, BaseModel) else final,
                "typed": isinstance(final, Weather), "tool_calls": list(tool_calls)}
    return run


for api, cls in [("chat", OpenAIChatCompletionsModel), ("responses", OpenAIResponsesModel)]:
    for what, model, extra in [("adapter", "qa-r8", None), ("mix", "SmolLM2-135M-Instruct.Q4_1", {"adapters": MIX})]:
        record(f"agents_{api}_{what}_call", agent_run(cls, model, extra, "required"))
        record(f"agents_{api}_{what}_typed", agent_run(cls, model, extra, "none"))

# ---- langchain-openai ----
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402


@tool
def weather(city: str) -> str:
    """The current weather in a city."""
    return f"It is 18 C and sunny in {city}."


llm = ChatOpenAI(base_url=base, api_key="unused", model="qa-r8", temperature=0, max_tokens=200, max_retries=0)


def bind_tools_round_trip():
    bound = llm.bind_tools([weather], tool_choice="weather")
    ask = [HumanMessage("What is the weather in Paris?")]
    first = bound.invoke(ask)
    call = first.tool_calls[0]
    result = weather.invoke(call["args"])
    second = llm.bind_tools([weather]).invoke(ask + [first, ToolMessage(result, tool_call_id=call["id"])])
    return {"call": {"name": call["name"], "args": call["args"]},
            "second": {"content": second.content if isinstance(second.content, str) else repr(second.content),
                       "tool_calls": [c["name"] for c in second.tool_calls]}}


def structured(method):
    def run():
        got = llm.with_structured_output(Weather, method=method).invoke("Describe the weather in Paris.")
        return {"typed": isinstance(got, Weather), "value": got.model_dump() if isinstance(got, BaseModel) else repr(got)}
    return run


record("langchain_bind_tools", bind_tools_round_trip)
record("langchain_structured_json_schema", structured("json_schema"))
record("langchain_structured_function_calling", structured("function_calling"))

print(json.dumps(out, indent=1))
