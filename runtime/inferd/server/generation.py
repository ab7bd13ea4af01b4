"""One generation request from admission to its end. `generate` checks it (this server's limits,
then the engine's), admits it (rate and concurrency limits), makes its `begin` audit record
durable before any output exists, runs it (n choices merged from n engine streams), stores its
result, makes its `end` record (the outcome: status, tokens, cut short or not) durable before the
response or the stream's [DONE] goes out, and counts it. A stream cut short (client gone, engine
failed, server stopping) still gets its `end`; a process killed outright leaves a `begin` without
one, which `inferd audit verify` reports as interrupted. The routes in openai_routes only turn OpenAI bodies into a
prompt for it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from inferd.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFull
from inferd.outputs import RequestOutput
from inferd.sampling_params import InvalidRequestError, SamplingParams
from inferd.server.access import Principal, audit_fields
from inferd.server.audit import outcome_of
from inferd.server.errors import OpenAIError, error_body
from inferd.server.limits import admit, queue_full
from inferd.server.logprobs import chat_logprobs, completion_logprobs, echoed_prompt
from inferd.server.openai_format import (
    DONE_EVENT,
    ChatShape,
    ChoiceParser,
    ChunkFormatter,
    choice_body,
    completion_body,
    sse,
    usage_body,
)
from inferd.server.state import ServerState, state_of

# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass
class Generation:
    """An admitted request: what the engine runs, and what its response and audit record say."""

    state: ServerState
    engine: AsyncLLMEngine
    request: Request
    principal: Principal
    chat: bool
    logprobs: bool
    prompt_ids: list[int]
    params: list[SamplingParams]
    record: dict
    rid: str
    created: int
    model: str
    t0: float
    first: float | None = None  # when the first token arrived
    reservation: object = None  # the engine's Reservation: room for the sequences not yet submitted
    closed: bool = False
    top_logprobs: int = 0
    echo_text: str | None = None  # completions' echo: the prompt, put before each choice's text
    shape: ChatShape | None = None  # a chat's reasoning and tool-call parsing
    include_usage: bool | None = None  # stream_options.include_usage

    def release(self) -> None:
        """The limiter slots and any unused queue room back."""
        self.state.limiter.release(self.principal.key_id, len(self.params))
        if self.reservation is not None:
            self.reservation.release()

    def close(self, status: str, completion_tokens: int = 0, finals=()) -> None:
        """The request's last step, once whichever way it ends: the `end` record (a second end is
        ignored by the log), its limiter slots back, its metrics."""
        if self.closed:
            return
        self.closed = True
        self.state.audit.end(self.rid, **outcome_of(GeneratorExit()), completion_tokens=completion_tokens)
        self.release()
        self.observe(finals)
        self.state.metrics.requests.labels(self.record["route"], status).inc()

    def usage(self, finals) -> dict:
        completion, cached = sum(len(o.token_ids) for o in finals), sum(o.num_cached_tokens for o in finals)
        return usage_body(len(self.prompt_ids), len(self.params), completion, cached)

    def token_logprobs(self, ids, logprobs, top, prompt_scores=None, echo=False, offset=0) -> dict:
        """Logprobs of output tokens (after the echoed prompt's, with `echo`) in the route's shape."""
        texts = self.engine.token_texts
        if self.chat:
            return chat_logprobs(texts, ids, logprobs, top)
        ids, logprobs = list(ids), list(logprobs)
        top = list(top) if top is not None and self.top_logprobs else None
        if echo:
            p_ids, p_lps, p_top = echoed_prompt(self.prompt_ids, prompt_scores, top is not None)
            ids, logprobs, top = p_ids + ids, p_lps + logprobs, (p_top + top if top is not None else None)
        return completion_logprobs(texts, ids, logprobs, top, offset)

    def choice(self, i: int, out: RequestOutput, logprobs: bool, parser: ChoiceParser | None = None) -> dict:
        lp = None
        if logprobs and out.logprobs is not None:
            echo = self.echo_text is not None
            lp = self.token_logprobs(out.token_ids, out.logprobs, out.top_logprobs, out.prompt_logprobs, echo)
        if self.echo_text is not None:
            out = dataclasses.replace(out, text=self.echo_text + out.text)
        return choice_body(self.chat, i, out, lp, parser or (self.shape.parser() if self.shape else None))

    def event_logprobs(self, event, offset: int) -> dict | None:
        """A stream event's share of the logprobs (its tokens'), or None when not asked."""
        if not self.logprobs:
            return None
        if event.finished:
            lps = (event.logprobs or [])[-1:]
            top = event.top_logprobs[-1:] if event.top_logprobs else None
        else:
            lps, top = event.new_logprobs or [], event.new_top_logprobs
        return self.token_logprobs(event.new_token_ids[: len(lps)], lps, top, offset=offset)

    def outcome(self, finals, **extra) -> dict:
        """The `end` record of a request that ran to its end."""
        latency_ms = round((time.perf_counter() - self.t0) * 1000, 1)
        return dict(status=200, completion_tokens=sum(len(o.token_ids) for o in finals), latency_ms=latency_ms, **extra)

    async def end(self, **outcome) -> None:
        """Make the request's outcome durable (OpenAIError 503 when the audit log cannot)."""
        await self.state.audit_wait(lambda: self.state.audit.end(self.rid, **outcome))

    def observe(self, finals) -> None:
        end = time.perf_counter()
        m = self.state.metrics
        m.e2e.observe(end - self.t0)
        if self.first is not None:
            m.ttft.observe(self.first - self.t0)
        for o in finals:
            m.generation_tokens.inc(len(o.token_ids))
            if len(o.token_ids) > 1 and self.first is not None:
                m.tpot.observe((end - self.first) / (len(o.token_ids) - 1))


def sampling_params(
    state: ServerState, engine: AsyncLLMEngine, body, prompt_ids, max_tokens, logprobs, options=None
) -> list[SamplingParams]:
    """The n choices' SamplingParams, or the 400 that names the field at fault."""
    cfg = state.cfg
    if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
        message = f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_limit}"
        raise OpenAIError(400, message, param="max_tokens")
    if body.n > cfg.max_n:
        raise OpenAIError(400, f"n is {body.n}; this server allows at most {cfg.max_n}", param="n")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        room = engine.check_prompt(prompt_ids, max_tokens)
        return [
            SamplingParams(
                max_tokens=min(max_tokens or room, room, cfg.max_tokens_limit),
                temperature=body.temperature,
                top_p=body.top_p,
                seed=None if body.seed is None else body.seed + i,  # below SEED_MAX: the API caps seed at 2^63-1
                stop=stop,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logprobs=logprobs,
                **(options or {}),
            )
            for i in range(body.n)
        ]
    except InvalidRequestError as e:
        raise OpenAIError(400, str(e), param=e.param) from None


async def generate(
    request: Request, engine: AsyncLLMEngine, body, prompt_ids, max_tokens, *, chat, logprobs, prompt_text, **extra
):
    """`options`: more SamplingParams fields (top_logprobs, prompt_logprobs, json_schema);
    `echo_text`: completions' echo, the prompt put before each choice's text; `shape`: a chat's
    reasoning and tool-call parsing (openai_format.ChatShape)."""
    state = state_of(request)
    params = sampling_params(state, engine, body, prompt_ids, max_tokens, logprobs, extra.get("options"))
    principal: Principal = request.state.principal
    reservation = admit(state.limiter, state.metrics, principal.key_id, len(params), engine)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    record = audit_fields(request, 200) | {"request_id": rid, "model": state.model_id, "prompt_tokens": len(prompt_ids) * body.n}
    if state.cfg.audit_log_prompts:
        record["prompt"] = prompt_text
    if body.user:
        record["user"] = body.user
    g = Generation(
        state=state,
        engine=engine,
        request=request,
        principal=principal,
        chat=chat,
        logprobs=logprobs,
        prompt_ids=prompt_ids,
        params=params,
        record=record,
        rid=rid,
        created=int(time.time()),
        model=state.model_id,
        t0=time.perf_counter(),
        reservation=reservation,
        top_logprobs=params[0].top_logprobs,
        echo_text=extra.get("echo_text"),
        shape=extra.get("shape"),
        include_usage=body.stream_options.include_usage if body.stream_options else None,
    )
    try:  # the request's evidence is durable before generation starts
        await state.audit_wait(lambda: state.audit.begin(rid, {k: v for k, v in record.items() if k != "status"}))
    except BaseException:  # refused (503) or cancelled: the slots go back either way
        g.release()
        raise
    state.metrics.prompt_tokens.inc(len(prompt_ids) * body.n)
    if body.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return ClosingStream(stream(g), on_close=lambda: g.close("499"), media_type="text/event-stream", headers=headers)
    try:
        finals = await collect(g)
    except BaseException as e:
        state.audit.end(rid, **outcome_of(e))
        raise
    finally:
        g.release()
    return await respond(g, finals)


async def merged(g: Generation):
    """(choice index, event) from n engine streams as they come; aborts all on exit."""
    engine, prompt_ids, params = g.engine, g.prompt_ids, g.params
    tenant, priority = g.principal.tenant or g.principal.key_id, g.principal.priority
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, sp):
        try:
            async for event in engine.generate(prompt_ids, sp, tenant=tenant, priority=priority, reservation=g.reservation):
                await queue.put((i, event))
        except Exception as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, sp)) for i, sp in enumerate(params)]
    done = 0
    try:
        while done < len(params):
            i, item = await queue.get()
            if isinstance(item, EngineDeadError):
                raise OpenAIError(503, str(item), "server_error")
            if isinstance(item, QueueFull):  # the hard bound behind admit()'s check
                raise queue_full(str(item))
            if isinstance(item, Exception):
                raise OpenAIError(400, str(item), param=getattr(item, "param", None))
            done += item.finished
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _watch_disconnect(request: Request):
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def collect(g: Generation) -> list[RequestOutput]:
    """Run a non-streaming request to its end: its n outputs, in choice order."""
    finals: dict[int, RequestOutput] = {}
    watcher = asyncio.create_task(_watch_disconnect(g.request))
    try:
        async for i, event in merged(g):
            g.first = g.first or time.perf_counter()
            if event.finished:
                finals[i] = event
            if watcher.done():
                raise OpenAIError(499, "client disconnected")
    finally:
        watcher.cancel()
    g.observe(finals.values())
    return [finals[i] for i in range(len(g.params))]


async def respond(g: Generation, finals: list[RequestOutput]) -> dict:
    """The response of a finished request, once its audit record is durable."""
    usage = g.usage(finals)
    choices = [g.choice(i, o, g.logprobs) for i, o in enumerate(finals)]
    resp = completion_body(g.rid, g.chat, g.created, choices, usage, g.model)
    stored = g.state.results.put(g.rid, g.principal.key_id, resp)
    await g.end(**g.outcome(finals, result_stored=stored))  # durable before the response goes out
    g.state.metrics.requests.labels(g.record["route"], "200").inc()
    return resp


async def stream(g: Generation):
    """A streaming request's server-sent events. The stream ends with [DONE] only once the audit
    record is durable; an engine or audit failure ends it with an error event instead."""
    fmt = ChunkFormatter(g.rid, g.chat, g.created, g.model, g.shape, null_usage=bool(g.include_usage))
    finals: dict[int, RequestOutput] = {}
    status = "499"  # until the stream completes or fails: the client went away
    tokens = collections.Counter()  # per choice, generated so far (the `end` of a stream cut short)
    try:
        if g.chat:
            for i in range(len(g.params)):
                yield fmt.role(i)
        offsets = collections.Counter()  # per choice, text characters streamed (completions' text_offset)
        try:
            async for i, event in merged(g):
                g.first = g.first or time.perf_counter()
                if g.echo_text is not None and not tokens[i]:  # the echoed prompt first
                    lp = g.token_logprobs([], [], [], event.prompt_logprobs, echo=True) if g.logprobs else None
                    offsets[i] += len(g.echo_text)
                    yield fmt.delta(i, g.echo_text, logprobs=lp)
                tokens[i] = event.num_output_tokens
                lp = g.event_logprobs(event, offsets[i])
                offsets[i] += len(event.new_text)
                if event.finished:
                    finals[i] = event
                    yield fmt.delta(i, event.new_text, event.finish_reason, logprobs=lp)
                elif event.new_text or lp:
                    yield fmt.delta(i, event.new_text, logprobs=lp)
        except OpenAIError as e:  # the engine failed mid-stream: audit it, say so, and no [DONE]
            status = str(e.status)
            outcome = outcome_of(e) | {"completion_tokens": sum(tokens.values())}
            with contextlib.suppress(OpenAIError):  # the error event goes out anyway; the drop is counted
                await g.end(**outcome)
            yield sse(error_body(e.message, e.type, code=e.code))
            return
        outs = [finals[i] for i in range(len(g.params))]
        usage = g.usage(outs)
        choices = [g.choice(i, o, False, fmt.parsers.get(i)) for i, o in enumerate(outs)]
        body = completion_body(g.rid, g.chat, g.created, choices, usage, g.model)
        stored = g.state.results.put(g.rid, g.principal.key_id, body)
        try:
            await g.end(**g.outcome(outs, result_stored=stored))
        except OpenAIError as e:
            yield sse(error_body(e.message, e.type, code=e.code))
            return  # no [DONE]: the client sees the stream did not complete
        if g.include_usage is not False:
            yield fmt.usage(usage)
        yield DONE_EVENT
        status = "200"
    finally:  # a stream cut short (client gone, server stopping) still ends in the log
        g.close(status, sum(tokens.values()), list(finals.values()))


class ClosingStream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends: also when the client is gone before
    the body begins, where the body generator never starts and so never reaches its `finally`."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A body paused at a `yield` when the send failed ends here with what it counted; one
            # never started just closes. on_close then finds the request closed or closes it.
            with contextlib.suppress(RuntimeError):
                await self.body_iterator.aclose()
            self.on_close()
