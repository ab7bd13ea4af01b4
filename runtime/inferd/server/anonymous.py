"""Requests that carry no valid key: refused, and limited per client address.

An anonymous refusal (401/403/404 before a key is known) costs the server an audit record written
and fsynced; without a limit, anyone who can reach the port turns requests into disk writes. Each
address gets `per_minute` refusals that are answered and audited as usual; beyond that, within the
minute, it gets 429 with Retry-After and nothing is written, except one audit record saying that
the address crossed the limit (the evidence of the flood, once per window). Addresses are kept in
a bounded LRU, so a spray from many addresses cannot grow memory without bound.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass


@dataclass
class AnonymousVerdict:
    allowed: bool  # answer (and audit) this refusal as usual
    first_over: bool = False  # the first refusal past the limit in this window: audit that once
    retry_after_s: int = 0


class AnonymousLimiter:
    WINDOW_S = 60.0

    def __init__(self, per_minute: int, max_clients: int = 10_000, clock=time.monotonic):
        if per_minute < 1:
            raise ValueError("anonymous_per_minute must be >= 1")
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.clock = clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._over: dict[str, float] = {}  # address -> when its current over-limit window started

    def check(self, address: str) -> AnonymousVerdict:
        now = self.clock()
        window = self._seen.pop(address, None)
        if window is None:
            window = deque()
        self._seen[address] = window  # most recently seen last
        while len(self._seen) > self.max_clients:
            evicted, _ = self._seen.popitem(last=False)
            self._over.pop(evicted, None)
        while window and now - window[0] > self.WINDOW_S:
            window.popleft()
        if len(window) < self.per_minute:
            window.append(now)
            self._over.pop(address, None)
            return AnonymousVerdict(True)
        retry = max(1, math.ceil(window[0] + self.WINDOW_S - now))
        first = address not in self._over
        if first:
            self._over[address] = now
        return AnonymousVerdict(False, first_over=first, retry_after_s=retry)
