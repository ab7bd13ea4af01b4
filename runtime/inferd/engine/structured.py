"""Structured output: the output of a request with a JSON schema is kept valid while it is
sampled. Each such sequence has a grammar matcher on the host; each step, before its row is
sampled, the matcher writes the row's allowed tokens into a token bitmask (int32 words, bit i of
word j allows token 32*j + i) that the sampler applies to the logits; each sampled token then
advances the matcher, and a matcher that has ended (the document is complete and the model chose
to stop, or nothing else can follow) ends the sequence with finish_reason "stop".

Library: llguidance, chosen by runtime/bench/bench_grammar.py (DeepSeek-V3's tokenizer, 129,280
ids; a 6-field nested schema; a 73-token document forced token by token; this project's shared
2-core CPU box, Python 3.11, best of 3):

    library            tokenizer setup  compile   mask per step: mean  p50     p99
    llguidance 1.9.1   0.44 s           0.9 ms    17 us                10 us   254 us (first)
    xgrammar 0.2.9     0.41 s           10.9 ms   4.7 us               3.2 us  24 us

Both masks cost well under 1% of a decode step (milliseconds for an 8B model at batch 16), and
the mask is filled while the device runs the step's forward pass. Compiling happens once per
request on the engine thread, which every tenant's batch waits on: llguidance compiles 12x faster.
llguidance is also one abi3 wheel with no dependencies, where xgrammar needs transformers, triton
and apache-tvm-ffi at import (the server venv has none of them). The matcher never raises on a
bad token or grammar: it enters an error state, which is checked here.
"""

from __future__ import annotations

import functools
import logging
from functools import cached_property

import torch

from inferd.sampling_params import InvalidRequestError

log = logging.getLogger("inferd.structured")

PARAM = "response_format"
# The document's layout is fixed (json.dumps's separators, no other whitespace): free whitespace
# lets a model pad without end (a weak or random model does: newlines and tabs until max_tokens),
# and a schema may still ask otherwise through its "x-guidance" options.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _grammar(schema: dict) -> str:
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except Exception as e:  # the library's own error types for a schema it cannot read
        raise InvalidRequestError(f"{PARAM}: the JSON schema is not usable: {e}", PARAM) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"{PARAM}: the JSON schema is not usable: {error.strip()[:500]}", PARAM)
    return grammar


def check_schema(schema: dict) -> None:
    """Raise InvalidRequestError (naming response_format) for a schema the grammar library
    cannot enforce; cheap (no tokenizer), so it runs where the request is made."""
    _grammar(schema)


@functools.cache
def _executor():
    """llguidance's thread pool for filling many masks at once (80% of the CPUs, at most 32
    threads), made once per process, at the first step with two constrained rows."""
    import llguidance

    return llguidance.LLExecutor()


class GrammarCompiler:
    """One per engine: the library's view of the vocabulary, built on first use (0.44 s for
    DeepSeek-V3's, once, on the engine thread: an engine never asked for structured output, or
    one without the library installed, pays nothing), then a matcher per constrained request."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: set[int]):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)

    @cached_property
    def tokenizer(self):
        import llguidance

        # n_vocab: the model's rows, past the tokenizer's own ids (padding rows stay forbidden).
        return llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos or None)

    def matcher(self, schema: dict) -> Grammar:
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, _grammar(schema), log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{PARAM}: the JSON schema is not usable: {matcher.get_error()[:500]}", PARAM)
        return Grammar(matcher)


class Grammar:
    """One sequence's matcher: what may come next, and the tokens that came."""

    def __init__(self, matcher):
        self._matcher = matcher

    def fill_bitmask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row`, a contiguous int32 CPU tensor of
        ceil(vocab / 32) words."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    @staticmethod
    def fill_bitmasks(bitmask: torch.Tensor, rows: list[tuple[Grammar, int]]) -> None:
        """Write each (grammar, row) pair's allowed next tokens into that row of `bitmask`, a
        contiguous [batch, ceil(vocab / 32)] int32 CPU tensor: one step's constrained rows in
        one call. Several rows are filled in parallel by llguidance's thread pool, outside the
        GIL: a mask inside a JSON string walks most of DeepSeek's 129k-token trie (0.3-0.8 ms a
        row), so 16 rows one after another cost 12 ms a step where the forward pass takes 5."""
        if len(rows) == 1:  # no hand-off to the pool for a lone row
            grammar, i = rows[0]
            grammar.fill_bitmask(bitmask[i])
            return
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask_par(_executor(), [(g._matcher, i) for g, i in rows], bitmask)

    def accept(self, token: int) -> None:
        """Advance past a sampled token (one the mask allowed). A matcher that fails (a parser
        limit reached) ends its sequence, as a stop does, and never the engine's step."""
        if not self._matcher.consume_token(token):
            log.warning("a grammar matcher failed; its request ends here: %s", self._matcher.get_error()[:300])

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_stopped() or self._matcher.is_error()
