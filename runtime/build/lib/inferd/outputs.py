from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None
    num_cached_tokens: int = 0
    finished: bool = True
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    num_output_tokens: int = 0
    # Unfinished outputs (one per step, for streaming) carry only the new token and text delta;
    # the finished one carries everything.
