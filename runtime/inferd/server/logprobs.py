"""Logprobs in OpenAI's shapes. Chat: `choices[].logprobs.content[]` of {token, logprob, bytes,
top_logprobs[]}. Completions: `logprobs` {tokens, token_logprobs, top_logprobs (a dict of token
text to logprob per position, or null), text_offset}; with `echo` the prompt's tokens come first,
the very first with null logprobs (nothing precedes it). Values are of the model's raw
distribution (see inferd.layers.sampler)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Alternatives = list[tuple[int, float]]


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(texts: Callable[[list[int]], list[str]], token_ids: Sequence[int], logprobs, top) -> dict:
    """`texts` gives each token id's own text (the engine's token_texts)."""
    top = top or [[] for _ in token_ids]
    alt_ids = [t for alts in top for t, _ in alts]
    names = texts(list(token_ids) + alt_ids)
    alt_names = iter(names[len(token_ids) :])
    content = []
    for text, lp, alts in zip(names, logprobs, top):
        content.append(_entry(text, lp) | {"top_logprobs": [_entry(next(alt_names), v) for _, v in alts]})
    return {"content": content}


def completion_logprobs(
    texts: Callable[[list[int]], list[str]],
    token_ids: Sequence[int],
    logprobs: Sequence[float | None],
    top: Sequence[Alternatives | None] | None,
    start_offset: int = 0,
) -> dict:
    """The legacy shape; `top` None (logprobs: 0) reports no alternatives. A position whose
    logprob is None (the echoed prompt's first token) has null alternatives too."""
    alt_ids = [t for alts in (top or []) if alts for t, _ in alts]
    names = texts(list(token_ids) + alt_ids)
    tokens, alt_names = names[: len(token_ids)], iter(names[len(token_ids) :])
    offsets, at = [], start_offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    top_out = None
    if top is not None:
        top_out = [None if alts is None else {next(alt_names): v for _, v in alts} for alts in top]
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_out, "text_offset": offsets}


def echoed_prompt(prompt_ids: list[int], scores: list | None, want_top: bool) -> tuple[list, list, list | None]:
    """The echoed prompt's (token ids, logprobs, alternatives) from the engine's prompt scores."""
    scores = scores or [None] * len(prompt_ids)
    lps = [None if s is None else s[0] for s in scores]
    top = [None if s is None else s[1] for s in scores] if want_top else None
    return list(prompt_ids), lps, top
