"""`inferd eval`: what a quantization (or an fp8 KV cache, or a lower dtype) costs in accuracy,
measured through the engine that serves it:

- **perplexity** of a text file, teacher-forced through the engine's prompt logprobs, in windows
  of the context length moved by a stride (the transformers recipe: each window scores only the
  tokens no earlier window scored, with up to `window - stride` tokens of context before them);
- **top-1 agreement**, teacher-forced: the fraction of the same scored positions where the model's
  most likely next token is the reference's. Every position sees the same (true) context in both
  models, so one early difference cannot cascade: the stable number;
- **greedy agreement**: prompts cut from the text, greedy continuations by both models; the
  fraction of tokens equal until the first divergence, and of tokens equal position by position.

The reference is the same model unquantized (or as `--reference-*` says), run after the candidate
in the same process: the two never hold device memory at the same time.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

from inferd import LLM, SamplingParams


class EvalError(ValueError):
    """Bad input to eval (unreadable or too short text, settings that do not fit): exit 2."""


@dataclass(frozen=True)
class EvalSettings:
    max_model_len: int = 1024
    stride: int | None = None  # default: half the window
    greedy_prompts: int = 8
    prompt_tokens: int = 64
    greedy_tokens: int = 64

    @property
    def window(self) -> int:
        return self.max_model_len - 1  # the engine needs room for the one token it generates

    def check(self) -> None:
        if self.max_model_len < 3:
            raise EvalError(f"--max-model-len must be at least 3, got {self.max_model_len}")
        if self.stride is not None and not 0 < self.stride <= self.window:
            raise EvalError(f"--stride must be in [1, {self.window}] (the window is --max-model-len - 1), got {self.stride}")
        if min(self.greedy_prompts, self.prompt_tokens, self.greedy_tokens) < 0 or self.prompt_tokens < 1:
            raise EvalError("--greedy-prompts and --greedy-tokens must be >= 0 and --prompt-tokens >= 1")
        if self.greedy_prompts and self.prompt_tokens + self.greedy_tokens > self.max_model_len:
            raise EvalError(
                f"--prompt-tokens {self.prompt_tokens} + --greedy-tokens {self.greedy_tokens} exceed "
                f"--max-model-len {self.max_model_len}: lower them or raise --max-model-len"
            )


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): give a plain-text file") from e
    except OSError as e:
        raise EvalError(f"{path}: cannot read the text file ({e.strerror}): check the path") from e


def text_tokens(path: str, text: str, tokenizer, settings: EvalSettings) -> list[int]:
    """The text's token ids (with the tokenizer's BOS, as a prompt would have it)."""
    if tokenizer is None:
        raise EvalError("the model has no tokenizer.json: eval needs one to read the text")
    ids = tokenizer.encode(text)
    need = max(settings.prompt_tokens + 1 if settings.greedy_prompts else 0, 2)
    if len(ids) < need:
        raise EvalError(
            f"{path}: the text has {len(ids)} tokens; eval needs at least {need} (--prompt-tokens + 1): "
            "give a longer text or lower --prompt-tokens"
        )
    return ids


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens: together they score
    positions 1..n-1 exactly once (position 0 has nothing before it). A window starts `stride`
    after the last, but never after the first position it scores: that one needs a token before it."""
    out, scored_to, begin = [], 1, 0
    while scored_to < n:
        begin = min(begin, scored_to - 1)
        end = min(begin + window, n)
        out.append((begin, end, scored_to))
        scored_to, begin = end, begin + stride
    return out


def score(llm: LLM, ids: list[int], spans: list[tuple[int, int, int]]) -> tuple[list[float], list[int]]:
    """Per scored position: the negative log-likelihood of the true token, and the model's top-1 id."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=True, top_logprobs=1, ignore_eos=True)
    outs = llm.generate([ids[b:e] for b, e, _ in spans], params)
    nll, top1 = [], []
    for (begin, end, first), out in zip(spans, outs):
        for pos in range(first, end):
            logprob, top = out.prompt_logprobs[pos - begin]
            nll.append(-logprob)
            top1.append(top[0][0])
    return nll, top1


def greedy_prompts(ids: list[int], settings: EvalSettings) -> list[list[int]]:
    """Prompts of `prompt_tokens` cut at evenly spaced places in the text."""
    last = len(ids) - settings.prompt_tokens
    count = settings.greedy_prompts
    starts = sorted({round(i * last / max(count - 1, 1)) for i in range(count)}) if count else []
    return [ids[s : s + settings.prompt_tokens] for s in starts]


def greedy(llm: LLM, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    if not prompts or not tokens:
        return []
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def greedy_agreement(candidate: list[list[int]], reference: list[list[int]]) -> dict:
    """Fractions of greedy tokens equal to the reference's: until the first divergence (the mean of
    each continuation's matching prefix over its length) and position by position."""
    if not reference:
        return {"until_first_divergence": None, "overall": None}
    prefix, equal, total = [], 0, 0
    for c, r in zip(candidate, reference):
        first = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        prefix.append(first / len(r))
        equal += sum(a == b for a, b in zip(c, r))
        total += len(r)
    return {"until_first_divergence": sum(prefix) / len(prefix), "overall": equal / total}


def _measure(llm: LLM, ids: list[int], spans, prompts, settings: EvalSettings) -> dict:
    start = time.perf_counter()
    nll, top1 = score(llm, ids, spans)
    continuations = greedy(llm, prompts, settings.greedy_tokens)
    mean = sum(nll) / len(nll)
    config = llm.engine.config
    summary = {
        "settings": {k: getattr(config, k) for k in ("device", "dtype", "quantization", "kv_cache_dtype")},
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "scored_tokens": len(nll),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return {"summary": summary, "top1": top1, "greedy": continuations}


def _free_device_memory() -> None:
    """The last engine's memory back before the next one is built (the two never share the device)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def run_eval(model: str, text_path: str, candidate: dict, reference: dict | None, settings: EvalSettings) -> dict:
    """Perplexity of the text file under the model built with `candidate`'s engine settings and,
    unless `reference` is None, under `reference`'s, with the candidate's agreement with it."""
    settings.check()
    text = read_text(text_path)  # before any model is loaded: a wrong path fails at once
    llm = LLM(model, max_model_len=settings.max_model_len, **candidate)
    try:
        ids = text_tokens(text_path, text, llm.tokenizer, settings)
        stride = settings.stride or max(settings.window // 2, 1)
        spans = windows(len(ids), settings.window, stride)
        prompts = greedy_prompts(ids, settings)
        cand = _measure(llm, ids, spans, prompts, settings)
    finally:
        llm.engine.close()
    del llm
    _free_device_memory()
    result = {
        "model": model,
        "text": text_path,
        "text_tokens": len(ids),
        "window": settings.window,
        "stride": stride,
        "candidate": cand["summary"],
        "reference": None,
        "agreement": None,
    }
    if reference is None:
        return result
    llm = LLM(model, max_model_len=settings.max_model_len, **reference)
    try:
        ref = _measure(llm, ids, spans, prompts, settings)
    finally:
        llm.engine.close()
    del llm
    _free_device_memory()
    result["reference"] = ref["summary"]
    result["agreement"] = {
        "top1_teacher_forced": sum(a == b for a, b in zip(cand["top1"], ref["top1"])) / len(ref["top1"]),
        "greedy": greedy_agreement(cand["greedy"], ref["greedy"]),
        "greedy_prompts": len(prompts),
        "greedy_tokens": settings.greedy_tokens,
    }
    return result
