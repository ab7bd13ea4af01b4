"""One request's state inside the engine: its tokens, its KV blocks, how far it has been computed."""

from __future__ import annotations

import enum
from itertools import count

from inferd.sampling_params import SamplingParams

# Stands for a token the device has sampled but the host has not read yet (the engine schedules
# the next step before the previous step's tokens arrive); replaced when they do.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """Each field has one writer: the engine writes `output_logprobs`, `output_top_logprobs`,
    `prompt_logprobs` and `grammar` (and advances the grammar); the block manager owns
    `block_table`, `num_computed_tokens`, `num_cached_tokens` and `num_hashed_blocks`; the
    scheduler owns the rest of the mutable state (`status`, `finish_reason`, `token_ids` after
    the prompt, `pending_row`, `num_scheduled_tokens`, `num_preemptions`)."""

    _ids = count()

    def __init__(
        self,
        token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        request_id: str | None = None,
        tenant: str = "",
        priority: int = 0,
    ):
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        # Who asked (the API key's id) and its priority class (higher goes first): the scheduler
        # shares the batch between tenants by them.
        self.tenant = tenant
        self.priority = priority
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.params = params
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache
        self.num_hashed_blocks = 0  # leading blocks registered in the prefix cache
        self.output_logprobs: list[float] = []
        # Per output token, with params.top_logprobs: the most likely tokens there, (id, logprob).
        self.output_top_logprobs: list[list[tuple[int, float]]] = []
        # With params.prompt_logprobs, per prompt position after the first: (logprob, top list).
        self.prompt_logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = {}
        # With params.json_schema: the matcher that keeps the output valid (engine.structured).
        self.grammar = None
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # Tokens this step computes (set by the scheduler; a prompt chunk or one decode token).
        self.num_scheduled_tokens = 0
        # While the last token is PENDING_TOKEN: its row in the in-flight step's sampled tokens.
        self.pending_row: int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_blocks(self) -> int:
        return (len(self.token_ids) + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]

    @property
    def has_pending_token(self) -> bool:
        return self.pending_row is not None

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
