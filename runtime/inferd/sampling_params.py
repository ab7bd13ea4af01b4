"""Per-request sampling settings, validated once when the request is made.

Every value is checked here, whoever builds the params (the server, `LLM`, a test): the engine
thread runs one batch for every tenant, so a value it cannot use must fail the request that
carries it, before it is queued, and never a step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# torch.Generator.manual_seed takes [-2**63, 2**64 - 1] and raises beyond it; negative seeds wrap
# to the same state as seed + 2**64, so only the non-negative half is accepted.
SEED_MAX = 2**64 - 1
# Each stop string is searched for in the output after every token, in the engine thread.
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 256
# OpenAI's range for the alternatives reported with each token (chat's top_logprobs; completions
# allow 5, a subset).
MAX_TOP_LOGPROBS = 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class InvalidRequestError(ValueError):
    """A request the engine cannot run, for a reason its sender can fix; `param` names the
    request field at fault (the server's 400 reports it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    # With `logprobs`: also the `top_logprobs` most likely tokens at each step, with theirs.
    top_logprobs: int = 0
    # Each prompt token's logprob under the model given the tokens before it (the first has
    # none), with its `top_logprobs` alternatives: completions' `echo` scores a text this way.
    prompt_logprobs: bool = False
    # A JSON schema (a dict) the output must match, enforced while sampling; `{"type": "object"}`
    # is OpenAI's json_object mode. Checked here, compiled per request by engine.structured.
    json_schema: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (_is_real(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k must be -1 (off) or >= 1"),
            (_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (_is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (_is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (_is_real(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed <= SEED_MAX), f"seed must be in [0, {SEED_MAX}]"),
            (
                isinstance(self.stop_token_ids, list) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                "stop_token_ids must be a list of integers >= 0",
            ),
            (
                isinstance(self.stop, list)
                and len(self.stop) <= MAX_STOP_STRINGS
                and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
                f"stop must be at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} characters",
            ),
            (isinstance(self.ignore_eos, bool), "ignore_eos must be true or false"),
            (isinstance(self.logprobs, bool), "logprobs must be true or false"),
            (
                _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (isinstance(self.prompt_logprobs, bool), "prompt_logprobs must be true or false"),
            (self.json_schema is None or isinstance(self.json_schema, dict), "json_schema must be a JSON object (a dict)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequestError(message, param=message.split()[0])  # each message starts with its field
        if self.json_schema is not None:
            from inferd.engine.structured import check_schema  # the grammar library only where it is used

            check_schema(self.json_schema)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0
