from gateway.http.ratelimit import RateLimiter, retry_after


def test_bucket_allows_burst_then_refills():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("u", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("u", now=0.0)
    assert wait == 0.5
    assert limiter.acquire("u", now=0.5) == 0.0
    assert limiter.acquire("other", now=0.5) == 0.0  # keys are independent


def test_disabled_limiter_allows_everything():
    limiter = RateLimiter(rate=0)
    assert all(limiter.acquire("u", now=0.0) == 0.0 for _ in range(1000))


def test_memory_stays_bounded():
    limiter = RateLimiter(rate=1.0, max_keys=100)
    for i in range(1000):
        limiter.acquire(i, now=float(i))
    assert len(limiter._buckets) <= 100


def test_retry_after_is_a_whole_positive_number_of_seconds():
    assert retry_after(0.01) == "1" and retry_after(1.2) == "2"
