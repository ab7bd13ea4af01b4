"""The OpenAI-compatible routes: models, chat completions, completions, stored results."""

from __future__ import annotations

from fastapi import FastAPI, Request

from inferd.server.access import audit_fields
from inferd.server.errors import OpenAIError
from inferd.server.generation import generate
from inferd.server.protocol import ChatCompletionRequest, CompletionRequest
from inferd.server.state import state_of


def _max_tokens(request: Request, body: ChatCompletionRequest) -> int | None:
    """The completion length asked for, checked against this server's limit under the name the
    client sent it by (max_completion_tokens, OpenAI's newer name, wins where both are)."""
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    value = getattr(body, name)
    limit = state_of(request).cfg.max_tokens_limit
    if value is not None and value > limit:
        raise OpenAIError(400, f"{name} is {value}; this server allows at most {limit}", param=name)
    return value


def _check_top_logprobs(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        message = "top_logprobs is set but logprobs is not: send logprobs: true with top_logprobs"
        raise OpenAIError(400, message, param="top_logprobs")


def _structured(body) -> dict:
    """SamplingParams fields for response_format (json_object or json_schema)."""
    schema = body.response_format.schema_to_enforce() if body.response_format is not None else None
    return {"json_schema": schema} if schema is not None else {}


async def models(request: Request):
    s = state_of(request)
    entry = {"id": s.model_id, "object": "model", "created": s.started, "owned_by": "inferd", **s.build}
    return {"object": "list", "data": [entry]}


async def openapi(request: Request):
    return request.app.openapi()


async def chat_completions(body: ChatCompletionRequest, request: Request):
    _check_top_logprobs(body)
    max_tokens = _max_tokens(request, body)
    engine = state_of(request).serving(body.model)
    try:
        text = engine.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
    except Exception as e:
        raise OpenAIError(400, f"messages could not be rendered with the model's chat template: {e}") from None
    prompt_ids = engine.encode(text, add_special_tokens=False)
    options = {"top_logprobs": body.top_logprobs or 0} | _structured(body)
    return await generate(
        request, engine, body, prompt_ids, max_tokens, chat=True, logprobs=body.logprobs, prompt_text=text, options=options
    )


async def completions(body: CompletionRequest, request: Request):
    engine = state_of(request).serving(body.model)
    if isinstance(body.prompt, str):
        prompt_ids, text = engine.encode(body.prompt), body.prompt
    else:
        prompt_ids, text = list(body.prompt), None
    # logprobs: N is each token's logprob and its N most likely alternatives (0: none); with
    # echo, the prompt's tokens are scored too, so a client can score a text.
    logprobs = body.logprobs is not None
    options = {"top_logprobs": body.logprobs or 0, "prompt_logprobs": logprobs and body.echo} | _structured(body)
    echo_text = None
    if body.echo:
        echo_text = text if text is not None else "".join(engine.token_texts(prompt_ids))
    return await generate(
        request,
        engine,
        body,
        prompt_ids,
        body.max_tokens,
        chat=False,
        logprobs=logprobs,
        prompt_text=text,
        options=options,
        echo_text=echo_text,
    )


async def get_result(result_id: str, request: Request):
    s = state_of(request)
    found = s.results.get(result_id, request.state.principal.key_id)
    if found is None:  # another key's result looks exactly like a missing one
        raise OpenAIError(404, f"no result {result_id!r} for this key", code="result_not_found")
    await s.audit_record(**audit_fields(request, 200))
    return found


def register(app: FastAPI) -> None:
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/openapi.json", openapi, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/results/{result_id}", get_result, methods=["GET"])
