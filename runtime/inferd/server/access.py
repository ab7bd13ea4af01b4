"""Who is calling: the Bearer key checked against the role table (deny by default), as a
dependency of every route, and the caller's fields in each audit record."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from inferd.server.auth import ANONYMOUS, PRIORITIES, ROLE_TABLE, ApiKey, KeysFileError, digest
from inferd.server.errors import OpenAIError

# Query parameters that would carry a key in the URL, where logs and proxies keep it.
KEY_QUERY_PARAMS = ("api_key", "key", "token", "access_token")


@dataclass
class Principal:
    key_id: str
    name: str
    role: str
    priority: int = 0  # the key's class (auth.PRIORITIES): how the engine shares the batch
    tenant: str = ""  # who shares its prefix cache and fair share (ApiKey.cache_tenant)


def _bearer_token(request: Request) -> str:
    if any(q.lower() in KEY_QUERY_PARAMS for q in request.query_params):
        raise OpenAIError(400, "API keys are accepted only in the 'Authorization: Bearer' header, never in the URL")
    header = request.headers.get("authorization")
    if not header:
        raise OpenAIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise OpenAIError(401, "malformed Authorization header: expected 'Bearer <key>'", "authentication_error")
    return token


async def authorize(request: Request) -> Principal | None:
    state = request.app.state.inferd
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    allowed = ROLE_TABLE.get((request.method, path))
    if allowed is None:
        raise OpenAIError(403, f"{request.method} {path} is not in the role table: access denied", "permission_error")
    if ANONYMOUS in allowed:
        return None
    token = _bearer_token(request)
    metrics_token = state.cfg.metrics_bearer_token_sha256
    if path == "/metrics" and metrics_token and hmac.compare_digest(digest(token), metrics_token):
        return Principal("prometheus", "prometheus", "ops")
    state.keys.reload()
    try:
        key: ApiKey | None = state.keys.lookup(token)
    except KeysFileError as e:  # never "no keys": every keyed request is refused, saying why
        raise OpenAIError(503, str(e), "server_error", code="keys_file_invalid") from None
    if key is None:
        raise OpenAIError(401, "invalid or revoked API key", "authentication_error")
    if key.role not in allowed:
        raise OpenAIError(403, f"role '{key.role}' may not call {request.method} {path}", "permission_error")
    principal = Principal(key.key_id, key.name, key.role, PRIORITIES[key.priority], key.cache_tenant)
    request.state.principal = principal
    return principal


def audit_fields(request: Request, status: int) -> dict:
    """The audit record's fields for this request: route, method, status and the caller."""
    p = request.state.principal
    return {
        "route": request.scope["route"].path,
        "method": request.method,
        "status": status,
        "key_id": p.key_id,
        "key_name": p.name,
        "role": p.role,
        "client": client_address(request),
    }


def client_address(request: Request) -> str | None:
    """host:port of the peer (the gateway's, behind it; its access log has the user's)."""
    return request.client and f"{request.client.host}:{request.client.port}"
