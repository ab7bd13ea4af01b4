"""Anonymous refusals are limited per address: beyond the limit, 429 and no audit write."""

from __future__ import annotations

import pytest

from inferd.server.anonymous import AnonymousLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_beyond_the_limit_an_address_is_refused_and_only_the_first_excess_is_flagged():
    clock = Clock()
    lim = AnonymousLimiter(per_minute=3, clock=clock)
    assert all(lim.check("10.0.0.1").allowed for _ in range(3))
    over = [lim.check("10.0.0.1") for _ in range(5)]
    assert not any(v.allowed for v in over)
    assert [v.first_over for v in over] == [True, False, False, False, False]
    assert all(1 <= v.retry_after_s <= 60 for v in over)
    # Another address is not held back by the first one's flood.
    assert lim.check("10.0.0.2").allowed


def test_the_window_slides_and_the_address_is_answered_again():
    clock = Clock()
    lim = AnonymousLimiter(per_minute=2, clock=clock)
    lim.check("a"), lim.check("a")
    assert not lim.check("a").allowed
    clock.t += 61
    assert lim.check("a").allowed
    lim.check("a")
    assert lim.check("a").first_over  # a new flood is recorded again


def test_memory_is_bounded_by_the_number_of_addresses_kept():
    lim = AnonymousLimiter(per_minute=1, max_clients=100, clock=Clock())
    for i in range(10_000):
        lim.check(f"addr-{i}")
    assert len(lim._seen) == 100


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="anonymous_per_minute"):
        AnonymousLimiter(per_minute=0)
