"""Usage and options (issue 23, part 5): cached prompt tokens, stream_options.include_usage,
max_completion_tokens, user; through the official openai client against a real server."""

from __future__ import annotations

import pytest
from test_server import Server, post

from inferd.server.audit import read_records

LONG = "Paged attention keeps the KV cache in fixed-size blocks, and continuous batching lets requests join. " * 2


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    s = Server(llama_dir, tmp_path_factory.mktemp("usage"))
    yield s
    s.stop()


def test_cached_tokens_come_from_the_prefix_cache(server):
    c = server.client()
    messages = [{"role": "user", "content": "cached-tokens test. " + LONG}]
    first = c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    again = c.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 32
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Whole 16-token blocks of the prompt are reused; the last token is always computed.
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 16 <= cached < again.usage.prompt_tokens and cached % 16 == 0
    for _ in range(2):  # completions too
        completion = c.completions.create(model="tiny", prompt="completion cached-tokens test. " + LONG, max_tokens=2)
    assert completion.usage.prompt_tokens_details.cached_tokens >= 16


def test_include_usage_true_ends_with_a_usage_chunk_and_empty_choices(server):
    chunks = list(
        server.client().chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4 and last.usage.prompt_tokens_details.cached_tokens >= 0
    assert all(c.usage is None and c.choices for c in body)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_include_usage_false_sends_no_usage_chunk(server, route):
    c = server.client()
    kw = dict(model="tiny", max_tokens=4, stream=True, stream_options={"include_usage": False})
    if route == "chat":
        chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw))
    else:
        chunks = list(c.completions.create(prompt="hi", **kw))
    assert chunks and all(ch.choices and ch.usage is None for ch in chunks)


def test_stream_options_without_stream_is_a_400(server):
    r = post(
        server, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    r = post(
        server,
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": "maybe"},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.include_usage", r.text


def test_max_completion_tokens_and_max_tokens_must_agree(server):
    msg = [{"role": "user", "content": "hi"}]
    r = post(server, {"model": "tiny", "messages": msg, "max_completion_tokens": 3, "max_tokens": 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
    assert "max_tokens is 100" in r.json()["error"]["message"]
    r = server.client().chat.completions.create(model="tiny", messages=msg, max_completion_tokens=3, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    r = server.client().chat.completions.create(model="tiny", messages=msg, max_completion_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_user_is_recorded_in_the_audit_log_and_nowhere_else(server):
    r = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="end-user-4711"
    )
    assert "end-user-4711" not in r.model_dump_json()
    begins = [
        x
        for x in read_records(server.data_dir / "audit" / "audit.log")
        if x.get("request_id") == r.id and x.get("kind") == "begin"
    ]
    assert [x["user"] for x in begins] == ["end-user-4711"]
    r = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "user": "u" * 257})
    assert r.status_code == 400 and r.json()["error"]["param"] == "user", r.text


def test_openapi_describes_the_new_shapes(server):
    import httpx

    doc = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {server.keys['alice']}"}).json()
    schemas = doc["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]["properties"]
    for field in ("tools", "tool_choice", "parallel_tool_calls", "stream_options", "max_completion_tokens", "user"):
        assert field in request, field
    assert {"tool_call_id", "tool_calls"} <= set(schemas["ChatMessage"]["properties"])
    assert "reasoning_content" in schemas["AssistantMessage"]["properties"]
    assert "reasoning_content" in schemas["ChatDelta"]["properties"] and "tool_calls" in schemas["ChatDelta"]["properties"]
    assert "cached_tokens" in schemas["PromptTokensDetails"]["properties"]


def test_keys_of_one_tenant_share_the_prefix_cache_and_no_one_else_does(server):
    """Issue 23 part 6: the cache is shared by key, or by a tenant ops give several keys."""
    from test_server import inferd

    for name, tenant in (("carol", "team-x"), ("dave", "team-x"), ("erin", "")):
        r = inferd("keys", "add", "--config", str(server.config), "--name", name, "--role", "user", "--tenant", tenant)
        assert r.returncode == 0, r.stderr
        server.keys[name] = r.stdout.strip()
    listed = inferd("keys", "list", "--config", str(server.config)).stdout
    assert "carol\tuser\tnormal\tteam-x\t" in listed and "erin\tuser\tnormal\t-\t" in listed
    messages = [{"role": "user", "content": "tenant isolation test. " + LONG}]

    def cached(name: str) -> int:
        out = server.client(name).chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0)
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached("carol") == 0
    assert cached("dave") >= 16  # the same tenant: carol's blocks are reused
    assert cached("erin") == 0  # a key of no tenant is its own tenant
    assert cached("alice") == 0
    assert cached("erin") >= 16


def test_a_bad_tenant_name_is_refused_and_names_the_fix(server):
    from test_server import inferd

    r = inferd("keys", "add", "--config", str(server.config), "--name", "mallory", "--role", "user", "--tenant", "a b/c")
    assert r.returncode != 0 and "tenant 'a b/c' is not a tenant name" in r.stderr and "letters, digits" in r.stderr
