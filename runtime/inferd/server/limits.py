"""Request limits: per-key concurrency and rate counted in sequences (a request with n=8 weighs
eight), the engine's bounded queue (429 with Retry-After) and the request body size (413)."""

from __future__ import annotations

import asyncio
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
    """Per-key limits on concurrent sequences and sequences per minute (429 beyond them). A request
    asks for its n sequences at once, all or none."""

    WINDOW_S = 60
    # A concurrency slot frees when one of the key's requests ends: there is no window to wait out.
    CONCURRENCY_RETRY_S = 1

    def __init__(self, max_concurrent: int, per_minute: int):
        self.max_concurrent, self.per_minute = max_concurrent, per_minute
        self.active: dict[str, int] = collections.Counter()
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def acquire(self, key_id: str, n: int = 1) -> Refusal | None:
        now = time.monotonic()
        window = self.recent[key_id]
        while window and now - window[0] > self.WINDOW_S:
            window.popleft()
        over = len(window) + n - self.per_minute
        if over > 0:
            # The oldest sequences leave the window first: room for n opens when the `over`-th
            # oldest does (per_minute may have been lowered below len(window)).
            opens = (window[over - 1] if over <= len(window) else now) + self.WINDOW_S
            return Refusal("rate", max(1, math.ceil(opens - now)))
        if self.active[key_id] + n > self.max_concurrent:
            return Refusal("concurrency", self.CONCURRENCY_RETRY_S)
        window.extend([now] * n)
        self.active[key_id] += n
        return None

    def release(self, key_id: str, n: int = 1) -> None:
        self.active[key_id] -= n


class BodyLimit:
    """Refuse request bodies over the limit with 413, whether or not Content-Length is sent, and
    bodies that are not all in within `timeout_s` with 408.

    The body is read here, up to the limit, before the app sees it: refusing a chunked one from
    inside the app's receive() instead ended as FastAPI's 400 "error parsing the body" (issue 24).
    Uvicorn has no body timeout: a client that sends its headers and then dribbles its body would
    hold a connection and a task for as long as it liked (issue 24)."""

    DRAIN_LIMIT = 64 << 20
    TOO_LARGE = object()  # _read's answer for a body over the limit

    def __init__(self, app, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(scope, receive)
        except TimeoutError:
            message = f"the request body did not arrive within {self.timeout_s:g} s: send the whole body at once"
            return await self._refuse(send, 408, message)
        if body is None:
            return  # the client went away before its body was complete
        if body is self.TOO_LARGE:
            return await self._refuse(send, 413, f"request body larger than {self.limit} bytes: send a smaller request")
        replayed = False

        async def buffered_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, for the routes that watch for it
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, buffered_receive, send)

    async def _read(self, scope, receive):
        """The whole body; TOO_LARGE over the limit; None where the client went away."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            # Read (and drop) a moderately oversized body so that the client, still sending,
            # gets to see the 413; past DRAIN_LIMIT the connection is simply closed.
            if int(length) <= self.DRAIN_LIMIT:
                await self._drain(receive, 0)
            return self.TOO_LARGE
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return None
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            more = msg.get("more_body", False)
            if seen > self.limit:
                if more:
                    await self._drain(receive, seen)
                return self.TOO_LARGE
            if not more:
                return b"".join(chunks)

    async def _drain(self, receive, seen: int) -> None:
        while seen <= self.DRAIN_LIMIT:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                return
            seen += len(msg.get("body", b""))

    async def _refuse(self, send, status: int, message: str):
        body = json.dumps(error_body(message, "invalid_request_error")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 408:
            # The rest of the body may still come: close the connection, or uvicorn would read it
            # as the next request.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# How soon a request refused for a full engine queue may retry: a place frees when any running
# sequence ends, which takes seconds.
QUEUE_RETRY_S = 2


def queue_full(detail: str) -> OpenAIError:
    """The 429 for a request the engine's bounded queue has no room for."""
    retry = {"Retry-After": str(QUEUE_RETRY_S)}
    return OpenAIError(429, f"the server's queue is full: {detail}", "rate_limit_error", code="queue_full", headers=retry)


def admit(limiter: Limiter, metrics, key_id: str, n: int = 1, engine=None):
    """Take n of the key's sequence slots and reserve room for n in the engine's queue (returned:
    the engine's Reservation, None without an engine), or refuse with 429 and Retry-After (400 when
    n alone exceeds the key's limits); the caller releases both."""
    if n > limiter.max_concurrent or n > limiter.per_minute:
        limit = min(limiter.max_concurrent, limiter.per_minute)
        raise OpenAIError(400, f"n is {n}; a key may hold at most {limit} sequences at a time here: lower n", param="n")
    reservation = engine.reserve(n) if engine is not None else None
    if engine is not None and reservation is None:
        metrics.rate_limited.labels("queue").inc()
        raise queue_full(f"retry in {QUEUE_RETRY_S} s")
    refused = limiter.acquire(key_id, n)
    if refused is None:
        return reservation
    if reservation is not None:
        reservation.release()
    metrics.rate_limited.labels(refused.reason).inc()
    what = "sequences per minute" if refused.reason == "rate" else "concurrent sequences"
    raise OpenAIError(
        429,
        f"too many {what} for this key: retry in {refused.retry_after_s} s",
        "rate_limit_error",
        headers={"Retry-After": str(refused.retry_after_s)},
    )
