"""The server as a user runs it: a real `inferd serve` process, the official openai client."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from inferd.server.audit import read_records
from inferd.server.auth import ROLE_TABLE


def inferd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`inferd serve` as a process; `python_code` runs instead of `-m inferd.cli` (with the same
    arguments in sys.argv[1:]) to patch the runtime before it starts."""

    def __init__(
        self,
        model_dir: Path,
        data_dir: Path,
        extra_config: dict | None = None,
        python_code: str | None = None,
        wait_ready: bool = True,
    ):
        self.port = free_port()
        self.data_dir = data_dir
        self.config = data_dir / "config.yaml"
        cfg = {
            "model": str(model_dir),
            "served_model_name": "tiny",
            "host": "127.0.0.1",
            "port": self.port,
            "data_dir": str(data_dir),
            "max_model_len": 256,
            "max_tokens_limit": 200,
            "max_body_bytes": 1 << 20,
            "model_allow_unsigned": True,  # test models are unsigned (test_trust.py covers signed ones)
            "anonymous_refusals_per_minute": 100000,  # these tests send many bad keys on purpose (test_anonymous.py)
        }
        cfg.update(extra_config or {})
        self.config.write_text(json.dumps(cfg))  # JSON is YAML
        self.keys = {}
        for name, role in (("alice", "user"), ("bob", "user"), ("olivia", "ops"), ("adam", "admin"), ("rex", "user")):
            r = inferd("keys", "add", "--config", str(self.config), "--name", name, "--role", role)
            assert r.returncode == 0, r.stderr
            self.keys[name] = r.stdout.strip()
        assert inferd("keys", "revoke", "--config", str(self.config), "--name", "rex").returncode == 0
        self.log = open(data_dir / "server.log", "w")
        launcher = ["-c", python_code] if python_code else ["-m", "inferd.cli"]
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "serve", "--config", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        if not wait_ready:
            return
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None, (data_dir / "server.log").read_text()
            time.sleep(0.3)
        raise AssertionError("server did not become ready: " + (data_dir / "server.log").read_text())

    def client(self, name="alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.keys[name], max_retries=0)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.log.close()


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    s = Server(llama_dir, tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


def test_chat_completion_with_the_openai_client(server):
    r = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "The quick brown fox"}], max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "The quick brown fox"}], max_tokens=12, temperature=0
    )
    assert again.choices[0].message.content == r.choices[0].message.content


def test_completion_and_stream_agree(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="Paged attention", max_tokens=16, temperature=0)
    chunks = list(c.completions.create(model="tiny", prompt="Paged attention", max_tokens=16, temperature=0, stream=True))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch for ch in chunks if ch.usage][-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_stream_ends_with_done(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {server.keys['alice']}"},
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True},
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_seed_reproducible_and_n(server):
    c = server.client()
    a = c.completions.create(model="tiny", prompt="The quick", max_tokens=10, temperature=1.0, seed=7, n=2)
    b = c.completions.create(model="tiny", prompt="The quick", max_tokens=10, temperature=1.0, seed=7, n=2)
    assert [x.text for x in a.choices] == [x.text for x in b.choices] and len(a.choices) == 2


def test_stop_strings(server):
    c = server.client()
    full = c.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 5
    stop = full[3:5]
    cut = c.completions.create(model="tiny", prompt="The quick", max_tokens=30, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_logprobs(server):
    r = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0, logprobs=True
    )
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 for t in r.choices[0].logprobs.content)


def test_models_route(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]


def test_error_shapes(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-inferd-wrong", max_retries=0).models.list()


# A generation of max_tokens=200 on a loaded CI machine can take longer than httpx's 5 s default.
POST_TIMEOUT_S = 120


def post(server, body, key="alice", raw=None, headers=None):
    h = {"Authorization": f"Bearer {server.keys[key]}"} | (headers or {})
    url = server.url + "/v1/chat/completions"
    if raw is not None:
        return httpx.post(url, content=raw, headers=h | {"content-type": "application/json"}, timeout=POST_TIMEOUT_S)
    return httpx.post(url, json=body, headers=h, timeout=POST_TIMEOUT_S)


MSG = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    "name,body,raw,status,needle",
    [
        ("malformed json", None, b"{not json", 400, "JSON"),
        ("invalid utf-8", None, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "JSON"),
        ("wrong type", {"model": "tiny", "messages": "hello"}, None, 400, "messages"),
        ("negative max_tokens", {"model": "tiny", "messages": MSG, "max_tokens": -5}, None, 400, "max_tokens"),
        ("huge max_tokens", {"model": "tiny", "messages": MSG, "max_tokens": 10**9}, None, 400, "max_tokens"),
        (
            "temperature NaN",
            None,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            400,
            "",
        ),
        ("negative temperature", {"model": "tiny", "messages": MSG, "temperature": -1}, None, 400, "temperature"),
        ("seed 2**64", {"model": "tiny", "messages": MSG, "seed": 2**64, "temperature": 1}, None, 400, "seed"),
        ("seed 2**70", {"model": "tiny", "messages": MSG, "seed": 2**70, "temperature": 1}, None, 400, "seed"),
        ("negative seed", {"model": "tiny", "messages": MSG, "seed": -1, "temperature": 1}, None, 400, "seed"),
        ("huge n", {"model": "tiny", "messages": MSG, "n": 2**70}, None, 400, "n"),
        ("huge top_p", {"model": "tiny", "messages": MSG, "top_p": 2**70}, None, 400, "top_p"),
        ("huge penalty", {"model": "tiny", "messages": MSG, "presence_penalty": 2**70}, None, 400, "presence_penalty"),
        ("five stop strings", {"model": "tiny", "messages": MSG, "stop": list("abcde")}, None, 400, "stop"),
        ("long stop string", {"model": "tiny", "messages": MSG, "stop": "x" * 300}, None, 400, "stop"),
        (
            "prompt longer than context",
            {"model": "tiny", "messages": [{"role": "user", "content": "word " * 400}]},
            None,
            400,
            "context",
        ),
        ("empty messages", {"model": "tiny", "messages": []}, None, 400, "messages"),
        ("unknown model", {"model": "gpt-9", "messages": MSG}, None, 404, "does not exist"),
        ("unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "role"),
        (
            "10 MB body",
            None,
            b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}',
            413,
            "larger",
        ),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(server, name, body, raw, status, needle):
    r = post(server, body, raw=raw)
    assert r.status_code == status, (name, r.text[:300])
    err = r.json()["error"]
    assert needle in err["message"] and err["type"], err
    assert post(server, {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200


def test_seed_bounds_name_the_field_and_range(server):
    r = post(server, {"model": "tiny", "messages": MSG, "seed": 2**64, "temperature": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "seed" and str(2**63 - 1) in err["message"], err


def test_largest_seed_with_n_is_served(server):
    """Choice i samples with seed + i: at the top of the range that must still be a seed the engine takes."""
    c = server.client()
    out = c.completions.create(model="tiny", prompt="The quick", max_tokens=3, temperature=1.0, seed=2**63 - 1, n=3)
    assert len(out.choices) == 3
    assert post(server, {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200


def test_stream_dropped_midway_frees_the_engine(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {server.keys['alice']}"},
        json={"model": "tiny", "prompt": "The", "max_tokens": 200, "stream": True, "temperature": 0},
    ) as r:
        for _ in zip(range(3), r.iter_lines()):
            pass
    time.sleep(1.0)
    m = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.keys['olivia']}"}).text
    assert "inferd_requests_running 0.0" in m
    assert post(server, {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200


# ---- roles -----------------------------------------------------------------------------------
ROUTE_CALLS = {
    ("GET", "/health"): ("/health", None),
    ("GET", "/ready"): ("/ready", None),
    ("GET", "/v1/models"): ("/v1/models", None),
    ("POST", "/v1/chat/completions"): ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "max_tokens": 1}),
    ("POST", "/v1/completions"): ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1}),
    ("GET", "/v1/results/{result_id}"): ("/v1/results/none-such", None),
    ("GET", "/metrics"): ("/metrics", None),
    ("GET", "/admin/limits"): ("/admin/limits", None),
    ("PUT", "/admin/limits"): ("/admin/limits", {"max_concurrent_per_key": 16}),
    ("GET", "/admin/logs"): ("/admin/logs", None),
    ("GET", "/admin/models"): ("/admin/models", None),
    ("GET", "/openapi.json"): ("/openapi.json", None),
    ("POST", "/admin/models/load"): ("/admin/models/load", {"model": "/nonexistent"}),
    ("POST", "/admin/models/unload"): ("/admin/models/unload", None),
    ("POST", "/admin/model/swap"): ("/admin/model/swap", {"model": "nonexistent"}),
}
# What an allowed caller gets where it is not 200.
ALLOWED_STATUS = {
    ("GET", "/v1/results/{result_id}"): 404,
    ("POST", "/admin/models/load"): 400,
    ("POST", "/admin/model/swap"): 400,
}


def test_every_app_route_is_in_the_role_table(llama_dir, tmp_path):
    from fastapi.routing import APIRoute

    from inferd.server.app import create_app
    from inferd.server.config import ServerConfig

    app = create_app(ServerConfig(model=str(llama_dir), data_dir=str(tmp_path)), load_model=False)
    routes = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}
    missing = routes - set(ROLE_TABLE)
    assert not missing, f"routes without a role-table entry (they would be refused): {missing}"
    assert routes == set(ROUTE_CALLS), "a new route needs an entry in ROUTE_CALLS for the role-matrix test"


def expected_status(route, who) -> int:
    allowed = ROLE_TABLE[route]
    if "anonymous" in allowed:
        return 200
    if who in ("anonymous", "malformed"):
        return 401
    if who == "revoked":
        return 401
    if who not in allowed:
        return 403
    return ALLOWED_STATUS.get(route, 200)


@pytest.mark.parametrize("route", sorted(ROUTE_CALLS))
@pytest.mark.parametrize("who", ["anonymous", "user", "ops", "admin", "revoked", "malformed"])
def test_role_matrix(server, route, who):
    if route == ("POST", "/admin/models/unload") and who == "admin":
        pytest.skip("an admin unload would stop the shared server: test_admin_swaps_and_unloads_the_model covers it")
    key = {"user": "alice", "ops": "olivia", "admin": "adam", "revoked": "rex"}.get(who)
    headers = {}
    if key:
        headers["Authorization"] = f"Bearer {server.keys[key]}"
    elif who == "malformed":
        headers["Authorization"] = f"Token {server.keys['alice']}"
    path, body = ROUTE_CALLS[route]
    r = httpx.request(route[0], server.url + path, json=body, headers=headers)
    assert r.status_code == expected_status(route, who), (route, who, r.text[:200])


def test_key_in_query_string_is_refused(server):
    r = httpx.get(server.url + "/v1/models", params={"api_key": server.keys["alice"]})
    assert r.status_code == 400 and "Authorization" in r.json()["error"]["message"]


def test_results_only_for_their_owner(server):
    r = server.client("alice").chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0)
    own = httpx.get(f"{server.url}/v1/results/{r.id}", headers={"Authorization": f"Bearer {server.keys['alice']}"})
    assert own.status_code == 200 and own.json()["choices"][0]["message"]["content"] == r.choices[0].message.content
    other = httpx.get(f"{server.url}/v1/results/{r.id}", headers={"Authorization": f"Bearer {server.keys['bob']}"})
    assert other.status_code == 404


def test_per_key_rate_limit_gives_429(server):
    ops = {"Authorization": f"Bearer {server.keys['olivia']}"}
    try:
        assert httpx.put(server.url + "/admin/limits", json={"requests_per_minute_per_key": 2}, headers=ops).status_code == 200
        codes = [post(server, {"model": "tiny", "messages": MSG, "max_tokens": 1}, key="bob").status_code for _ in range(4)]
        assert codes.count(429) >= 1 and codes[0] == 200
    finally:
        httpx.put(server.url + "/admin/limits", json={"requests_per_minute_per_key": 600}, headers=ops)


def test_metrics_name_the_key_signals(server):
    m = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.keys['olivia']}"}).text
    for name in (
        "inferd_time_to_first_token_seconds_bucket",
        "inferd_e2e_request_latency_seconds_bucket",
        "inferd_kv_cache_usage_ratio",
        "inferd_model_load_failures_total",
        "inferd_audit_records_dropped_total 0.0",
    ):
        assert name in m, name


def test_audit_log_verifies_and_detects_tampering(server, tmp_path):
    audit = server.data_dir / "audit" / "audit.log"
    r = inferd("audit", "verify", "--config", str(server.config))
    assert r.returncode == 0 and "chain intact" in r.stdout, r.stderr
    data = bytearray(audit.read_bytes())
    edited = tmp_path / "edited.log"
    i = data.index(b'"route"') + 12
    data[i] ^= 0x01
    edited.write_bytes(bytes(data))
    r = inferd("audit", "verify", str(edited), "--config", str(server.config))
    assert r.returncode == 1 and "byte offset" in r.stderr and "checksum" in r.stderr


def test_schemathesis_finds_no_5xx(server, tmp_path):
    """Generated requests against every operation of /openapi.json: none may answer 5xx."""
    schema = tmp_path / "openapi.json"
    r = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {server.keys['alice']}"})
    assert r.status_code == 200
    schema.write_text(r.text)
    st = Path(sys.executable).parent / "schemathesis"
    run = subprocess.run(
        [
            str(st),
            "run",
            str(schema),
            "--url",
            server.url,
            "-H",
            f"Authorization: Bearer {server.keys['alice']}",
            "--checks",
            "not_a_server_error",
            "-n",
            "25",
            "--request-timeout",
            "60",
            "--phases",
            "examples,coverage,fuzzing",
            "--exclude-path",
            "/admin/limits",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def _load(server, stop_at: float, completed: list, name="alice"):
    c = server.client(name)
    while time.time() < stop_at:
        try:
            r = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
            completed.append(r.id)
        except Exception:
            return


def test_kill_9_under_load_loses_no_completed_record(llama_dir, tmp_path):
    import threading

    s = Server(llama_dir, tmp_path, {"limits": {"max_concurrent_per_key": 64, "requests_per_minute_per_key": 100000}})
    completed: list[str] = []
    stop_at = time.time() + 4
    threads = [threading.Thread(target=_load, args=(s, stop_at, completed)) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    s.proc.kill()  # SIGKILL while requests are in flight
    s.proc.wait(30)
    for t in threads:
        t.join(30)
    s.log.close()
    assert len(completed) >= 5, "the load produced too few completed requests to mean anything"
    audit = tmp_path / "audit" / "audit.log"
    r = inferd("audit", "verify", "--config", str(s.config))
    assert r.returncode == 0, r.stderr
    from inferd.server.audit import read_records

    logged = {rec.get("request_id") for rec in read_records(audit)}
    lost = [rid for rid in completed if rid not in logged]
    assert not lost, f"{len(lost)} completed requests have no audit record"


def test_sigterm_finishes_in_flight_requests_and_flushes_the_audit(llama_dir, tmp_path):
    s = Server(llama_dir, tmp_path)
    lines = []
    with httpx.stream(
        "POST",
        s.url + "/v1/completions",
        headers={"Authorization": f"Bearer {s.keys['alice']}"},
        json={"model": "tiny", "prompt": "The", "max_tokens": 120, "stream": True, "temperature": 0},
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if line and not lines:
                s.proc.send_signal(signal.SIGTERM)  # after the first chunk
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]", "the in-flight stream was cut by the shutdown"
    # uvicorn re-raises the signal after its graceful shutdown; systemd counts that as a clean stop.
    assert s.proc.wait(60) in (0, -signal.SIGTERM)
    s.log.close()
    r = inferd("audit", "verify", "--config", str(s.config))
    assert r.returncode == 0 and "records" in r.stdout
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.url + "/health", timeout=2)


def test_deleted_audit_record_shows_as_a_gap(server, tmp_path):
    from inferd.server.audit_format import MAGIC, iter_segment

    for _ in range(3):
        post(server, {"model": "tiny", "messages": MSG, "max_tokens": 1})
    log = server.data_dir / "audit" / "audit.log"
    data = log.read_bytes()
    frames = [data[f.start : f.end] for f in iter_segment(log)]
    assert len(frames) >= 3
    gapped = tmp_path / "gap.log"
    gapped.write_bytes(MAGIC + b"".join(frames[:1] + frames[2:]))
    r = inferd("audit", "verify", str(gapped), "--config", str(server.config))
    assert r.returncode == 1 and "gap" in r.stderr
    torn = tmp_path / "torn.log"
    torn.write_bytes(data + frames[1][:7])
    assert inferd("audit", "verify", str(torn), "--config", str(server.config)).returncode == 0


def test_admin_swaps_and_unloads_the_model(llama_dir, tmp_path_factory):
    """Swap to another model without a restart; a failed load keeps the old one serving."""
    from inferd.testing import make_model

    other = tmp_path_factory.mktemp("other-model")
    make_model(other, arch="qwen2", heads=4, kv_heads=2, seed=5)
    broken = tmp_path_factory.mktemp("broken-model")
    for f in llama_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    s = Server(llama_dir, tmp_path_factory.mktemp("swap"))
    admin = {"Authorization": f"Bearer {s.keys['adam']}"}

    def wait_loaded():
        for _ in range(200):
            info = httpx.get(s.url + "/admin/models", headers=admin).json()
            if not info["loading"]:
                return info
            time.sleep(0.1)
        raise AssertionError("load did not finish")

    try:
        assert (
            httpx.post(
                s.url + "/admin/models/load", json={"model": str(broken), "served_model_name": "b"}, headers=admin
            ).status_code
            == 202
        )
        info = wait_loaded()
        assert info["model"] == "tiny" and info["load_error"]
        m = httpx.get(s.url + "/metrics", headers=admin).text
        assert "inferd_model_load_failures_total 1.0" in m
        assert post(s, {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200, "the old model must keep serving"

        r = httpx.post(s.url + "/admin/models/load", json={"model": str(other), "served_model_name": "qwen"}, headers=admin)
        assert r.status_code == 202
        info = wait_loaded()
        assert info["model"] == "qwen" and info["load_error"] is None
        assert [m.id for m in s.client().models.list()] == ["qwen"]
        out = s.client().completions.create(model="qwen", prompt="The quick", max_tokens=3, temperature=0)
        assert out.model == "qwen" and out.usage.completion_tokens == 3

        assert httpx.post(s.url + "/admin/models/unload", headers=admin).status_code == 200
        assert httpx.get(s.url + "/ready").status_code == 503
        gone = post(s, {"model": "qwen", "messages": MSG, "max_tokens": 2})
        assert gone.status_code == 503 and "not loaded" in gone.json()["error"]["message"]
    finally:
        s.stop()


def test_prometheus_bearer_token_reads_metrics_only(llama_dir, tmp_path):
    import hashlib

    token = "prom-scrape-token-0123456789"
    s = Server(llama_dir, tmp_path, {"metrics_bearer_token_sha256": hashlib.sha256(token.encode()).hexdigest()})
    try:
        h = {"Authorization": f"Bearer {token}"}
        assert httpx.get(s.url + "/metrics", headers=h).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers=h).status_code == 401
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        s.stop()


def test_server_serves_an_encrypted_packed_model(llama_dir, tmp_path):
    d = tmp_path / "keys"
    assert inferd("keygen", "--out", str(d)).returncode == 0
    packed = tmp_path / "packed"
    r = inferd("pack", str(llama_dir), str(packed), "--encrypt", "--key-file", str(d / "model.key"))
    assert r.returncode == 0, r.stderr
    (tmp_path / "srv").mkdir()
    s = Server(packed, tmp_path / "srv", {"model_key_file": str(d / "model.key")})
    try:
        out = s.client().completions.create(model="tiny", prompt="The quick", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
    finally:
        s.stop()


# ---- a server that cannot serve exits 1 (systemd: Restart=on-failure) ------------------------
FAIL_ONE_ENGINE_STEP = """
import sys
from inferd.cli import main
from inferd.engine import async_engine

serving_init = async_engine.AsyncLLMEngine.__init__

def init(self, engine, *args, **kw):
    real_step = engine.step

    def step():
        engine.step = real_step
        raise RuntimeError("injected engine fault")

    engine.step = step
    serving_init(self, engine, *args, **kw)

async_engine.AsyncLLMEngine.__init__ = init
sys.exit(main(sys.argv[1:]))
"""


def wait_exit(s: Server, timeout: float = 90) -> int:
    try:
        return s.proc.wait(timeout)
    finally:
        s.stop(signal.SIGKILL)


def test_engine_failure_fails_the_request_and_exits_1(llama_dir, tmp_path):
    """The issue-24 outage: an engine that died kept the process up, /ready 200, model_ready 1."""
    s = Server(llama_dir, tmp_path, python_code=FAIL_ONE_ENGINE_STEP)
    try:
        r = post(s, {"model": "tiny", "messages": MSG, "max_tokens": 4})
        assert r.status_code == 503 and "injected engine fault" in r.json()["error"]["message"], r.text
        try:
            assert httpx.get(s.url + "/ready", timeout=5).status_code == 503
        except httpx.TransportError:
            pass  # already gone: as good
    finally:
        code = wait_exit(s)
    log = (tmp_path / "server.log").read_text()
    assert code == 1, log
    assert "injected engine fault" in log and "Traceback" in log


def test_engine_failure_mid_stream_ends_the_stream_with_an_error(llama_dir, tmp_path):
    s = Server(llama_dir, tmp_path, python_code=FAIL_ONE_ENGINE_STEP)
    try:
        body = {"model": "tiny", "messages": MSG, "max_tokens": 4, "stream": True}
        with httpx.stream(
            "POST", s.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {s.keys['alice']}"}
        ) as r:
            lines = [line for line in r.iter_lines() if line]
        assert "injected engine fault" in lines[-1] and "[DONE]" not in lines[-1], lines
    finally:
        assert wait_exit(s) == 1
    # The stream had started (output reached the client): its failure is in the audit log.
    failed = [rec for rec in read_records(tmp_path / "audit" / "audit.log") if rec.get("kind") == "end"]
    assert [rec["status"] for rec in failed] == [503], failed


@pytest.mark.parametrize("what", ["no config.json", "encrypted, key file unreadable"])
def test_model_that_fails_to_load_at_start_up_exits_1(llama_dir, tmp_path, what):
    model, extra = tmp_path / "model", {}
    if what == "no config.json":
        model.mkdir()
        for f in llama_dir.iterdir():
            if f.name != "config.json":
                (model / f.name).write_bytes(f.read_bytes())
    else:
        assert inferd("keygen", "--out", str(tmp_path / "keys")).returncode == 0
        r = inferd("pack", str(llama_dir), str(model), "--encrypt", "--key-file", str(tmp_path / "keys" / "model.key"))
        assert r.returncode == 0, r.stderr
        extra["model_key_file"] = str(tmp_path / "keys" / "missing.key")
    (tmp_path / "srv").mkdir()
    s = Server(model, tmp_path / "srv", extra, wait_ready=False)
    code = wait_exit(s)
    log = (tmp_path / "srv" / "server.log").read_text()
    assert code == 1, log
    assert "failed to load at start-up" in log, log


# ---- issue 24: the bank's security review ----------------------------------------------------
def metrics_text(server) -> str:
    return httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {server.keys['olivia']}"}).text


def test_metrics_label_routes_not_raw_paths(server):
    """Raw paths as labels leak other users' result ids (and any byte, NUL included) into /metrics
    and grow it without bound; the route template and one `unmatched` label do neither."""
    alice = {"Authorization": f"Bearer {server.keys['alice']}"}

    def probe(i: int):
        assert httpx.get(f"{server.url}/no/such/path-{i}%00", headers=alice).status_code == 404
        assert httpx.get(f"{server.url}/v1/results/cmpl-secret{i:06d}", headers=alice).status_code == 404

    probe(0)  # every label value the probes can make exists from here on
    before = metrics_text(server)
    for i in range(1, 201):
        probe(i)
    after = metrics_text(server)
    assert len(after) - len(before) < 200, f"/metrics grew from {len(before)} to {len(after)} bytes"
    assert "cmpl-secret" not in after and "path-" not in after and "\x00" not in after
    assert 'route="/v1/results/{result_id}",status="404"' in after
    assert 'route="unmatched",status="404"' in after


def test_every_429_says_when_to_retry(server):
    ops = {"Authorization": f"Bearer {server.keys['olivia']}"}
    body = {"model": "tiny", "messages": MSG, "max_tokens": 1}
    try:
        httpx.put(server.url + "/admin/limits", json={"requests_per_minute_per_key": 2}, headers=ops).raise_for_status()
        refused = [r for r in (post(server, body, key="bob") for _ in range(4)) if r.status_code == 429]
        assert refused, "the rate limit refused nothing"
        for r in refused:
            assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers
        limits = {"requests_per_minute_per_key": 600, "max_concurrent_per_key": 1}
        httpx.put(server.url + "/admin/limits", json=limits, headers=ops).raise_for_status()
        long = body | {"max_tokens": 200, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: post(server, long, key="bob"), range(8)))
        refused = [r for r in answers if r.status_code == 429]
        assert refused and all("concurrent" in r.json()["error"]["message"] for r in refused)
        for r in refused:
            assert int(r.headers["retry-after"]) >= 1, r.headers
    finally:
        limits = {"requests_per_minute_per_key": 600, "max_concurrent_per_key": 16}
        httpx.put(server.url + "/admin/limits", json=limits, headers=ops)


def test_access_log_never_holds_a_key_from_the_url(server):
    secrets_sent = ["sk-inferd-inquery0000", "plainsecret1111", "sk-inferd-inpath2222"]
    assert httpx.get(server.url + "/v1/models", params={"api_key": secrets_sent[0]}).status_code == 400
    assert httpx.get(server.url + "/v1/models", params={"key": secrets_sent[1]}).status_code == 400
    assert httpx.get(f"{server.url}/v1/{secrets_sent[2]}").status_code == 404
    ops = {"Authorization": f"Bearer {server.keys['olivia']}"}
    assert httpx.get(server.url + "/admin/logs?limit=1", headers=ops).status_code == 200
    time.sleep(0.5)
    log = (server.data_dir / "server.log").read_text()
    assert "/admin/logs?limit=1" in log, "the access log is on, and harmless parameters stay readable"
    assert "/v1/models?api_key=" in log
    for secret in secrets_sent:
        assert secret not in log, secret


def test_lone_surrogate_in_the_body_is_an_audited_400(server):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}'
    audit = server.data_dir / "audit" / "audit.log"
    records_before = len(read_records(audit))
    r = post(server, None, raw=raw)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "surrogate" in err["message"], err
    time.sleep(0.3)
    new = read_records(audit)[records_before:]
    assert any(x.get("status") == 400 and x.get("route") == "/v1/chat/completions" for x in new), new
    assert post(server, {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200


def test_oversized_chunked_body_is_413(server):
    def chunks():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(32):
            yield b"a" * (64 << 10)  # 2 MiB in all, over the 1 MiB limit, with no Content-Length
        yield b'"}]}'

    h = {"Authorization": f"Bearer {server.keys['alice']}", "content-type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=h)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text[:300]
    assert "larger" in r.json()["error"]["message"]
    assert post(server, {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200


def _raw_exchange(port: int, head: bytes, body: bytes, gap_s: float) -> bytes:
    """Send `head`, then `body` one byte every `gap_s`, until the server answers; then read the
    answer to its end (the server closes the connection)."""
    import select

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        for i in range(len(body)):
            if select.select([s], [], [], gap_s)[0]:
                break  # the server answered before the body was complete
            try:
                s.sendall(body[i : i + 1])
            except OSError:
                break
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_a_body_dribbled_slower_than_body_timeout_s_is_a_408(llama_dir, tmp_path):
    s = Server(llama_dir, tmp_path, extra_config={"body_timeout_s": 0.5})
    try:
        body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 2, "user": "x" * 400}).encode()
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {s.keys['alice']}\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        # Each byte comes well within the timeout; the body as a whole does not (400+ bytes).
        answer = _raw_exchange(s.port, head, body, gap_s=0.1)
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
        headers, _, payload = rest.partition(b"\r\n\r\n")
        assert b"connection: close" in headers.lower(), headers
        err = json.loads(payload)["error"]
        assert set(err) >= {"message", "type", "param", "code"} and "body" in err["message"], err
        # The same request sent at once is served under the same setting.
        assert post(s, {"model": "tiny", "messages": MSG, "max_tokens": 2}).status_code == 200
        h = {"Authorization": f"Bearer {s.keys['alice']}", "content-type": "application/json"}
        chunks = (b"x" for _ in range(1))
        r = httpx.post(s.url + "/v1/chat/completions", content=chunks, headers=h, timeout=30)
        assert r.status_code == 400, r.text  # a chunked body that arrives in time reaches validation
    finally:
        s.stop()


def test_body_timeout_s_must_be_positive(tmp_path):
    from inferd.server.config import load_config

    with pytest.raises(ValueError, match="body_timeout_s"):
        load_config(None, model="m", body_timeout_s=0)
    assert load_config(None, model="m").body_timeout_s == 30


def test_content_types(server):
    body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 2}).encode()
    auth = {"Authorization": f"Bearer {server.keys['alice']}"}
    url = server.url + "/v1/chat/completions"
    audit = server.data_dir / "audit" / "audit.log"
    before = len(read_records(audit))
    # A form body (what `curl -d` sends) is a 415 that names the fix, and is audited.
    r = httpx.post(url, content=body, headers=auth | {"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 415, r.text
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    time.sleep(0.3)
    assert any(x.get("status") == 415 for x in read_records(audit)[before:])
    # A body with no Content-Type is a 415 too (FastAPI would answer a 400 naming only "body").
    r = httpx.post(url, content=body, headers=auth, timeout=60)
    assert r.status_code == 415 and "no Content-Type" in r.json()["error"]["message"], r.text
    # A +json type and a charset are JSON.
    for ct in ("application/json; charset=utf-8", "application/vnd.api+json"):
        assert httpx.post(url, content=body, headers=auth | {"content-type": ct}, timeout=60).status_code == 200, ct
    # A bodiless GET with a stray Content-Type is no body of another type.
    r = httpx.get(server.url + "/v1/models", headers=auth | {"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 200, r.text


def test_max_completion_tokens_and_top_logprobs(server):
    r = post(server, {"model": "tiny", "messages": MSG, "max_completion_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3, r.text
    r = post(server, {"model": "tiny", "messages": MSG, "max_completion_tokens": 201})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens", r.text
    r = post(server, {"model": "tiny", "messages": MSG, "max_tokens": 201})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    # top_logprobs 0 with logprobs is what the server does give: each token's own logprob.
    r = post(server, {"model": "tiny", "messages": MSG, "max_tokens": 2, "logprobs": True, "top_logprobs": 0})
    assert r.status_code == 200, r.text
    assert all(t["top_logprobs"] == [] for t in r.json()["choices"][0]["logprobs"]["content"])
    r = post(server, {"model": "tiny", "messages": MSG, "max_tokens": 2, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    assert all(len(t["top_logprobs"]) == 3 for t in r.json()["choices"][0]["logprobs"]["content"])
