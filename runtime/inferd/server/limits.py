"""Request limits: per-key concurrency and rate (429) and the request body size (413)."""

from __future__ import annotations

import collections
import json
import math
import time
from dataclasses import dataclass

from inferd.server.errors import OpenAIError, error_body


@dataclass
class Refusal:
    reason: str  # "rate" or "concurrency": the rate_limited metric's label
    retry_after_s: int  # the 429's Retry-After


class Limiter:
    """Per-key concurrency and requests-per-minute limits (429 beyond them)."""

    WINDOW_S = 60
    # A concurrency slot frees when one of the key's requests ends: there is no window to wait out.
    CONCURRENCY_RETRY_S = 1

    def __init__(self, max_concurrent: int, per_minute: int):
        self.max_concurrent, self.per_minute = max_concurrent, per_minute
        self.active: dict[str, int] = collections.Counter()
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def acquire(self, key_id: str) -> Refusal | None:
        now = time.monotonic()
        window = self.recent[key_id]
        while window and now - window[0] > self.WINDOW_S:
            window.popleft()
        if len(window) >= self.per_minute:
            # The oldest requests leave the window first; the next slot opens when the one
            # `per_minute` places back does (per_minute may have been lowered below len(window)).
            opens = window[len(window) - self.per_minute] + self.WINDOW_S
            return Refusal("rate", max(1, math.ceil(opens - now)))
        if self.active[key_id] >= self.max_concurrent:
            return Refusal("concurrency", self.CONCURRENCY_RETRY_S)
        window.append(now)
        self.active[key_id] += 1
        return None

    def release(self, key_id: str) -> None:
        self.active[key_id] -= 1


class BodyLimit:
    """Refuse request bodies over the limit with 413, whether or not Content-Length is sent.

    A body without Content-Length (Transfer-Encoding: chunked) is read here, up to the limit,
    before the app sees it: refusing it from inside the app's receive() instead ended as FastAPI's
    400 "error parsing the body" (issue 24)."""

    DRAIN_LIMIT = 64 << 20

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) <= self.limit:  # the HTTP server holds the body to its declared length
                return await self.app(scope, receive, send)
            # Read (and drop) a moderately oversized body so that the client, still sending,
            # gets to see the 413; past DRAIN_LIMIT the connection is simply closed.
            if int(length) <= self.DRAIN_LIMIT:
                await self._drain(receive, 0)
            return await self._refuse(send)
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away before its body was complete
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            more = msg.get("more_body", False)
            if seen > self.limit:
                if more:
                    await self._drain(receive, seen)
                return await self._refuse(send)
            if not more:
                break
        replayed = False

        async def buffered_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, for the routes that watch for it
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, buffered_receive, send)

    async def _drain(self, receive, seen: int) -> None:
        while seen <= self.DRAIN_LIMIT:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                return
            seen += len(msg.get("body", b""))

    async def _refuse(self, send):
        body = json.dumps(
            error_body(f"request body larger than {self.limit} bytes: send a smaller request", "invalid_request_error")
        ).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def admit(limiter: Limiter, metrics, key_id: str) -> None:
    """Take one of the key's slots or refuse with 429 and Retry-After; the caller releases it."""
    refused = limiter.acquire(key_id)
    if refused is None:
        return
    metrics.rate_limited.labels(refused.reason).inc()
    what = "requests per minute" if refused.reason == "rate" else "concurrent requests"
    raise OpenAIError(
        429,
        f"too many {what} for this key: retry in {refused.retry_after_s} s",
        "rate_limit_error",
        headers={"Retry-After": str(refused.retry_after_s)},
    )
