"""Tool calling in DeepSeek-V3's format (issue 23, part 2): the chat template, the parser on
DeepSeek's real tokens, then through a real server and the official openai client."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from forced_server import audited_prompts, deepseek_tokenizer_dir, encode, forced_server, make_deepseek_tiny

from inferd.server.tool_calls import ToolCallParser, call_prefill
from inferd.tokenizer import IncrementalDetokenizer, Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def call_text(name: str, arguments: str) -> str:
    return f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n{arguments}\n```<｜tool▁call▁end｜>"


def block(*calls: str) -> str:
    return "<｜tool▁calls▁begin｜>" + "\n".join(calls) + "<｜tool▁calls▁end｜>"


@pytest.fixture(scope="module")
def deepseek():
    return Tokenizer(deepseek_tokenizer_dir())


# ---- the template -----------------------------------------------------------------------------
def test_v3_template_renders_the_published_turn_format(deepseek):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>greeting</think>Hello!"},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    assert deepseek.apply_chat_template(messages) == (
        f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello!{EOS}<｜User｜>Weather in Paris?<｜Assistant｜>"
    )


def test_tool_calls_and_tool_outputs_render_in_deepseeks_tokens(deepseek):
    calls = [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    messages = [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "a", "content": "12C"},
        {"role": "tool", "tool_call_id": "b", "content": "10:00"},
    ]
    rendered = deepseek.apply_chat_template(messages)
    assert rendered == (
        f"{BOS}<｜User｜>Weather and time?<｜Assistant｜>"
        + block(call_text("get_weather", '{"city": "Paris"}'), call_text("get_time", "{}"))
        + EOS
        + "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>12C<｜tool▁output▁end｜>\n"
        "<｜tool▁output▁begin｜>10:00<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )
    # The answer after the outputs continues the assistant's turn, as the published template has it.
    final = deepseek.apply_chat_template(
        messages + [{"role": "assistant", "content": "12C at 10:00."}], add_generation_prompt=False
    )
    assert final == rendered + f"12C at 10:00.{EOS}"
    # Every marker is one token of DeepSeek's vocabulary.
    for marker in ("<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁end｜>"):
        assert len(encode(marker)) == 1


def test_tools_are_described_in_the_system_prompt(deepseek):
    rendered = deepseek.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"}],
        tools=[WEATHER],
        tool_instruction="You must answer by calling the function get_weather.",
    )
    system = rendered.split("<｜User｜>")[0]
    assert system.startswith(BOS + "Be brief.\n\n## Tools")
    assert "### get_weather\nThe weather in a city.\n" in system
    assert json.dumps(WEATHER["function"]["parameters"]) in system
    assert system.endswith("You must answer by calling the function get_weather.")
    assert rendered.endswith("<｜User｜>Paris?<｜Assistant｜>")


def tokenizer_with_template(tmp_path, template: str) -> Tokenizer:
    shutil.copy(deepseek_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": BOS, "chat_template": template}))
    return Tokenizer(tmp_path)


def test_a_template_without_tools_gets_deepseeks_in_its_own_flavour(tmp_path):
    # An R1 checkpoint's own template: it opens the thinking and knows nothing of tools.
    r1_like = "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜>{{ '<think>\\n' }}"
    tok = tokenizer_with_template(tmp_path, r1_like)
    messages = [{"role": "user", "content": "Paris?"}]
    assert tok.apply_chat_template(messages) == f"{BOS}<｜User｜>Paris?<｜Assistant｜><think>\n"
    with_tools = tok.apply_chat_template(messages, tools=[WEATHER])
    assert "### get_weather" in with_tools and with_tools.endswith("<｜User｜>Paris?<｜Assistant｜><think>\n")


def test_a_template_that_reads_tools_is_used_as_it_is(tmp_path):
    tok = tokenizer_with_template(
        tmp_path, "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{{ messages[0].content }}"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER, TIME]) == "[get_weather][get_time]hi"


# ---- the parser -------------------------------------------------------------------------------
def parse(deepseek, text: str, names=("get_weather", "get_time"), prefill: str = ""):
    """Feed `text` as the engine's detokenizer would (token by token); returns the parser and
    its deltas."""
    parser = ToolCallParser(set(names))
    parser.prime(prefill)
    detok, deltas = IncrementalDetokenizer(deepseek), []
    for t in encode(text):
        deltas += parser.feed(detok.add(t))
    return parser, deltas + parser.feed(detok.flush()) + parser.finish()


def content(deltas) -> str:
    return "".join(d.get("content", "") for d in deltas)


def test_calls_are_parsed_with_their_json_arguments(deepseek):
    text = "Let me check." + block(call_text("get_weather", '{"city": "Paris"}'), call_text("get_time", "{}"))
    parser, deltas = parse(deepseek, text)
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert content(deltas) == "Let me check." and not parser.errors
    # OpenAI's stream shape: per call, its index, id and name first, then its arguments.
    tool_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [d["index"] for d in tool_deltas] == [0, 0, 1, 1]
    assert tool_deltas[0]["id"].startswith("call_") and tool_deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert tool_deltas[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}


def test_a_call_split_character_by_character_is_the_same(deepseek):
    text = block(call_text("get_weather", '{"city": "Paris"}'))
    parser = ToolCallParser({"get_weather"})
    deltas = [d for ch in text for d in parser.feed(ch)] + parser.finish()
    assert [c.arguments for c in parser.calls] == ['{"city": "Paris"}'] and content(deltas) == ""


@pytest.mark.parametrize(
    "bad, error",
    [
        (call_text("get_weather", '{"city": Paris}'), "not valid JSON"),
        (call_text("get_weather", '["Paris"]'), "not a JSON object"),
        (call_text("delete_everything", "{}"), "not one of the request's tools"),
    ],
)
def test_an_invalid_call_is_reported_and_its_text_kept(deepseek, bad, error):
    parser, deltas = parse(deepseek, block(call_text("get_time", "{}"), bad))
    assert [c.name for c in parser.calls] == ["get_time"]
    assert error in parser.errors[0] and bad in content(deltas)


def test_a_call_cut_off_is_reported_and_its_text_kept(deepseek):
    cut = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"ci'
    parser, deltas = parse(deepseek, cut)
    assert not parser.calls and "cut off" in parser.errors[0] and '{"ci' in content(deltas)


def test_a_prefilled_call_is_completed_by_the_arguments_alone(deepseek):
    parser, deltas = parse(
        deepseek, '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', prefill=call_prefill("get_weather")
    )
    assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", '{"city": "Oslo"}')] and content(deltas) == ""


def test_text_without_calls_is_untouched(deepseek):
    text = "No tools needed: 2 < 3 and <｜tool is not a token."
    parser, deltas = parse(deepseek, text)
    assert content(deltas) == text and not parser.calls and not parser.errors


# ---- end to end (forced_server.py) ------------------------------------------------------------
SCRIPTS = {
    "ONE-CALL": "I will look." + block(call_text("get_weather", '{"city": "Paris"}')),
    "TWO-CALLS": block(call_text("get_weather", '{"city": "Paris"}'), call_text("get_time", "{}")),
    "BAD-JSON": block(call_text("get_weather", "{city: Paris}")),
    # For tool_choice naming get_weather: the prompt already holds the call's start.
    "NAMED": '{"city": "Rome"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "AFTER-TOOLS": "It is 12C in Paris.",
    # For tool_choice required: the prompt holds the block's start, the model picks the function.
    "REQUIRED": "get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
}


def ask(marker: str) -> list[dict]:
    return [{"role": "user", "content": f"{marker}: what is the weather in Paris?"}]


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    s = forced_server(make_deepseek_tiny(root / "model"), root / "data", SCRIPTS)
    yield s
    s.stop()


def test_tool_call_through_the_openai_client(v3):
    r = v3.client().chat.completions.create(model="tiny", messages=ask("ONE-CALL"), tools=[WEATHER, TIME], max_tokens=100)
    choice = choice0 = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice0.message.content == "I will look."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert "### get_weather" in audited_prompts(v3)[-1]  # the tools went into the prompt


def test_tool_calls_stream_as_deltas(v3):
    stream = v3.client().chat.completions.create(
        model="tiny", messages=ask("TWO-CALLS"), tools=[WEATHER, TIME], max_tokens=100, stream=True
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            entry["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_invalid_tool_json_is_reported_not_a_500(v3):
    r = v3.client().chat.completions.create(model="tiny", messages=ask("BAD-JSON"), tools=[WEATHER], max_tokens=100)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and not message.tool_calls
    assert "{city: Paris}" in message.content and "not valid JSON" in message.tool_call_error
    chunks = list(
        v3.client().chat.completions.create(model="tiny", messages=ask("BAD-JSON"), tools=[WEATHER], max_tokens=100, stream=True)
    )
    errors = [getattr(c.choices[0].delta, "tool_call_error", None) for c in chunks if c.choices]
    assert any(e and "not valid JSON" in e for e in errors)


def test_named_tool_choice_makes_the_answer_that_call(v3):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = v3.client().chat.completions.create(
        model="tiny", messages=ask("NAMED"), tools=[WEATHER, TIME], tool_choice=choice, max_tokens=50
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    assert audited_prompts(v3)[-1].endswith("<｜Assistant｜>" + call_prefill("get_weather"))


def test_required_tool_choice_makes_the_answer_a_call(v3):
    r = v3.client().chat.completions.create(
        model="tiny",
        messages=ask("REQUIRED"),
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=50,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    prompt = audited_prompts(v3)[-1]
    assert prompt.endswith("<｜Assistant｜>" + call_prefill(None))
    assert "You must answer by calling at least one of these functions. Call at most one function." in prompt


def test_tool_results_are_rendered_back_through_the_template(v3):
    history = ask("AFTER-TOOLS") + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12C, sunny"},
    ]
    r = v3.client().chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=50)
    assert r.choices[0].message.content == "It is 12C in Paris." and r.choices[0].finish_reason == "stop"
    prompt = audited_prompts(v3)[-1]
    assert prompt.endswith(
        block(call_text("get_weather", '{"city": "Paris"}'))
        + EOS
        + "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>12C, sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )


def test_tool_choice_none_leaves_tools_out(v3):
    r = v3.client().chat.completions.create(
        model="tiny", messages=ask("ONE-CALL"), tools=[WEATHER], tool_choice="none", max_tokens=100
    )
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert "## Tools" not in audited_prompts(v3)[-1]


DEEP: dict = {}
for _ in range(300):  # far deeper than any schema: a 400, not a RecursionError's 500
    DEEP = {"a": DEEP}

BAD = [
    ({"tool_choice": "auto"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not one of tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "more than once"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools.0.type", ""),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice", '"required"'),
    ({"tool_choice": {"type": "function"}, "tools": [WEATHER]}, "tool_choice", '"required"'),
    ({"parallel_tool_calls": "yes please", "tools": [WEATHER]}, "parallel_tool_calls", ""),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"description": "\ud800"}}}]},
        "tools.0.function.parameters",
        "lone surrogate",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}]},
        "tools.0.function.parameters",
        "levels deep",
    ),
    ({"messages": [{"role": "tool", "content": "12C"}]}, "messages.0", "tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0", "needs content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0", "tool_calls is for assistant"),
]


@pytest.mark.parametrize("extra, param, needle", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_tool_fields_are_a_400_naming_the_field(v3, extra, param, needle):
    body = {"model": "tiny", "messages": ask("ONE-CALL"), "max_tokens": 5} | extra
    headers = {"Authorization": f"Bearer {v3.keys['alice']}", "Content-Type": "application/json"}
    # json.dumps escapes a lone surrogate as \\ud800, as a client's JSON would carry it
    r = httpx.post(v3.url + "/v1/chat/completions", content=json.dumps(body), headers=headers, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and needle in error["message"], r.text


def test_tools_for_a_model_without_deepseeks_tool_tokens_are_a_400(llama_dir, tmp_path):
    from test_server import Server, post

    s = Server(llama_dir, tmp_path)
    try:
        r = post(s, {"model": "tiny", "messages": ask("x"), "tools": [WEATHER], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "tool-call tokens" in r.text, r.text
        # Without tools (or with tool_choice none) the same model serves as before.
        assert post(s, {"model": "tiny", "messages": ask("x"), "max_tokens": 2}).status_code == 200
        assert (
            post(
                s, {"model": "tiny", "messages": ask("x"), "tools": [WEATHER], "tool_choice": "none", "max_tokens": 2}
            ).status_code
            == 200
        )
    finally:
        s.stop()
