"""DeepSeek-V3's tool calls, read out of the model's answer into OpenAI's `tool_calls`.

The model writes (tokens of its own vocabulary, see DEEPSEEK-FACTS.md):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {"arguments": "as JSON"}
    ```<｜tool▁call▁end｜>            (repeated per call, separated by a newline)
    <｜tool▁calls▁end｜>

Text before the block is the message's content. Each call is reported once it is complete, so
that its arguments are known to be JSON before a client sees them: a stream gives the call's id
and name, then its arguments, when the model closes the call. A call that is not valid (its
arguments not a JSON object, a function the request did not offer, cut off by max_tokens) is not
dropped and does not fail the request: its text stays in `content` and `tool_call_error` says
what was wrong.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
TOOL_TOKENS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

# One call between CALL_BEGIN and CALL_END: its type, its name, its arguments in a json code
# block (V3, R1); a bare JSON object after the name line is accepted too.
_CALL = re.compile(
    r"\s*" + re.escape(CALL_BEGIN) + r"(?P<type>[^\n]*?)" + re.escape(SEP) + r"(?P<name>[^\n]*)\n?"
    r"(?:```(?:json)?\s*\n(?P<fenced>.*?)\n?```|(?P<bare>.*))\s*\Z",
    re.DOTALL,
)


def call_prefill(name: str | None) -> str:
    """The start of a tool-call block the prompt is made to end with, so that the model's answer
    must be a call (tool_choice `required`: any function; a named function: that one)."""
    head = CALLS_BEGIN + CALL_BEGIN + "function" + SEP
    return head if name is None else head + name + "\n```json\n"


def _held(text: str, tag: str) -> int:
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str

    def body(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_call(raw: str, tool_names: set[str]) -> ToolCall | str:
    """One call's text (without CALL_END): the ToolCall, or what is wrong with it."""
    m = _CALL.match(raw)
    if m is None:
        return "a tool call the model wrote is not in DeepSeek's tool-call format"
    name = m["name"].strip()
    if name not in tool_names:
        return f"the model called {name[:100]!r}, which is not one of the request's tools"
    arguments = (m["fenced"] if m["fenced"] is not None else m["bare"]).strip()
    try:
        value = json.loads(arguments)
    except ValueError as e:
        return f"the model's call to {name!r} has arguments that are not valid JSON ({e})"
    if not isinstance(value, dict):
        return f"the model's call to {name!r} has arguments that are not a JSON object"
    return ToolCall("call_" + uuid.uuid4().hex[:24], name, arguments)


@dataclass
class ToolCallParser:
    """One choice's answer, split as it arrives into content and complete tool calls. `feed`
    and `finish` return a list of delta dicts in OpenAI's shape; `calls` and `errors` hold what
    was found, for the whole response."""

    tool_names: set[str]
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    state: str = "text"  # "text", then "block" from CALLS_BEGIN on, then "after" past CALLS_END
    buffer: str = ""

    def prime(self, text: str) -> None:
        """The part of the answer the prompt already wrote (call_prefill): parsed, not emitted."""
        self.buffer += text
        self._advance(final=False)

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        return self._advance(final=False)

    def finish(self) -> list[dict]:
        deltas = self._advance(final=True)
        if self.state == "block" and self.buffer.strip():
            self._fail("the model's tool call was cut off before it ended", self.buffer, deltas)
        self.buffer = ""
        return deltas

    def _fail(self, error: str, raw: str, deltas: list) -> None:
        self.errors.append(error)
        deltas.append({"content": raw, "tool_call_error": error})

    def _advance(self, final: bool) -> list[dict]:
        deltas: list[dict] = []
        while self.buffer:
            if self.state == "text":
                start = self.buffer.find(CALLS_BEGIN)
                cut = start if start >= 0 else len(self.buffer) - (0 if final else _held(self.buffer, CALLS_BEGIN))
                if cut:
                    deltas.append({"content": self.buffer[:cut]})
                self.buffer = self.buffer[cut:]
                if start < 0:
                    break
                self.buffer, self.state = self.buffer[len(CALLS_BEGIN) :], "block"
            elif self.state == "block":
                if not self._next_call(deltas):
                    break
            else:
                if self.buffer.strip():
                    deltas.append({"content": self.buffer})
                self.buffer = ""
        return deltas

    def _next_call(self, deltas: list) -> bool:
        """Take one complete call (or the block's end) off the buffer; False to wait for more."""
        head = self.buffer.lstrip()
        if head.startswith(CALLS_END):
            self.buffer, self.state = head[len(CALLS_END) :], "after"
            return True
        end = self.buffer.find(CALL_END)
        if end < 0:
            return False
        raw, self.buffer = self.buffer[:end], self.buffer[end + len(CALL_END) :]
        call = parse_call(raw, self.tool_names)
        if isinstance(call, str):
            self._fail(call, raw + CALL_END, deltas)
            return True
        index = len(self.calls)
        self.calls.append(call)
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        deltas.append({"tool_calls": [head]})
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
        return True
