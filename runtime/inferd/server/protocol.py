"""OpenAI request bodies, validated strictly: NaN, out-of-range and wrong types are 400s."""

from __future__ import annotations

import email.message
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


def _no_lone_surrogates(value):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode: a lone surrogate (such as \\ud800) is not") from None
    elif isinstance(value, list):
        for item in value:
            _no_lone_surrogates(item)
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


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


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
    user: str | None = None
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    # OpenAI's newer name for max_tokens on chat; it wins where both are sent.
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS_MAX)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


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
