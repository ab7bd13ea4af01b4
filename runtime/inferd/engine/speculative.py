"""Speculative decoding: draft up to k tokens cheaply, run the target once over the sequence's last
token and the drafts (k + 1 query positions after its cached context: the chunked-prefill path),
keep the drafts the target accepts and one token of the target's own after them.

Acceptance is standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023), so the
output has exactly the target's distribution. At a draft position with target distribution p
(after temperature, top-k, top-p, min-p) and draft distribution q, the draft token d is accepted
with probability min(1, p(d) / q(d)); on rejection the token is drawn from norm(max(0, p - q)) and
the step ends there; when all are accepted, a bonus token is drawn from p at the last position.
Prompt lookup drafts deterministically (q is a point mass on d): accept with probability p(d), or
draw from p with d removed. Greedy requests accept a draft when it is the target's argmax, so
their output is the plain decoder's token for token wherever the verify pass computes the logits
a plain step computes. On the CPU it does. On the GPU a verify pass of one greedy sequence
computes each of its k + 1 rows as the batch-1 step does (AttentionContext.rows_as_one: the GEMV
kernels over the rows, attention split as for one sequence, the LM head row by row; its own CUDA
graphs per row count), so in bf16/fp16 with the GEMV pass its rows are the plain steps' logits bit
for bit (bench/spec_exactness.py, BENCHMARKS.md). That costs 2.2 plain steps a pass of 5 rows
against 1.4 for the batch kernels, and buys a sampled request nothing: its draws differ from plain
decoding's anyway, and the acceptance rule keeps the target's distribution with either kernels. So
a sampled sequence's rows, several sequences' rows and quantized weights' rows run the batch
kernels: equal up to rounding, as plain decoding's own output at that batch.

The paged cache is rolled back on rejection: the verify pass writes K/V for every draft, but only
the accepted ones are counted as computed (and only blocks full of verified tokens get their
prefix-cache hash); blocks past the sequence's new end are freed (BlockManager.keep_verified).

Drafters: prompt lookup (`propose_ngram`: the tokens that followed the latest earlier occurrence
of the sequence's last n tokens, n from ngram_max down to ngram_min; no model) and a draft model
(`DraftModel`: a smaller model with the target's tokenizer, in its own ModelRunner with its own
paged cache, one catch-up chunk then single-token steps that replay its CUDA graphs).

Requests that need logprobs, penalties or a grammar follow the sampler one token at a time: a
decode batch holding one of them takes a plain step (their requests are served, not refused).
A speculative step is synchronous (the drafts are made on the host from the newest tokens). With
prompt lookup the engine speculates only while some sequence's newest tokens occur earlier in it
(`SpecDecoder.wants`); otherwise it takes plain steps launched ahead, as without speculation, and
checks again each time a step's tokens reach the host (the check then lacks the one token still
in flight: a match that begins with it is found one step later).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from inferd.config import EngineConfig, SpeculativeConfig
from inferd.engine.block_manager import BlockManager
from inferd.engine.model_runner import ModelRunner
from inferd.engine.sequence import Sequence
from inferd.layers.sampler import Sampler
from inferd.models.config import ModelConfig, parse_model_config
from inferd.store.source import open_model

log = logging.getLogger("inferd.speculative")

# The draft model's cache holds this many sequences of max_model_len (fewer get drafts when it is
# full; the others take plain verify steps of one token).
DRAFT_CACHE_SEQS = 16


class Chunk(NamedTuple):
    """What the runner reads of a sequence to run some of its tokens: a view built for one pass
    (the verify pass's, with the drafts appended; the draft model's, with its own block table)
    that changes no engine state."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    pending_row: None = None


def propose_ngram(tokens: list[int], k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Prompt lookup: up to k tokens that followed the latest earlier occurrence of the last n
    tokens, for the longest n in [ngram_min, ngram_max] that occurs; [] when none does."""
    arr = np.asarray(tokens, dtype=np.int64)
    length = len(arr)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        # Windows starting at 0 .. length-1-n: each has a token after it, none is the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == arr[length - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return arr[start : start + k].tolist()
    return []


def _noise(rows: list[int], width: int, seqs: list[Sequence], sampler: Sampler, device, kind: str) -> torch.Tensor:
    """Random draws, `rows[i]` rows for seqs[i]: one call for the batch, then each seeded
    sequence's rows again from its own generator (the same seed and request give the same
    tokens, whatever else is in the batch)."""
    out = torch.empty(sum(rows), width, device=device)
    out.uniform_() if kind == "uniform" else out.exponential_()
    start = 0
    for n, seq in zip(rows, seqs):
        if seq.params.seed is not None:
            gen = sampler._generator(seq)
            part = out[start : start + n]
            part.uniform_(generator=gen) if kind == "uniform" else part.exponential_(generator=gen)
        start += n
    return out


def draw(logits: torch.Tensor, seqs: list[Sequence], sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row from the sequence's sampling settings (argmax for greedy rows), and for
    sampled rows the normalised distribution it was drawn from (None when every row is greedy)."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    if all(s.params.greedy for s in seqs):
        return tokens, None
    sampled = torch.tensor([not s.params.greedy for s in seqs], device=logits.device)
    probs = Sampler.probs(logits, seqs)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    noise = _noise([1] * len(seqs), probs.shape[1], seqs, sampler, logits.device, "exponential")
    return torch.where(sampled, (probs / noise).argmax(dim=-1), tokens), probs


def _draft_dists(drafts: list[list[int]], qs: list[list[torch.Tensor]] | None, vocab: int, device) -> torch.Tensor:
    """q for every verify row: the draft model's distributions, or a point mass on the draft
    (prompt lookup); zero at each sequence's bonus row, whose token is drawn from p alone."""
    q = torch.zeros(sum(len(d) + 1 for d in drafts), vocab, device=device)
    point_rows, point_ids, dist_rows, dists = [], [], [], []
    r = 0
    for i, d in enumerate(drafts):
        if qs is not None and qs[i]:
            dist_rows.extend(range(r, r + len(d)))
            dists.extend(qs[i])
        else:
            point_rows.extend(range(r, r + len(d)))
            point_ids.extend(d)
        r += len(d) + 1
    if point_rows:
        q[torch.tensor(point_rows, device=device), torch.tensor(point_ids, device=device)] = 1.0
    if dists:
        stacked = torch.stack(dists)[:, :vocab]  # a draft vocab wider than the target's has no mass there
        q[torch.tensor(dist_rows, device=device), : stacked.shape[1]] = stacked
    return q


def verify(
    logits: torch.Tensor,
    seqs: list[Sequence],
    drafts: list[list[int]],
    qs: list[list[torch.Tensor]] | None,
    sampler: Sampler,
) -> list[list[int]]:
    """The tokens each sequence gains: its accepted drafts, then the target's own token (the
    correction at the first rejection, or the bonus after the last draft). `logits` has
    len(drafts[i]) + 1 rows per sequence, in order; `qs[i]` the draft model's distributions
    (None or [] for a point mass)."""
    lens = [len(d) + 1 for d in drafts]
    row_seqs = [s for s, n in zip(seqs, lens) for _ in range(n)]
    dev = logits.device
    draft_ids = torch.tensor([t for d in drafts for t in d + [0]], device=dev)  # the bonus row: a placeholder
    best = logits.argmax(dim=-1)
    accept, alt = best == draft_ids, best
    if any(not s.params.greedy for s in seqs):
        p = Sampler.probs(logits.float(), row_seqs)
        p = p / p.sum(dim=-1, keepdim=True)
        q = _draft_dists(drafts, qs, p.shape[1], dev)
        idx = draft_ids[:, None]
        ratio = p.gather(1, idx)[:, 0] / q.gather(1, idx)[:, 0].clamp_min(1e-30)
        u = _noise(lens, 1, seqs, sampler, dev, "uniform")[:, 0]
        residual = (p - q).clamp_min(0)
        residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
        noise = _noise(lens, p.shape[1], seqs, sampler, dev, "exponential")
        sampled = torch.tensor([not s.params.greedy for s in row_seqs], device=dev)
        accept = torch.where(sampled, u < ratio, accept)
        alt = torch.where(sampled, (residual / noise).argmax(dim=-1), alt)
    accept_list, alt_list = accept.tolist(), alt.tolist()
    out, r = [], 0
    for d, n in zip(drafts, lens):
        j = 0
        while j < n - 1 and accept_list[r + j]:
            j += 1
        out.append(d[:j] + [alt_list[r + j]])
        r += n
    return out


@dataclasses.dataclass
class _DraftState:
    seq: Sequence
    table: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose K/V the draft cache holds
    # The sequence holds an id past the draft's vocabulary (a prompt given as ids, or an id only
    # the target's padded embedding has): the draft reads id 0 there (verification keeps the
    # output the target's).
    outside_vocab: bool = False


class DraftModel:
    """A smaller model with the target's tokenizer drafts; its own paged cache, no prefix cache."""

    def __init__(
        self,
        config: EngineConfig,
        target: ModelConfig,
        max_model_len: int,
        target_tokenizer: str | None,
        runner_cls: type[ModelRunner] = ModelRunner,
    ):
        spec = config.speculative
        source = open_model(spec.draft_model, config.model_key_file)  # a packed draft: the same key
        text = source.read_text("config.json")
        if text is None:
            raise FileNotFoundError(f"speculative.draft_model {spec.draft_model}: no config.json: pass a model directory")
        model_cfg = parse_model_config(json.loads(text))
        _check_same_tokenizer(spec.draft_model, source.read_text("tokenizer.json"), target_tokenizer)
        self.vocab = target.vocab_size
        self.draft_vocab = model_cfg.vocab_size
        blocks = -(-max_model_len // config.block_size) * min(config.max_num_seqs, DRAFT_CACHE_SEQS)
        # `speculative` stays: it sizes the draft's decode staging for catch-up rows as the target's.
        draft_config = dataclasses.replace(config, model=spec.draft_model, num_kv_blocks=blocks)
        # Read lazily (a runner that makes its own weights, a benchmark's, never opens them).
        self.runner = runner_cls(draft_config, model_cfg, max_model_len, source.iter_tensors(), verifies=False)
        self.block_size = config.block_size
        self.free = list(range(self.runner.num_blocks))
        self.states: dict[int, _DraftState] = {}

    def _sweep(self) -> None:
        for seq_id in [i for i, st in self.states.items() if st.seq.is_finished]:
            self.free.extend(self.states.pop(seq_id).table)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        st = self.states.setdefault(seq.seq_id, _DraftState(seq))
        st.outside_vocab = st.outside_vocab or max(seq.token_ids[st.computed :]) >= self.draft_vocab
        need = -(-num_tokens // self.block_size) - len(st.table)
        if need > len(self.free):
            return False
        st.table.extend(self.free.pop() for _ in range(max(need, 0)))
        return True

    def propose(self, seqs: list[Sequence], ks: list[int], sampler: Sampler):
        """Up to ks[i] drafts per sequence, and for sampled sequences the distributions they were
        drawn from: a catch-up chunk of the tokens the draft cache lacks, then one token a step."""
        self._sweep()
        active = [i for i, s in enumerate(seqs) if ks[i] > 0 and self._reserve(s, len(s) + ks[i] - 1)]
        drafts: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        for j in range(max((ks[i] for i in active), default=0)):
            rows = [i for i in active if ks[i] > j]
            if j == 0:
                logits = self._catch_up([seqs[i] for i in rows])
            else:
                views = []
                for i in rows:
                    tokens = self._tokens(seqs[i]) + drafts[i]
                    views.append(Chunk(tokens, self.states[seqs[i].seq_id].table, len(tokens) - 1, 1))
                logits = self.runner.step_logits(views, is_prefill=False)
            if logits.shape[1] > self.vocab:
                logits[:, self.vocab :] = float("-inf")  # ids the target does not have
            tokens, q = draw(logits, [seqs[i] for i in rows], sampler)
            for r, (i, t) in enumerate(zip(rows, tokens.tolist())):
                drafts[i].append(t)
                if q is not None and not seqs[i].params.greedy:
                    qs[i].append(q[r])
        return drafts, qs

    def _tokens(self, seq: Sequence) -> list[int]:
        if not self.states[seq.seq_id].outside_vocab:
            return seq.token_ids
        return [t if t < self.draft_vocab else 0 for t in seq.token_ids]

    def _catch_up(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits after each sequence's newest token, feeding the tokens the draft cache lacks
        (one or two after a step): as decode rows, one per token (the decode graphs); a new
        sequence's prompt (or more rows than the decode staging holds) as prefill chunks."""
        states = [self.states[s.seq_id] for s in seqs]
        need = [len(s) - st.computed for s, st in zip(seqs, states)]
        ids = [self._tokens(s) for s in seqs]
        if max(need) <= 2 and sum(need) <= self.runner.max_decode_rows:
            views = [Chunk(t[: p + 1], st.table, p, 1) for t, st in zip(ids, states) for p in range(st.computed, len(t))]
            logits = self.runner.step_logits(views, is_prefill=False)
            return logits[torch.tensor(np.cumsum(need) - 1, device=logits.device)]
        views = [Chunk(t, st.table, st.computed, n) for t, st, n in zip(ids, states, need)]
        return self.runner.step_logits(views, is_prefill=True)

    def commit(self, seq: Sequence, old_len: int, num_drafted: int, num_accepted: int) -> None:
        """The draft cache keeps what matches the sequence now: its old tokens and the drafts
        accepted (the last draft was never fed back, so its K/V is not there)."""
        st = self.states.get(seq.seq_id)
        if st is not None and num_drafted:
            st.computed = min(old_len + num_accepted, old_len + num_drafted - 1)


def _check_same_tokenizer(path: str, draft: str | None, target: str | None) -> None:
    if draft is None or target is None:
        return
    d, t = json.loads(draft), json.loads(target)
    if d.get("model") != t.get("model") or d.get("added_tokens") != t.get("added_tokens"):
        raise ValueError(
            f"speculative.draft_model {path} has a different tokenizer from the target's: a draft model "
            "must share the target's tokenizer (e.g. the Qwen-1.5B distill for the Qwen-7B/14B/32B distills)"
        )


class SpecGate:
    """Whether speculating pays, measured. The engine reports each decode step's tokens, time and
    rows: a speculative step from its start to its end (it is synchronous), a plain step from its
    start to the next step's, and only when it ran behind another plain decode step (pipelined:
    that interval is then one step of the device's; right after a speculative or prefill step, or
    an idle engine, it is not). By batch size (powers of two), the gate compares the median tokens
    per second of the latest SPEC_WINDOW speculative steps with that of the latest PLAIN_WINDOW
    plain ones. When speculation loses, it pauses for `pause` plain steps, twice as many each time
    it loses again (MIN_PAUSE up to MAX_PAUSE), then is tried again; a win resets the pause. Where
    plain decoding has not been measured at that batch size yet, the gate first takes the plain
    steps it lacks. Time, unlike the acceptance rate, counts everything a speculative step costs
    on this machine: the drafts, the verify pass, and the step's being synchronous. A draft model
    that drafts nothing useful ran at a quarter of plain decoding's speed without the gate
    (BENCHMARKS.md)."""

    SPEC_WINDOW = 4
    PLAIN_WINDOW = 8
    MIN_PAUSE = 16
    MAX_PAUSE = 1024

    def __init__(self, enabled: bool, clock: Callable[[], float] = time.perf_counter):
        self.enabled = enabled
        self.clock = clock
        self.rates: dict[tuple[bool, int], deque] = {}  # (speculative, batch-size bucket) -> tokens/s
        self.pause = 0  # plain steps to take before speculating again
        self.next_pause = self.MIN_PAUSE
        self.paused_steps = 0  # plain decode steps taken while paused (a metric)

    def allows(self) -> bool:
        return not self.enabled or self.pause == 0

    def _window(self, speculative: bool, rows: int) -> deque:
        key = (speculative, rows.bit_length())
        if key not in self.rates:
            self.rates[key] = deque(maxlen=self.SPEC_WINDOW if speculative else self.PLAIN_WINDOW)
        return self.rates[key]

    def record(self, speculative: bool, tokens: int, seconds: float, rows: int) -> None:
        """A decode step of `rows` sequences: the tokens they gained and its seconds."""
        if not self.enabled or tokens <= 0 or seconds <= 0 or rows <= 0:
            return
        rates = self._window(speculative, rows)
        rates.append(tokens / seconds)
        if not speculative:
            if self.pause:
                self.pause -= 1
                self.paused_steps += 1
            return
        if len(rates) < self.SPEC_WINDOW:
            return
        spec = statistics.median(rates)
        rates.clear()
        plain = self._window(False, rows)
        if len(plain) < self.PLAIN_WINDOW:
            self.pause = self.PLAIN_WINDOW - len(plain)  # plain decoding not measured at this size yet
            return
        plain_rate = statistics.median(plain)
        if spec < plain_rate:
            self.pause = self.next_pause
            self.next_pause = min(2 * self.next_pause, self.MAX_PAUSE)
            log.debug("speculation paused for %d steps: %.1f against %.1f tokens/s", self.pause, spec, plain_rate)
        else:
            self.next_pause = self.MIN_PAUSE


class SpecDecoder:
    """Runs the speculative decode steps and counts drafts and acceptances (the metrics)."""

    def __init__(self, spec: SpeculativeConfig, drafter: DraftModel | None, max_model_len: int):
        self.spec = spec
        self.drafter = drafter
        self.max_model_len = max_model_len
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.gate = SpecGate(spec.adaptive)

    @staticmethod
    def takes(batch: list[Sequence]) -> bool:
        """Whether a decode batch runs speculatively: logprobs, penalties and grammars are applied
        by the sampler token by token, so a batch holding such a request takes a plain step."""
        return all(not s.params.logprobs and not s.params.needs_penalties and s.grammar is None for s in batch)

    def wants(self, seqs: list[Sequence]) -> bool:
        """Whether the next decode step should draft: not while the gate pauses speculation;
        otherwise always with a draft model, and with prompt lookup while some sequence's last
        tokens occur earlier in it (a draft would be made)."""
        if not self.gate.allows():
            return False
        if self.drafter is not None:
            return True
        # A longer n-gram occurring earlier means its last ngram_min tokens do: one length to look for.
        n = self.spec.ngram_min
        known = (s.token_ids[:-1] if s.has_pending_token else s.token_ids for s in seqs if self._budget(s))
        return any(propose_ngram(t, 1, n, n) for t in known)

    def _budget(self, seq: Sequence) -> int:
        """Drafts that fit: the step adds up to k + 1 tokens within max_tokens and the context."""
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq))
        return max(0, min(self.spec.num_speculative_tokens, room - 1))

    def _draft(self, batch: list[Sequence], ks: list[int], sampler: Sampler):
        if self.drafter is not None:
            return self.drafter.propose(batch, ks, sampler)
        lo, hi = self.spec.ngram_min, self.spec.ngram_max
        return [propose_ngram(s.token_ids, k, lo, hi) if k else [] for s, k in zip(batch, ks)], None

    @staticmethod
    def _verify_logits(runner: ModelRunner, batch: list[Sequence], drafts: list[list[int]]) -> torch.Tensor:
        """The target's logits at each sequence's last token and each draft, in one pass. Each
        position is a decode row of its own (its context ends at it; the rows of a sequence share
        its block table, and every row's K/V is stored before any attends): the decode kernels and,
        within a graph bucket, the decode CUDA graph, computing what plain decoding computes for
        the same token; one greedy sequence's rows computed as batch-1 steps where the runner can
        (bit for bit: the module's docstring). A batch with more rows than the decode staging holds
        takes the chunked prefill path (k + 1 query tokens per sequence after its cached context)."""
        if sum(len(d) + 1 for d in drafts) <= runner.max_decode_rows:
            views = []
            for s, d in zip(batch, drafts):
                tokens = s.token_ids + d
                views.extend(Chunk(tokens[: len(s) + j], s.block_table, len(s) + j - 1, 1) for j in range(len(d) + 1))
            as_one = len(batch) == 1 and batch[0].params.greedy and bool(runner.verify_rows)
            return runner.step_logits(views, is_prefill=False, as_one=as_one)
        views = [Chunk(s.token_ids + d, s.block_table, len(s) - 1, len(d) + 1) for s, d in zip(batch, drafts)]
        return runner.step_logits(views, is_prefill=True, all_positions=True)

    def step(self, runner: ModelRunner, bm: BlockManager, batch: list[Sequence]) -> list[list[int]]:
        """Draft, make room in the cache, verify in one target pass; the tokens each sequence
        gains. The caller appends them, applies stop rules, then `bm.keep_verified`."""
        drafts, qs = self._draft(batch, [self._budget(s) for s in batch], runner.sampler)
        drafted = [len(d) for d in drafts]
        for i, seq in enumerate(batch):
            if not bm.can_allocate(bm.blocks_needed(seq, len(seq) + len(drafts[i]))):
                drafts[i] = []  # no room for them: this sequence takes a plain step
                if qs is not None:
                    qs[i] = []
            bm.grow(seq, len(seq) + len(drafts[i]))
        logits = self._verify_logits(runner, batch, drafts)
        gained = verify(logits, batch, drafts, qs, runner.sampler)
        for seq, d, n, g in zip(batch, drafts, drafted, gained):
            self.num_draft_tokens += len(d)
            self.num_accepted_tokens += len(g) - 1
            if self.drafter is not None:
                self.drafter.commit(seq, len(seq), n, len(g) - 1)
        return gained


def make_speculative(
    config: EngineConfig,
    target: ModelConfig,
    max_model_len: int,
    target_tokenizer: str | None,
    runner_cls: type[ModelRunner] = ModelRunner,
) -> SpecDecoder | None:
    """The engine's speculative decoder, or None when the config asks for none. Built before the
    target's runner: on CUDA the target sizes its cache from the memory the draft model left."""
    spec = config.speculative
    if spec is None:
        return None
    drafter = None
    if spec.method == "draft_model":
        drafter = DraftModel(config, target, max_model_len, target_tokenizer, runner_cls)
    log.info("speculative decoding: %s, %d tokens a step", spec.method, spec.num_speculative_tokens)
    return SpecDecoder(spec, drafter, max_model_len)
