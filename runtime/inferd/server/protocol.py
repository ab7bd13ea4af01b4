"""OpenAI request bodies, validated strictly: NaN, out-of-range and wrong types are 400s."""

from __future__ import annotations

import email.message
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inferd.server.errors import OpenAIError

# OpenAI's seed is a signed 64-bit integer; the non-negative half is accepted (see
# sampling_params.SEED_MAX: choice i of n samples with seed + i, which stays below it).
API_SEED_MAX = 2**63 - 1
# OpenAI's own range for chat's top_logprobs.
TOP_LOGPROBS_MAX = 20
# Upper bounds of the runtime limits: far above any real setting, low enough that a typo (or 2^70)
# is a 400 instead of a limit that is in effect no limit (issue 24).
MAX_CONCURRENT_MAX = 100_000
RPM_MAX = 10_000_000


# How deep a JSON value in a request (a tool's parameters schema) may nest: far beyond any real
# schema, and well inside Python's recursion limit, so a deeper one is a 400, not a 500.
MAX_NESTING = 64


def _no_lone_surrogates(value):
    stack = [(value, 0)]  # iterative: a deep value is refused by depth, not by a RecursionError
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("strings must be valid Unicode: a lone surrogate (such as \\ud800) is not") from None
        elif isinstance(item, (list, dict)):  # a tool's JSON Schema nests strings in dicts
            if depth >= MAX_NESTING:
                raise ValueError(f"nested more than {MAX_NESTING} levels deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


class _Base(BaseModel):
    # Unknown fields are ignored, as OpenAI's API does; NaN/inf are refused.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    # JSON's "\ud800" escape decodes to a str that cannot be encoded as UTF-8: refused here, it is
    # a 400 like any bad field, instead of a 500 from the tokenizer (issue 24).
    _unicode = field_validator("*")(_no_lone_surrogates)


class ContentPart(_Base):
    type: Literal["text"]
    text: str


# ---- tools (issue 23): OpenAI's shapes, DeepSeek-V3's format behind them (server/tool_calls.py)
# OpenAI's rule for function names; it also keeps a name from holding the format's own tokens.
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128  # OpenAI's limit


class FunctionDefinition(_Base):
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema object, shown to the model
    strict: bool | None = None


class ToolDefinition(_Base):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Base):
    name: str = Field(..., pattern=FUNCTION_NAME)


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Base):
    name: str = Field(..., pattern=FUNCTION_NAME)
    arguments: str


class MessageToolCall(_Base):
    id: str = Field(..., min_length=1)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _fields_fit_the_role(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a message of role {self.role} needs content (only an assistant's with tool_calls may omit it)")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is for assistant messages, not {self.role}")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message of role tool needs tool_call_id: the id of the call it answers")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """The message as chat templates read it (transformers' shape)."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(_Base):
    # Unset: the stream ends with a usage chunk, as inferd's always have (clients and the fault
    # tests read it as the stream's receipt); false: no usage chunk, as OpenAI's default.
    include_usage: bool | None = None


class JsonSchemaSpec(_Base):
    """OpenAI's `response_format.json_schema`: the schema the output must match (enforced while
    sampling, strict or not)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    name: str = Field(..., pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    """`text` (no constraint), `json_object` (any JSON object) or `json_schema` (that schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema, strict}")
        return self

    def schema_to_enforce(self) -> dict | None:
        """The JSON schema the output is held to, or None for free text."""
        if self.type == "json_schema":
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class _SamplingFields(_Base):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=API_SEED_MAX)
    stream: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # An end user's id for the caller's own abuse tracking: kept in the audit record only.
    user: str | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    # OpenAI's newer name for max_tokens on chat; both sent and different is a 400.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _one_tool_choice(cls, value, handler):
        # One message naming the field, instead of pydantic's one per member of the union.
        try:
            return handler(value)
        except ValidationError:
            raise ValueError('send "none", "auto", "required" or {"type": "function", "function": {"name": NAME}}') from None


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


# ---- response shapes, for /openapi.json (the routes build plain dicts: openai_format.py) -----


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(..., description="of prompt_tokens, those the prefix cache held")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(..., description="the answer; null when the thinking never closed or only tools were called")
    reasoning_content: str | None = Field(None, description="an R1-style model's thinking (as vLLM and SGLang name it)")
    tool_calls: list[ToolCallOut] | None = None
    tool_call_error: str | None = Field(
        None, description="why a tool call the model wrote was not valid; its text is kept in content"
    )


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict = Field(..., description="name (first chunk of a call), arguments (the JSON, once the call is complete)")


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    tool_call_error: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`stream: true`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, description="the last chunk's, with choices empty")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class LimitsUpdate(_Base):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_concurrent_per_key: int | None = Field(None, ge=1, le=MAX_CONCURRENT_MAX)
    requests_per_minute_per_key: int | None = Field(None, ge=1, le=RPM_MAX)


class ModelLoad(_Base):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    model: str = Field(..., min_length=1)
    served_model_name: str | None = None


class ModelSwap(_Base):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    model: str = Field(..., min_length=1, max_length=255)  # a package under model_store_dir
    drain_timeout_s: float = Field(1.0, ge=0, le=600)


def require_json(request: Request) -> None:
    """415 for a body that is not said to be JSON, naming the fix: FastAPI would answer a 400 that
    names only "body" (issue 24). A body with no Content-Type at all is refused too, as FastAPI's
    strict_content_type and OpenAI's API do: every OpenAI client sends application/json, and the
    ones that send nothing (or a form type, as `curl -d` does) are told what to send."""
    has_body = "transfer-encoding" in request.headers or request.headers.get("content-length", "0") != "0"
    if not has_body:
        return
    value = request.headers.get("content-type")
    if value:
        parsed = email.message.Message()
        parsed["content-type"] = value
        subtype = parsed.get_content_subtype()
        if parsed.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json")):
            return
    what = f"unsupported Content-Type {value[:100]!r}" if value else "no Content-Type"
    raise OpenAIError(
        415,
        f"{what}: the body must be JSON; send Content-Type: application/json",
        param="content-type",
        code="unsupported_media_type",
    )
