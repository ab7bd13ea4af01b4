"""Every failure a client sees is an OpenAI-shaped error body: the error type, and the handlers
that turn FastAPI's own failures (validation, unknown route, bad body) into it, count it and
audit it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Probes and scrapes: answered without an audit record.
NOT_AUDITED = {"/health", "/ready", "/metrics"}
# The route label of every path no route matches. Labels are route templates, never raw paths: a
# raw path put other keys' result ids (and any byte a client sent) into /metrics, and 2,000 random
# paths grew it from 13 KB to 1.1 MB (issue 24).
UNMATCHED_ROUTE = "unmatched"
BAD_BODY = "the request body is not valid JSON (or not UTF-8)"


def route_template(request: Request) -> str:
    """The matched route's path template (`/v1/results/{result_id}`), or UNMATCHED_ROUTE."""
    return getattr(request.scope.get("route"), "path", UNMATCHED_ROUTE)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


async def _count_and_audit(request: Request, status: int, message: str) -> None:
    state = request.app.state.inferd
    path = route_template(request)
    state.metrics.requests.labels(path, str(status)).inc()
    if path in NOT_AUDITED:
        return
    p = getattr(request.state, "principal", None)
    try:
        await state.audit_record(
            route=path,
            method=request.method,
            status=status,
            key_id=getattr(p, "key_id", None),
            key_name=getattr(p, "name", None),
            role=getattr(p, "role", None),
            client=request.client and f"{request.client.host}:{request.client.port}",
            error=message[:200],
        )
    except OpenAIError:
        pass  # the error response goes out anyway; the drop is counted


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError):
        await _count_and_audit(request, exc.status, exc.message)
        body = error_body(exc.message, exc.type, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = BAD_BODY if first.get("type") == "json_invalid" else f"{loc or 'body'}: {first.get('msg', 'invalid value')}"
        await _count_and_audit(request, 400, msg)
        return JSONResponse(error_body(msg, "invalid_request_error", loc), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = BAD_BODY
        if exc.status_code < 500:
            await _count_and_audit(request, exc.status_code, message)
        else:
            request.app.state.inferd.metrics.requests.labels(route_template(request), str(exc.status_code)).inc()
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code)
