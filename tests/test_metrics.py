"""The hot paths count in the process and flush to prometheus-client: what a scrape shows
must be what prometheus-client's own calls would have shown, bucket for bucket."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from engine.metrics import _LATENCY_BUCKETS, Metrics

durations = st.floats(min_value=0, max_value=10, allow_nan=False)
answers = st.lists(
    st.tuples(st.sampled_from(["/healthz", "/v1/holds"]), st.sampled_from([200, 429]), durations),
    max_size=50,
)


def direct(observed: list[tuple[str, int, float]]) -> bytes:
    """The same answers counted with prometheus-client's own calls, one by one."""
    registry = CollectorRegistry()
    requests = Counter(
        "guichet_http_requests", "", ["route", "method", "status"], registry=registry
    )
    latency = Histogram(
        "guichet_http_request_duration_seconds",
        "",
        ["route", "status_class"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    for route, status, seconds in observed:
        requests.labels(route, "GET", str(status)).inc()
        latency.labels(route, f"{status // 100}xx").observe(seconds)
    return generate_latest(registry)


def scraped(text: bytes) -> dict[str, float]:
    names = ("guichet_http_requests_total", "guichet_http_request_duration_seconds_")
    samples = (line.rsplit(" ", 1) for line in text.decode().splitlines())
    return {
        name: float(value)
        for name, value in samples
        if name.startswith(names) and "_created" not in name
    }


def same(ours: dict[str, float], theirs: dict[str, float]) -> bool:
    """Equal counts; sums equal but for the order of additions."""
    return ours.keys() == theirs.keys() and all(
        math.isclose(ours[k], theirs[k], rel_tol=1e-9, abs_tol=1e-12)
        if "_sum" in k
        else ours[k] == theirs[k]
        for k in ours
    )


@settings(max_examples=60, deadline=None)
@given(answers, answers)
def test_flushed_counts_match_prometheus_client_own(
    first: list[tuple[str, int, float]], then: list[tuple[str, int, float]]
) -> None:
    metrics = Metrics()
    for route, status, seconds in first:
        metrics.answered(route, "GET", status, seconds)
    metrics.flush()
    for route, status, seconds in then:
        metrics.answered(route, "GET", status, seconds)
    # render() flushes what is pending: a scrape of this process is exact.
    ours, theirs = scraped(metrics.render()), scraped(direct(first + then))
    assert same(ours, theirs), (ours, theirs)


def test_values_on_a_bound_go_in_that_bucket() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.0010001, 5.0, 7.0):
        metrics.answered("/healthz", "GET", 200, seconds)
    text = metrics.render().decode()
    assert 'duration_seconds_bucket{le="0.001",route="/healthz",status_class="2xx"} 1.0' in text
    assert 'duration_seconds_bucket{le="0.0025",route="/healthz",status_class="2xx"} 2.0' in text
    assert 'duration_seconds_bucket{le="5.0",route="/healthz",status_class="2xx"} 3.0' in text
    assert 'duration_seconds_bucket{le="+Inf",route="/healthz",status_class="2xx"} 4.0' in text
    assert 'duration_seconds_count{route="/healthz",status_class="2xx"} 4.0' in text


def test_one_worker_exports_what_several_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single worker's own registry added a ``_created`` series for each counter and
    histogram, which several workers' (multiprocess mode) do not: the same /metrics now."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    metrics.count(metrics.holds, "granted")
    text = metrics.render().decode()
    assert 'guichet_holds_total{outcome="granted"} 1.0' in text
    assert "_created" not in text
