"""OpenAI's response shapes: completion and chat completion bodies, their choices and usage,
and the server-sent events of a stream."""

from __future__ import annotations

import json

from inferd.outputs import RequestOutput

DONE_EVENT = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return "data: " + json.dumps(obj) + "\n\n"


def usage_body(prompt_len: int, n: int, completion_tokens: int) -> dict:
    prompt_tokens = prompt_len * n
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(rid: str, chat: bool, created: int, choices: list, usage: dict, model: str) -> dict:
    obj = "chat.completion" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, "usage": usage}


def choice_body(chat: bool, i: int, out: RequestOutput, logprobs: dict | None = None) -> dict:
    if chat:
        message = {"role": "assistant", "content": out.text}
        return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": out.finish_reason}
    return {"index": i, "text": out.text, "logprobs": logprobs, "finish_reason": out.finish_reason}


class ChunkFormatter:
    """The stream's events for one response: a role chunk per chat choice first, then text
    deltas, then a usage chunk."""

    def __init__(self, rid: str, chat: bool, created: int, model: str):
        self.rid, self.chat, self.created, self.model = rid, chat, created, model
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def _event(self, choices: list, **extra) -> str:
        head = {"id": self.rid, "object": self.object, "created": self.created, "model": self.model}
        return sse(head | {"choices": choices} | extra)

    def role(self, i: int) -> str:
        return self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def delta(self, i: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> str:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._event([choice])

    def usage(self, usage: dict) -> str:
        return self._event([], usage=usage)
