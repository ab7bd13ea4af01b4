"""The OpenAI-compatible routes: models, chat completions, completions, stored results."""

from __future__ import annotations

from fastapi import FastAPI, Request

from inferd.server.access import audit_fields
from inferd.server.errors import OpenAIError
from inferd.server.generation import generate
from inferd.server.openai_format import ChatShape
from inferd.server.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Completion, CompletionRequest
from inferd.server.reasoning import prompt_opens_thinking
from inferd.server.state import state_of
from inferd.server.tool_calls import call_prefill
from inferd.tokenizer import ToolsUnsupported


def _max_tokens(request: Request, body: ChatCompletionRequest) -> int | None:
    """The completion length asked for, checked against this server's limit under the name the
    client sent it by (max_completion_tokens, OpenAI's newer name, wins where both are)."""
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    value = getattr(body, name)
    if body.max_tokens is not None and value != body.max_tokens:
        message = f"max_completion_tokens is {value} and max_tokens is {body.max_tokens}: they are one setting, send one"
        raise OpenAIError(400, message, param="max_completion_tokens")
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


def check_stream_options(body) -> None:
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "stream_options is only for streams: send stream: true or leave it out", param="stream_options")


def _tools_in_play(body: ChatCompletionRequest) -> list[dict] | None:
    """The request's tools as the template reads them, None when there are none or tool_choice
    is `none`; the 400 naming the field for a choice that does not fit them."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise OpenAIError(400, "tool_choice needs tools: send the tools the model may call", param="tool_choice")
        return None
    names = [t.function.name for t in body.tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise OpenAIError(400, f"tools names {', '.join(twice)} more than once: function names must be unique", param="tools")
    if not isinstance(choice, str) and choice is not None and choice.function.name not in names:
        message = f"tool_choice names {choice.function.name!r}, which is not one of tools ({', '.join(names)})"
        raise OpenAIError(400, message, param="tool_choice")
    if choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in body.tools]


def _tool_instruction(body: ChatCompletionRequest) -> str:
    """What tool_choice and parallel_tool_calls ask of the model, in the tools section."""
    choice, lines = body.tool_choice, []
    if choice == "required":
        lines.append("You must answer by calling at least one of these functions.")
    elif choice is not None and not isinstance(choice, str):
        lines.append(f"You must answer by calling the function {choice.function.name}.")
    if body.parallel_tool_calls is False:
        lines.append("Call at most one function.")
    return " ".join(lines)


def _prefill(body: ChatCompletionRequest, prompt_text: str) -> str:
    """For tool_choice required or named: the start of the call, written into the prompt, so the
    model's answer can only be a call (the arguments are the model's own: holding them to the
    function's schema is for a grammar, see tool_calls.call_prefill). Not after an R1 prompt that
    opened the thinking: forcing the call there would cut the reasoning out."""
    choice = body.tool_choice
    if choice is None or choice in ("auto", "none") or prompt_opens_thinking(prompt_text):
        return ""
    return call_prefill(None if choice == "required" else choice.function.name)


def _render(engine, body: ChatCompletionRequest, tools: list[dict] | None) -> str:
    messages = [m.template_dict() for m in body.messages]
    try:
        return engine.apply_chat_template(messages, tools=tools, tool_instruction=_tool_instruction(body))
    except ToolsUnsupported as e:
        raise OpenAIError(400, f"tools: {e}", param="tools") from None
    except Exception as e:
        raise OpenAIError(400, f"messages could not be rendered with the model's chat template: {e}") from None


def _shape(reasoning: str, text: str, tools: list[dict] | None, prefill: str, structured: bool) -> ChatShape | None:
    """How the answers are read, None for plain text. No thinking is split off an answer whose
    grammar holds it to JSON from its first token (response_format), nor off a prefilled call's
    arguments."""
    if prefill or structured:
        reasoning = "none"
    if not tools and reasoning == "none":
        return None
    names = None if tools is None else {t["function"]["name"] for t in tools}
    return ChatShape(reasoning=reasoning, prompt_text=text, tool_names=names, prefill=prefill)


async def models(request: Request):
    s = state_of(request)
    entry = {"id": s.model_id, "object": "model", "created": s.started, "owned_by": "inferd", **s.build}
    return {"object": "list", "data": [entry]}


async def openapi(request: Request):
    return request.app.openapi()


async def chat_completions(body: ChatCompletionRequest, request: Request):
    _check_top_logprobs(body)
    check_stream_options(body)
    max_tokens = _max_tokens(request, body)
    tools = _tools_in_play(body)
    state = state_of(request)
    engine = state.serving(body.model)
    text = _render(engine, body, tools)
    prefill = _prefill(body, text) if tools else ""
    options = {"top_logprobs": body.top_logprobs or 0} | _structured(body)
    shape = _shape(state.cfg.reasoning_parser, text, tools, prefill, structured="json_schema" in options)
    prompt_ids = engine.encode(text + prefill, add_special_tokens=False)
    return await generate(
        request,
        engine,
        body,
        prompt_ids,
        max_tokens,
        chat=True,
        logprobs=body.logprobs,
        prompt_text=text + prefill,
        options=options,
        shape=shape,
    )


async def completions(body: CompletionRequest, request: Request):
    check_stream_options(body)
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
    # The documented 200 bodies: a whole response, or (stream: true) server-sent events of chunks.
    chat_200 = {"model": ChatCompletion | ChatCompletionChunk, "description": "a chat.completion, or its chunks as SSE"}
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses={200: chat_200})
    completion_200 = {"model": Completion, "description": "a text_completion, or its chunks as SSE"}
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses={200: completion_200})
    app.add_api_route("/v1/results/{result_id}", get_result, methods=["GET"])
