"""OpenAI's response shapes: completion and chat completion bodies, their choices and usage,
and the server-sent events of a stream."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from inferd.outputs import RequestOutput
from inferd.server.reasoning import ReasoningMode, parser_for
from inferd.server.tool_calls import ToolCallParser

DONE_EVENT = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def usage_body(prompt_len: int, n: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """`cached_tokens`: of the prompt tokens (all n choices'), those the prefix cache held."""
    prompt_tokens = prompt_len * n
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class ChatShape:
    """How a chat request's answers are read: R1 thinking split off (`reasoning`, see
    reasoning.py), DeepSeek tool calls parsed (`tool_names` not None, see tool_calls.py), and the
    start of a tool call the prompt already wrote (`prefill`, for tool_choice required/named)."""

    reasoning: ReasoningMode = "none"
    prompt_text: str = ""
    tool_names: set[str] | None = None
    prefill: str = ""

    def parser(self) -> ChoiceParser:
        return ChoiceParser(self)


@dataclass
class ChoiceParser:
    """One choice's text deltas turned into chat delta dicts (reasoning_content, content,
    tool_calls, tool_call_error); `message` gathers them into a whole response's message."""

    shape: ChatShape
    deltas: list[dict] = field(default_factory=list)
    done: bool = False  # fed its final text

    def __post_init__(self):
        self.reasoning = parser_for(self.shape.reasoning, self.shape.prompt_text)
        self.tools = None
        if self.shape.tool_names is not None:
            self.tools = ToolCallParser(self.shape.tool_names)
            self.tools.prime(self.shape.prefill)

    def feed(self, text: str, final: bool = False) -> list[dict]:
        """The deltas `text` completes; `final`: the choice's last text, nothing held back after."""
        if self.reasoning is None:
            thought, answer = "", text
        else:
            thought, answer = self.reasoning.feed(text)
            if final:
                more_thought, more_answer = self.reasoning.finish()
                thought, answer = thought + more_thought, answer + more_answer
        out = [{"reasoning_content": thought}] if thought else []
        if self.tools is None:
            out += [{"content": answer}] if answer else []
        else:
            out += self.tools.feed(answer) + (self.tools.finish() if final else [])
        self.deltas += out
        self.done = final
        return out

    def finish_reason(self, engine_reason: str) -> str:
        """A choice that stopped after valid tool calls finished to call them."""
        return "tool_calls" if self.tools is not None and self.tools.calls and engine_reason == "stop" else engine_reason

    def message(self) -> dict:
        content = "".join(d.get("content", "") for d in self.deltas)
        message = {"role": "assistant", "content": content}
        if self.reasoning is not None and self.reasoning.reasoned:
            message["reasoning_content"] = "".join(d.get("reasoning_content", "") for d in self.deltas)
            message["content"] = content or None  # a thinking that never closed: no answer (vLLM)
        if self.tools is not None and self.tools.calls:
            message["tool_calls"] = [c.body() for c in self.tools.calls]
            message["content"] = content or None
        if self.tools is not None and self.tools.errors:
            message["tool_call_error"] = "; ".join(self.tools.errors)
        return message


def completion_body(rid: str, chat: bool, created: int, choices: list, usage: dict, model: str) -> dict:
    obj = "chat.completion" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}


def choice_body(chat: bool, i: int, out: RequestOutput, logprobs: dict | None = None, parser: ChoiceParser | None = None) -> dict:
    """`parser`: the chat choice's parser, fed all of its text already (a stream's), or fresh."""
    if chat:
        message, finish_reason = {"role": "assistant", "content": out.text}, out.finish_reason
        if parser is not None:
            if not parser.done:
                parser.feed(out.text, final=True)
            message, finish_reason = parser.message(), parser.finish_reason(out.finish_reason)
        return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": i, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}


class ChunkFormatter:
    """The stream's events for one response: a role chunk per chat choice first, then text
    deltas (split by each choice's ChoiceParser when the chat has a shape), then a usage chunk.
    `null_usage`: every chunk but the last carries `"usage": null` (stream_options.include_usage)."""

    def __init__(self, rid: str, chat: bool, created: int, model: str, shape: ChatShape | None = None, null_usage=False):
        self.rid, self.chat, self.created, self.model = rid, chat, created, model
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.shape, self.parsers = shape, {}
        self.null_usage = {"usage": None} if null_usage else {}

    def _event(self, choices: list, **extra) -> str:
        head = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model}
        return sse(head | {"choices": choices} | (extra or self.null_usage))

    def _shaped(self, i: int, text: str, finish_reason: str | None, logprobs: dict | None) -> str:
        parser = self.parsers.get(i) or self.parsers.setdefault(i, self.shape.parser())
        deltas = parser.feed(text, final=finish_reason is not None)
        if logprobs is not None and not deltas:
            deltas = [{}]  # the step's text is held back (part of a tag): its logprobs go out now
        # The step's logprobs ride on its first delta.
        lps = [logprobs] + [None] * (len(deltas) - 1)
        events = [self._event([{"index": i, "delta": d, "logprobs": lp, "finish_reason": None}]) for d, lp in zip(deltas, lps)]
        if finish_reason is not None:
            last = {"index": i, "delta": {}, "logprobs": None, "finish_reason": parser.finish_reason(finish_reason)}
            events.append(self._event([last]))
        return "".join(events)

    def role(self, i: int) -> str:
        return self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def delta(self, i: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        if self.chat and self.shape is not None:
            return self._shaped(i, text, finish_reason, logprobs)
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._event([choice])

    def usage(self, usage: dict) -> str:
        return self._event([], usage=usage)
