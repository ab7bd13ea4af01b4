"""What the engine reports: a `TokenEvent` for each step of a request still running (streaming),
then one `RequestOutput` when it finishes. They are different types so that no one reads an
unfinished request's (empty) totals as its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class TokenEvent:
    """One step's new tokens and text of a request that is still running."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    num_output_tokens: int
    # With logprobs: the new tokens' own logprobs, and their top alternatives (id, logprob).
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    # On a request's first event, with prompt_logprobs: as RequestOutput.prompt_logprobs.
    prompt_logprobs: list | None = None
    finished: ClassVar[bool] = False


@dataclass
class RequestOutput:
    """A finished request. `new_token_ids` and `new_text` are its last step's share, so that the
    `new_text` of a request's events joined is its `text`."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    # With top_logprobs > 0: per output token, the most likely tokens there, (id, logprob).
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # With prompt_logprobs: per prompt token, (logprob, top alternatives); None for the first.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    num_cached_tokens: int = 0
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: ClassVar[bool] = True

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


StepOutput = TokenEvent | RequestOutput


@dataclass(frozen=True)
class EngineStats:
    """The engine's load at one moment, for /metrics."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    free_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up, since the engine started
    prefix_cache_hits: int = 0
    preemptions: int = 0
    host_cache_hits: int = 0  # KV blocks copied back from the host tier, since the engine started
    host_cache_blocks: int = 0  # KV blocks the host tier holds now
    host_cache_capacity_blocks: int = 0  # 0: no host tier
    host_cache_bytes: int = 0  # bytes of the blocks it holds now
    spec_draft_tokens: int = 0  # speculative decoding: drafts verified, and accepted, since start
    spec_accepted_tokens: int = 0
    spec_paused_steps: int = 0  # decode steps taken plain while speculation measured slower (SpecGate)
