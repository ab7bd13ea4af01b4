"""The engine loop: admit requests, schedule a step, run it, apply stop rules, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from inferd.config import EngineConfig
from inferd.engine.block_manager import BlockManager
from inferd.engine.host_cache import host_cache_for, host_cache_stats
from inferd.engine.model_runner import ModelRunner, StepHandle
from inferd.engine.scheduler import Scheduler
from inferd.engine.sequence import Sequence
from inferd.engine.speculative import make_speculative
from inferd.engine.structured import GrammarCompiler
from inferd.engine.worker import make_runner
from inferd.models.config import parse_model_config
from inferd.outputs import EngineStats, RequestOutput, StepOutput, TokenEvent
from inferd.sampling_params import InvalidRequestError, SamplingParams
from inferd.store.source import open_model
from inferd.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("inferd.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig, weights=None, runner_cls: type[ModelRunner] = ModelRunner):
        self.config = config
        if not Path(config.model).is_dir():
            raise FileNotFoundError(f"{config.model}/config.json not found: pass a Hugging Face or packed model directory")
        source = open_model(config.model, config.model_key_file)
        config_text = source.read_text("config.json")
        if config_text is None:
            raise FileNotFoundError(f"{config.model}/config.json not found: pass a Hugging Face model directory")
        self.model_config = parse_model_config(json.loads(config_text))
        self.max_model_len = config.max_model_len or min(self.model_config.max_position_embeddings, 8192)
        self.tokenizer = Tokenizer(source) if source.read_text("tokenizer.json") is not None else None
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        gen_cfg = source.read_text("generation_config.json")
        if gen_cfg:
            eos = json.loads(gen_cfg).get("eos_token_id")
            if eos is not None:
                self.eos_token_ids |= set([eos] if isinstance(eos, int) else eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        tokenizer_json = source.read_text("tokenizer.json")
        vocab = self.model_config.vocab_size
        self._grammars = GrammarCompiler(tokenizer_json, vocab, self.eos_token_ids) if tokenizer_json else None
        self.spec = make_speculative(config, self.model_config, self.max_model_len, tokenizer_json, runner_cls)
        weight_bytes, given_weights = None, weights is not None
        if weights is None:
            weights, weight_bytes = source.iter_tensors(), source.weight_bytes()
        self.runner: ModelRunner = make_runner(
            config, self.model_config, self.max_model_len, weights, weight_bytes, given_weights, runner_cls
        )
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching, host_cache_for(config, self.runner)
        )
        self.scheduler = Scheduler(config, self.block_manager, self.max_model_len)
        self.sequences: dict[str, Sequence] = {}
        self._detoks: dict[str, IncrementalDetokenizer] = {}
        self._inflight: tuple[list[Sequence], StepHandle] | None = None  # launched, tokens not read yet
        self._speculating = self.spec is not None  # the next decode step drafts (SpecDecoder.wants)
        # For SpecGate: whether the step in flight is a plain decode step, and the plain decode step
        # launched last behind another one, (rows, start), timed until the next step starts.
        self._inflight_decode = False
        self._last_plain: tuple[int, float] | None = None

    def close(self) -> None:
        """Free the runner's device memory and stop the tensor-parallel workers, if any (they also
        stop when this process exits). The engine is unusable afterwards."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # ---- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer.json: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def check_prompt(self, token_ids: list[int], max_tokens: int | None = None) -> int:
        """Refuse a prompt this engine cannot run (InvalidRequestError); return how many tokens it
        leaves room for in the context. `max_tokens`, when given, must fit in that room."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        room = self.max_model_len - len(token_ids)
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's context is {self.max_model_len} "
                "(prompt and output together): shorten the prompt",
                "prompt",
            )
        if max_tokens is not None and max_tokens > room:
            raise InvalidRequestError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens: lower max_tokens or shorten the prompt",
                "max_tokens",
            )
        return room

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, tenant: str = "", priority: int = 0
    ) -> Sequence:
        """Queue a request; `tenant` and `priority` are how the scheduler shares the batch
        (QueueFull when the waiting queue has no room)."""
        token_ids = self.tokenize(prompt)
        self.check_prompt(token_ids)
        seq = Sequence(token_ids, params, self.config.block_size, request_id, tenant=tenant, priority=priority)
        if seq.request_id in self.sequences:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if params.json_schema is not None:
            if self._grammars is None:
                raise InvalidRequestError("structured output needs the model's tokenizer.json", "response_format")
            seq.grammar = self._grammars.matcher(params.json_schema)
        self.scheduler.add(seq)  # first: a request the full queue refuses leaves nothing behind
        self.sequences[seq.request_id] = seq
        if self.tokenizer is not None:
            self._detoks[seq.request_id] = IncrementalDetokenizer(self.tokenizer)
        return seq

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.scheduler.abort(seq)
            self.runner.sampler.release(seq)
            self._detoks.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self._inflight is not None or self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm, sched = self.block_manager, self.scheduler
        return EngineStats(
            running=len(sched.running),
            waiting=len(sched.waiting),
            kv_cache_usage=bm.usage(),
            free_blocks=bm.num_free,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            preemptions=sched.num_preemptions,
            **host_cache_stats(bm.host_cache),
            spec_draft_tokens=self.spec.num_draft_tokens if self.spec else 0,
            spec_accepted_tokens=self.spec.num_accepted_tokens if self.spec else 0,
            spec_paused_steps=self.spec.gate.paused_steps if self.spec else 0,
        )

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One engine step: schedule and launch the next step, then read the step in flight's
        tokens and apply their stop rules and detokenizing while the device computes. Outputs are
        for the tokens read, so they lag the launch by one step.

        The step launched here is scheduled before the previous step's tokens reach the host:
        each sequence's newest token is pending (the device takes it from the previous step's
        sampled tokens), and a sequence that turns out to have stopped on it computes one token
        too many, which is dropped. Requests with repetition, presence or frequency penalties
        need every token on the host to sample, so while one runs the steps do not overlap;
        neither do speculative steps (the drafts are made from the newest tokens)."""
        outputs: list[StepOutput] = []
        start = self._time_plain()
        behind_decode = self._inflight is not None and self._inflight_decode
        if self._inflight is not None and self._needs_host_tokens():
            outputs = self._resolve()
        batch, is_prefill = self.scheduler.schedule()
        if self._speculating and batch and not is_prefill and self.spec.takes(batch):
            return outputs + self._speculate(batch)
        decode = bool(batch) and not is_prefill
        if self.spec is not None and decode and behind_decode:
            self._last_plain = (len(batch), start)
        prev = self._inflight[1] if self._inflight is not None else None
        handle = self.runner.launch(batch, is_prefill, prev) if batch else None
        if self._inflight is not None:
            outputs = self._resolve()
        if handle is not None:
            self.scheduler.advance(batch, handle.complete)
            self._inflight, self._inflight_decode = (batch, handle), decode
        return outputs

    def _time_plain(self) -> float:
        """Now; the plain decode step timed last (if any) is reported to the speculative gate as
        taking until now, and where that resumes speculation, this step already follows it."""
        if self.spec is None:
            return 0.0
        gate = self.spec.gate
        now = gate.clock()
        if self._last_plain is not None:
            rows, start = self._last_plain
            self._last_plain = None
            allowed = gate.allows()
            gate.record(False, rows, now - start, rows)
            if gate.allows() != allowed:
                self._check_speculating()
        return now

    def finish_step(self) -> list[StepOutput]:
        """Read the step in flight, launching none: afterwards nothing runs on the device."""
        self._last_plain = None  # the pause that follows is no step's time
        return self._resolve() if self._inflight is not None else []

    def _needs_host_tokens(self) -> bool:
        # A grammar's next mask depends on the token just sampled, as penalties do, and drafts
        # are made from the newest tokens.
        return self._speculating or any(s.params.needs_penalties or s.grammar is not None for s in self.scheduler.running)

    def _resolve(self) -> list[StepOutput]:
        """Read the step in flight's tokens into their sequences and apply the stop rules."""
        batch, handle = self._inflight
        self._inflight = None
        tokens, logprobs = self.runner.collect(handle)
        top, prompt = self.runner.collect_scores(handle)
        for i, first, scores in prompt:
            batch[i].prompt_logprobs.update(enumerate(scores, first))
        outputs = []
        for j, i in enumerate(handle.complete):
            seq = batch[i]
            if not self.scheduler.receive(seq, j, tokens[j]):
                continue
            if logprobs is not None:
                seq.output_logprobs.append(logprobs[j])
            if top is not None and seq.params.top_logprobs:
                seq.output_top_logprobs.append(top[j][: seq.params.top_logprobs])
            if seq.grammar is not None:
                seq.grammar.accept(tokens[j])
            if self.sequences.get(seq.request_id) is seq:
                outputs.append(self._check_stop(seq))
        self._check_speculating()
        return outputs

    def _check_speculating(self) -> None:
        if self.spec is not None:
            self._speculating = self.spec.wants(self.scheduler.running)

    def _speculate(self, batch: list[Sequence]) -> list[StepOutput]:
        """One speculative decode step, run to the end (engine/speculative.py): each sequence's
        verified tokens are appended and stop-checked one by one; the first that stops it drops
        the rest, and the cache keeps the K/V of the tokens kept."""
        outputs: list[StepOutput] = []
        start = self.spec.gate.clock()
        for seq, tokens in zip(batch, self.spec.step(self.runner, self.block_manager, batch)):
            for token in tokens:
                self.scheduler.append_verified(seq, token)
                out = self._check_stop(seq)
                outputs.append(out)
                if out.finished:
                    break
            if not seq.is_finished:
                self.block_manager.keep_verified(seq, len(seq) - 1 - seq.num_computed_tokens)
        self.spec.gate.record(True, len(outputs), self.spec.gate.clock() - start, len(batch))
        self._check_speculating()
        return outputs

    def _check_stop(self, seq: Sequence) -> StepOutput:
        """Apply the stop rules to the sequence's newest token and turn it into text."""
        p = seq.params
        token = seq.last_token
        reason = None
        stopped_by_token = (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids
        if stopped_by_token or (seq.grammar is not None and seq.grammar.is_terminated):
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        detok = self._detoks.get(seq.request_id)
        new_text, hit_stop_string = "", False
        if detok is not None and not stopped_by_token:
            new_text, hit_stop_string = detok.add_until(token, p.stop)
            reason = "stop" if hit_stop_string else reason
        if reason is None:
            event = TokenEvent(seq.request_id, [token], new_text, seq.num_output_tokens)
            if p.logprobs:
                event.new_logprobs = seq.output_logprobs[-1:]
                event.new_top_logprobs = seq.output_top_logprobs[-1:] if p.top_logprobs else None
            if p.prompt_logprobs and seq.num_output_tokens == 1:
                event.prompt_logprobs = [seq.prompt_logprobs.get(i) for i in range(seq.num_prompt_tokens)]
            return event
        if detok is not None and not hit_stop_string:
            new_text += detok.flush()
        self.scheduler.finish(seq, reason)
        self.runner.sampler.release(seq)
        self.sequences.pop(seq.request_id, None)
        self._detoks.pop(seq.request_id, None)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=seq.output_token_ids,
            text=detok.text if detok is not None else "",
            finish_reason=reason,
            logprobs=list(seq.output_logprobs) if p.logprobs else None,
            top_logprobs=list(seq.output_top_logprobs) if p.logprobs and p.top_logprobs else None,
            prompt_logprobs=[seq.prompt_logprobs.get(i) for i in range(seq.num_prompt_tokens)] if p.prompt_logprobs else None,
            num_cached_tokens=seq.num_cached_tokens,
            new_token_ids=[token],
            new_text=new_text,
        )

    def generate(self, prompts, params: SamplingParams | list[SamplingParams], use_tqdm: bool = False) -> list[RequestOutput]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("pass one SamplingParams, or one per prompt")
        ids = [self.add_request(p, sp).request_id for p, sp in zip(prompts, params_list)]
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generating", unit="req")
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [results[i] for i in ids]
