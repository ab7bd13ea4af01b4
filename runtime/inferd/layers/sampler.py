"""Token selection for a batch with per-request settings.

Greedy rows take the argmax. Sampled rows get penalties, temperature, top-k, top-p and min-p,
then the Gumbel-max trick (argmax of probs / Exp(1) noise) with noise drawn from the request's
own generator when it has a seed, so the same seed and request give the same tokens whatever
else is in the batch.

Logprobs (and the top alternatives) are of the raw model distribution: the log-softmax of the
logits before penalties, temperature, top-k/p, min-p and any grammar mask, as OpenAI's API and
vLLM (its default "raw_logprobs") report them; so they score text whatever the sampling settings.

A request with a grammar (structured output) has its row of a token bitmask filled on the host by
its matcher (`Request.grammar`; all of a step's constrained rows in one call, filled in parallel
threads) and applied here with one fixed-shape op over the batch's rows.
The sampler runs after the model's step, outside the captured CUDA graph (the graph ends at the
logits), so decode keeps replaying its graph whatever the batch asks of the sampler; the bitmask is
filled while the device still runs the step's forward pass, which was queued before the sampler.
Top-k logprobs are computed outside the graph too, and only when a row asks for them: one topk
over the batch's logprobs, at k the largest asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from inferd.sampling_params import SamplingParams


class Request(Protocol):
    """What the sampler reads of a request (the engine's `Sequence` is one): its settings, its
    tokens for the penalties, and an id that keys its seeded generator."""

    seq_id: int
    params: SamplingParams
    token_ids: list[int]
    output_token_ids: list[int]
    num_output_tokens: int
    # engine.structured.Grammar: its class's fill_bitmasks(bitmask, [(grammar, row), ...]) fills
    # a step's constrained rows with their allowed next tokens, in one call.
    grammar: object | None


@dataclass
class Sampled:
    """One step's choices, on the logits' device: a token per row, and when a row asks, its
    logprob and the `top_logprobs` most likely tokens (ids and logprobs, k columns: the largest
    asked; a row reads its own first columns)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) (the first maximum). On CUDA for a few rows, two Triton kernels
    (triton_fused.argmax_rows: the chunks' winners, then the row's): torch reduces a 128k row with
    few thread blocks (35 us a step for the 8B shape at batch 1 on the H200), and a chunked torch
    version still took five kernels and ~23 us of the 1.5B's step (BENCHMARKS.md, seventh pass)."""
    if logits.is_cuda and logits.shape[0] <= 8 and logits.stride(-1) == 1:
        from inferd.layers.triton_fused import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


class Sampler:
    def __init__(self, device: torch.device, max_num_seqs: int = 1):
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.generators: dict[int, torch.Generator] = {}
        # The token bitmask, [max_num_seqs, ceil(vocab / 32)] int32: pinned host rows the
        # matchers fill, and the device copy the mask op reads (allocated at first use).
        self._bitmask_host: torch.Tensor | None = None
        self._bitmask: torch.Tensor | None = None
        self._bit_shifts = torch.arange(32, dtype=torch.int32, device=device)

    def _generator(self, seq: Request) -> torch.Generator:
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.params.seed)
            self.generators[seq.seq_id] = gen
        return gen

    def release(self, seq: Request) -> None:
        self.generators.pop(seq.seq_id, None)

    @staticmethod
    def apply_penalties(logits: torch.Tensor, seqs: list[Request]) -> torch.Tensor:
        for i, seq in enumerate(seqs):
            p = seq.params
            if not p.needs_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device, dtype=torch.long)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if seq.num_output_tokens and (p.presence_penalty or p.frequency_penalty):
                out = torch.tensor(seq.output_token_ids, device=logits.device, dtype=torch.long)
                counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def apply_grammar(self, logits: torch.Tensor, seqs: list[Request]) -> torch.Tensor:
        """The logits with every token a row's grammar forbids at -inf; rows without a grammar
        get an all-ones mask row (the op has one shape for the whole batch)."""
        n, vocab = logits.shape
        words = (vocab + 31) // 32
        if self._bitmask is None or self._bitmask.shape[1] != words or self._bitmask.shape[0] < n:
            rows = max(n, self.max_num_seqs)
            self._bitmask_host = torch.empty(rows, words, dtype=torch.int32, pin_memory=self.device.type == "cuda")
            self._bitmask = torch.empty(rows, words, dtype=torch.int32, device=self.device)
        host = self._bitmask_host[:n]
        # Reused each step: the engine reads a constrained step's tokens before it launches the
        # next (the next mask depends on them), so no copy from these rows is still in flight.
        host.fill_(-1)
        rows = [(seq.grammar, i) for i, seq in enumerate(seqs) if seq.grammar is not None]
        type(rows[0][0]).fill_bitmasks(host, rows)  # all rows in one call: in parallel
        mask = self._bitmask[:n]
        mask.copy_(host, non_blocking=True)
        allowed = ((mask[:, :, None] >> self._bit_shifts) & 1).view(n, words * 32)[:, :vocab]
        return logits.masked_fill(allowed == 0, float("-inf"))

    def sample(self, logits: torch.Tensor, seqs: list[Request]) -> Sampled:
        """Tokens (and, when any request asks, their logprobs) as tensors on the logits' device:
        nothing here waits for the GPU."""
        want_logprobs = any(s.params.logprobs for s in seqs)
        constrained = any(s.grammar is not None for s in seqs)
        greedy = all(s.params.greedy and not s.params.needs_penalties for s in seqs)
        if greedy and not want_logprobs and not constrained:
            # Widening to float32 is exact, so the argmax (first maximum) is the same on the
            # model's own dtype, without a float32 copy of the logits (22 us a step at 64 x 128k).
            return Sampled(first_argmax(logits))
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if constrained:
            logits = self.apply_grammar(logits, seqs)
        if greedy:
            tokens = logits.argmax(dim=-1)
        else:
            logits = self.apply_penalties(logits.clone(), seqs)
            tokens = self._sample(logits, seqs)
        out = Sampled(tokens)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, tokens.view(-1, 1)).view(-1)
            k = max(s.params.top_logprobs for s in seqs if s.params.logprobs)
            if k:
                out.top_logprobs, out.top_ids = raw_logprobs.topk(k, dim=-1)
        return out

    @staticmethod
    def prompt_logprobs(logits: torch.Tensor, next_ids: torch.Tensor, k: int) -> Sampled:
        """Each position's logprob of the token that follows it in the prompt (`next_ids`), and
        the top `k` alternatives there: how the model scores a given text."""
        raw = torch.log_softmax(logits.float(), dim=-1)
        out = Sampled(next_ids, raw.gather(1, next_ids.view(-1, 1)).view(-1))
        if k:
            out.top_logprobs, out.top_ids = raw.topk(k, dim=-1)
        return out

    def _sample(self, logits: torch.Tensor, seqs: list[Request]) -> torch.Tensor:
        greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        probs = self.probs(logits, seqs)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            gen = self._generator(seq) if seq.params.seed is not None else None
            noise[i].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def probs(logits: torch.Tensor, seqs: list[Request]) -> torch.Tensor:
        """The distribution a sampled row draws from (float32 logits in): temperature, top-k,
        top-p and min-p applied. Speculative decoding verifies drafts against it."""
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=logits.device)
        logits = logits / temps[:, None]
        top_k = [s.params.top_k for s in seqs]
        if any(k > 0 for k in top_k):
            vocab = logits.shape[-1]
            ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=logits.device)
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(s.params.top_p < 1 for s in seqs):  # decided on the host: no wait for the GPU
            top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
            sorted_probs, idx = probs.sort(dim=-1, descending=True)
            cum = sorted_probs.cumsum(dim=-1)
            drop = (cum - sorted_probs) > top_p[:, None]  # keep the smallest set reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sorted_probs)
        if any(s.params.min_p > 0 for s in seqs):
            min_p = torch.tensor([s.params.min_p for s in seqs], device=logits.device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        return probs
