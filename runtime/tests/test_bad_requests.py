"""Issue 24: bad requests are a clear 4xx, never a 5xx, and the engine serves afterwards.

Every case runs against the app in this process under a real uvicorn on 127.0.0.1 (conftest's
LiveServer): real HTTP parsing, one engine shared by the table. Each case is (method, path, body,
headers, expected status, a word the error message must contain); the error body must be
OpenAI's shape ({"error": {"message", "type", "param", "code"}}). Schemathesis then fuzzes every
operation of /openapi.json with the key of a role allowed to call it: no answer may be a 5xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import pytest

MSG = [{"role": "user", "content": "hello"}]
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": MSG, "max_tokens": 2} | fields


def compl(**fields) -> dict:
    return {"model": "tiny", "prompt": "The quick", "max_tokens": 2} | fields


@dataclass
class Case:
    name: str
    method: str
    path: str
    body: object = None  # dict/list/str/int: sent as JSON; bytes: sent as they are; None: no body
    status: int = 400
    needle: str = ""  # a word of the error message that names the problem (case-insensitive)
    key: str | None = "alice"  # whose key goes in 'Authorization: Bearer'; None: no header
    headers: dict = field(default_factory=dict)
    chunked: bool = False
    xfail: str | None = None  # issue 24: what today's server gets wrong


def raw_json(text: str) -> bytes:
    return text.encode()


def numeric(field_name: str, values, path=CHAT, make=chat, needle=None):
    return [Case(f"{field_name}={v!r:.24}", "POST", path, make(**{field_name: v}), needle=needle or field_name) for v in values]


HUGE = [2**64, 2**70, 10**400, -(2**70)]
CASES: list[Case] = [
    # ---- every numeric field: negative, zero where it is meaningless, past its range, huge, wrong type
    *numeric("seed", [2**63, 2**64 - 1, 2**64, 2**70, 10**400, -1, -(2**63), 1.5, "7x"]),
    *numeric("max_tokens", [-1, 0, 201, 10**9, *HUGE, 2.5, "ten"]),
    *numeric("max_completion_tokens", [-1, 0]),
    *[
        Case(
            f"max_completion_tokens={v!r:.24}",
            "POST",
            CHAT,
            chat(max_completion_tokens=v),
            needle="max_completion_tokens",
        )
        for v in (201, 2**64, 10**400)
    ],
    *numeric("n", [0, -1, 9, 2**64, 10**400, "two"]),
    *numeric("top_p", [0, -0.5, 1.5, 2**70, 1e400, "high"]),
    *numeric("temperature", [-1, 2.5, 2**70, 1e400, "hot"]),
    *numeric("presence_penalty", [2.5, -(2**70)]),
    *numeric("frequency_penalty", [-2.5, 2**70]),
    *numeric("logprobs", [6, -1, 2**64, "all"], path=COMPL, make=compl),
    *numeric("logprobs", ["maybe", 2], path=CHAT, make=chat),
    *[
        Case(
            f"top_logprobs={v!r:.24}",
            "POST",
            CHAT,
            chat(logprobs=True, top_logprobs=v),
            needle="top_logprobs",
        )
        for v in (2**70, -1, 21, 1.5)
    ],
    Case("response_format type unknown", "POST", CHAT, chat(response_format={"type": "xml"}), needle="response_format"),
    Case(
        "response_format json_schema missing", "POST", CHAT, chat(response_format={"type": "json_schema"}), needle="json_schema"
    ),
    Case(
        "response_format schema not a schema",
        "POST",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
        needle="response_format",
    ),
    Case(
        "response_format name with spaces",
        "POST",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
        needle="name",
    ),
    Case(
        "response_format on completions, bad pattern",
        "POST",
        COMPL,
        compl(
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "("}}}
        ),
        needle="response_format",
    ),
    Case("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=0), needle="logprobs: true"),
    Case(
        "temperature NaN",
        "POST",
        CHAT,
        raw_json('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
    ),
    Case(
        "top_p Infinity",
        "POST",
        CHAT,
        raw_json('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": Infinity}'),
    ),
    # ---- wrong types and shapes
    Case("body is a list", "POST", CHAT, [chat()], needle="body"),
    Case("body is a string", "POST", CHAT, "hello", needle="body"),
    Case("body is null", "POST", CHAT, b"null", needle="body"),
    Case("no body at all", "POST", CHAT, None, needle="body"),
    Case("messages is a string", "POST", CHAT, chat(messages="hello"), needle="messages"),
    Case("messages holds a number", "POST", CHAT, chat(messages=[1]), needle="messages"),
    Case("message without content", "POST", CHAT, chat(messages=[{"role": "user"}]), needle="content"),
    Case("content is a number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), needle="content"),
    Case(
        "image content part",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
        needle="messages",
    ),
    Case("model is a number", "POST", CHAT, chat(model=5), needle="model"),
    Case("model missing", "POST", CHAT, {"messages": MSG}, needle="model"),
    Case("stream is not a boolean", "POST", CHAT, chat(stream="definitely"), needle="stream"),
    Case("stop is a number", "POST", CHAT, chat(stop=5), needle="stop"),
    Case("stop holds numbers", "POST", CHAT, chat(stop=[1, 2]), needle="stop"),
    Case("prompt is an object", "POST", COMPL, compl(prompt={}), needle="prompt"),
    Case("prompt is empty", "POST", COMPL, compl(prompt=""), needle="prompt"),
    Case("prompt token id negative", "POST", COMPL, compl(prompt=[-1]), needle="prompt"),
    Case("prompt token id 2^70", "POST", COMPL, compl(prompt=[2**70]), needle="prompt"),
    Case("prompt token id past the vocabulary", "POST", COMPL, compl(prompt=[10**6]), needle="prompt"),
    Case("echo is not a boolean", "POST", COMPL, compl(echo="sure"), needle="echo"),
    # ---- model, messages, roles, stop lists, context
    Case("unknown model", "POST", CHAT, chat(model="gpt-9"), status=404, needle="does not exist"),
    Case("unknown model, completions", "POST", COMPL, compl(model="../tiny"), status=404, needle="does not exist"),
    Case("empty messages", "POST", CHAT, chat(messages=[]), needle="messages"),
    Case("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), needle="role"),
    Case("tool role without a tool call", "POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), needle="role"),
    Case("five stop strings", "POST", CHAT, chat(stop=list("abcde")), needle="stop"),
    Case("10,000 stop strings", "POST", CHAT, chat(stop=[f"s{i}" for i in range(10_000)]), needle="stop"),
    Case("stop string of 300 characters", "POST", CHAT, chat(stop="x" * 300), needle="stop"),
    Case("empty stop string", "POST", CHAT, chat(stop=[""]), needle="stop"),
    Case(
        "prompt longer than the context",
        "POST",
        CHAT,
        chat(messages=[{"role": "user", "content": "word " * 400}]),
        needle="context",
    ),
    Case("prompt + max_tokens past the context", "POST", COMPL, compl(prompt=[5] * 200, max_tokens=100), needle="context"),
    # ---- encodings
    Case("malformed JSON", "POST", CHAT, b"{not json", needle="JSON"),
    Case("truncated JSON", "POST", CHAT, raw_json('{"model": "tiny", "messages": [{"role": "us'), needle="JSON"),
    Case(
        "invalid UTF-8", "POST", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', needle="UTF-8"
    ),
    Case(
        "lone surrogate in content",
        "POST",
        CHAT,
        raw_json('{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'),
        needle="surrogate",
    ),
    Case(
        "lone surrogate in the model name",
        "POST",
        CHAT,
        raw_json('{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}'),
        needle="surrogate",
    ),
    Case(
        "lone surrogate in stop",
        "POST",
        CHAT,
        raw_json('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}'),
        needle="surrogate",
    ),
    Case("lone surrogate in the prompt", "POST", COMPL, raw_json('{"model": "tiny", "prompt": "a\\udc00b"}'), needle="surrogate"),
    # ---- transport: size, content type, auth, paths, methods
    Case(
        "2 MiB body with Content-Length",
        "POST",
        CHAT,
        json.dumps(chat(messages=[{"role": "user", "content": "a" * (2 << 20)}])).encode(),
        status=413,
        needle="larger",
    ),
    Case(
        "2 MiB chunked body",
        "POST",
        CHAT,
        json.dumps(chat(messages=[{"role": "user", "content": "a" * (2 << 20)}])).encode(),
        status=413,
        needle="larger",
        chunked=True,
    ),
    Case(
        "no content type",
        "POST",
        CHAT,
        json.dumps(chat()).encode(),
        headers={"content-type": None},
        status=415,
        needle="content-type",
    ),
    Case(
        "text/plain content type",
        "POST",
        CHAT,
        json.dumps(chat()).encode(),
        headers={"content-type": "text/plain"},
        status=415,
        needle="application/json",
    ),
    Case(
        "form content type",
        "POST",
        CHAT,
        b"model=tiny",
        headers={"content-type": "application/x-www-form-urlencoded"},
        status=415,
        needle="content-type",
    ),
    Case("no Authorization header", "POST", CHAT, chat(), key=None, status=401, needle="Authorization"),
    Case(
        "Basic scheme",
        "POST",
        CHAT,
        chat(),
        key=None,
        headers={"Authorization": "Basic YWxpY2U6cHc="},
        status=401,
        needle="Bearer",
    ),
    Case(
        "Token scheme", "GET", "/v1/models", key=None, headers={"Authorization": "Token sk-inferd-x"}, status=401, needle="Bearer"
    ),
    Case("Bearer without a key", "GET", "/v1/models", key=None, headers={"Authorization": "Bearer"}, status=401, needle="Bearer"),
    Case(
        "Bearer with two words",
        "GET",
        "/v1/models",
        key=None,
        headers={"Authorization": "Bearer a b"},
        status=401,
        needle="Bearer",
    ),
    Case(
        "unknown key",
        "GET",
        "/v1/models",
        key=None,
        headers={"Authorization": "Bearer sk-inferd-" + "0" * 64},
        status=401,
        needle="key",
    ),
    Case("revoked key", "GET", "/v1/models", key="rex", status=401, needle="revoked"),
    Case("key in the URL (api_key)", "GET", "/v1/models?api_key=sk-inferd-x", key=None, needle="Authorization"),
    Case("key in the URL (access_token)", "POST", CHAT + "?access_token=sk-inferd-x", chat(), needle="Authorization"),
    Case("NUL byte in a result id", "GET", "/v1/results/abc%00def", status=404, needle="result"),
    Case("NUL byte in a route", "GET", "/v1/models%00", status=404, needle="not found"),
    Case("path traversal in a result id", "GET", "/v1/results/..%2F..%2Fkeys.json", status=404, needle="not found"),
    Case("dot-dot result id", "GET", "/v1/results/%2e%2e", status=404, needle="result"),
    Case("10 KB result id", "GET", "/v1/results/" + "r" * 10_000, status=404, needle="result"),
    Case("unknown route", "GET", "/v1/engines", status=404, needle="not found"),
    Case("GET on a POST route", "GET", CHAT, status=405, needle="method"),
    Case("DELETE on the limits", "DELETE", "/admin/limits", key="olivia", status=405, needle="method"),
    # ---- admin routes as a user, and bad bodies for the admin routes
    *[
        Case(f"{m} {p} as a user", m, p, status=403, needle="role")
        for m, p in (
            ("GET", "/metrics"),
            ("GET", "/admin/limits"),
            ("PUT", "/admin/limits"),
            ("GET", "/admin/logs"),
            ("GET", "/admin/models"),
            ("POST", "/admin/models/load"),
            ("POST", "/admin/models/unload"),
        )
    ],
    Case(
        "limits as admin (ops only)", "PUT", "/admin/limits", {"max_concurrent_per_key": 2}, key="adam", status=403, needle="role"
    ),
    Case("model load as ops", "POST", "/admin/models/load", {"model": "/nonexistent"}, key="olivia", status=403, needle="role"),
    *[
        Case(f"limits {b!r:.40}", "PUT", "/admin/limits", b, key="olivia", needle=n, xfail=x)
        for b, n, x in (
            ({"max_concurrent_per_key": 0}, "max_concurrent_per_key", None),
            ({"max_concurrent_per_key": -1}, "max_concurrent_per_key", None),
            ({"requests_per_minute_per_key": 1.5}, "requests_per_minute_per_key", None),
            ({"requests_per_minute_per_key": "many"}, "requests_per_minute_per_key", None),
            (
                {"requests_per_minute_per_key": 10**400},
                "requests_per_minute_per_key",
                None,
            ),
            (
                {"max_concurrent_per_key": 2**70},
                "max_concurrent_per_key",
                None,
            ),
            ({"rate": 5}, "rate", None),
            ([1, 2], "body", None),
            (b"{not json", "JSON", None),
        )
    ],
    *[
        Case(f"model load {b!r:.40}", "POST", "/admin/models/load", b, key="adam", needle=n, xfail=x)
        for b, n, x in (
            ({}, "model", None),
            ({"model": ""}, "model", None),
            ({"model": 5}, "model", None),
            ({"model": "/nonexistent"}, "config.json", None),
            ({"model": "/etc"}, "config.json", None),
            ({"model": "/tmp/a\u0000b"}, "model", None),
            (
                {"model": "/" + "x" * 5000},
                "model",
                None,
            ),
            ({"model": "/tmp", "device": "cuda"}, "device", None),
            (b'{"model": "\\ud800"}', "model", None),
            (b"[]", "body", None),
        )
    ],
    Case("log limit not a number", "GET", "/admin/logs?limit=abc", key="olivia", needle="limit"),
]


def send(live, case: Case) -> httpx.Response:
    headers = live.auth(case.key) if case.key is not None else {}
    content = None
    if isinstance(case.body, bytes):
        content = case.body
    elif case.body is not None:
        content = json.dumps(case.body).encode()
    if content is not None:
        headers["content-type"] = "application/json"
    # A header the case sets to None is left out.
    headers = {k: v for k, v in (headers | case.headers).items() if v is not None}
    if case.chunked:
        data = content

        def pieces():
            for i in range(0, len(data), 64 << 10):
                yield data[i : i + (64 << 10)]

        content = pieces()
    return httpx.request(case.method, live.url + case.path, content=content, headers=headers, timeout=60)


def serves(live) -> bool:
    r = httpx.post(live.url + CHAT, json=chat(max_tokens=2, temperature=0), headers=live.auth(), timeout=60)
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def params() -> list:
    return [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []) for c in CASES]


def test_the_table_has_at_least_70_cases():
    assert len(CASES) >= 70, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("case", params())
def test_bad_request_is_a_clear_4xx_and_the_engine_serves_after(live_server, case):
    r = send(live_server, case)
    assert r.status_code < 500, f"{case.name}: {r.status_code} {r.text[:500]}"
    assert r.status_code == case.status, f"{case.name}: {r.status_code} {r.text[:300]}"
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] and err["message"], err
    assert case.needle.lower() in err["message"].lower(), f"{case.name}: the message does not name {case.needle!r}: {err}"
    assert serves(live_server), f"the engine stopped serving after {case.name}"


# ---- schemathesis over /openapi.json ------------------------------------------------------------
# The role whose key each operation gets, so that fuzzing reaches the route and not just the 403.
FUZZ_AS = {
    "/admin/limits": "olivia",
    "/admin/logs": "olivia",
    "/metrics": "olivia",
    "/admin/models": "adam",
    "/admin/models/load": "adam",
}
FUZZ_EXAMPLES = 40


def test_schemathesis_finds_no_server_error(live_server):
    """Generated requests for every operation (the unload is left out: it would stop the engine the
    rest of the run needs); `not_a_server_error` fails on any 5xx."""
    import hypothesis
    import schemathesis
    from schemathesis.checks import not_a_server_error

    doc = httpx.get(live_server.url + "/openapi.json", headers=live_server.auth(), timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    failures, calls = [], 0
    ops = [r.ok() for r in schema.get_all_operations()]
    ops = [op for op in ops if op.path != "/admin/models/unload"]
    assert len(ops) >= 12, [op.path for op in ops]

    def fuzzer(op):
        headers = live_server.auth(FUZZ_AS.get(op.path, "alice"))

        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def fuzz(case):
            nonlocal calls
            calls += 1
            try:
                case.call_and_validate(base_url=live_server.url, headers=headers, checks=[not_a_server_error], timeout=60)
            except Exception as e:  # every failure is collected and reported, not just the first
                failures.append(f"{case.method} {case.formatted_path}: {e}"[:600])

        return fuzz

    for op in ops:
        fuzzer(op)()
    httpx.put(
        live_server.url + "/admin/limits",
        json={"max_concurrent_per_key": 64, "requests_per_minute_per_key": 100000},
        headers=live_server.auth("olivia"),
        timeout=30,
    ).raise_for_status()
    print(f"schemathesis: {calls} generated requests over {len(ops)} operations, {len(failures)} failed")
    assert calls >= 4 * FUZZ_EXAMPLES, f"schemathesis generated only {calls} requests"
    assert not failures, f"{len(failures)} of {calls} generated requests failed:\n" + "\n".join(failures[:20])
    assert serves(live_server)
