"""Metrics registry: exact exposition text, cumulative buckets, thread safety, callbacks, escaping."""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from speakd.server.metrics import (
    FIRST_AUDIO_BUCKETS,
    STAGE_BUCKETS,
    Counter,
    Gauge,
    Histogram,
    Registry,
    SpeakdMetrics,
    format_value,
)

# One sample line of the 0.0.4 text format: name, optional {label="value",...}, a Go-parsable float.
SAMPLE = re.compile(
    r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\})? '
    r"(NaN|[+-]Inf|-?\d+(\.\d+)?(e[+-]?\d+)?)"
)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as possible, so an unlocked read-modify-write would lose updates."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def run_threads(count: int, work: Callable[[], None]) -> None:
    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_counter_render_exact() -> None:
    registry = Registry()
    requests = registry.register(Counter("app_requests_total", "Requests handled.", ("method", "code")))
    requests.labels(method="get", code="200").inc()
    requests.labels(method="get", code="200").inc(2)
    requests.labels(code="500", method="post").inc(0.5)
    assert registry.render() == (
        "# HELP app_requests_total Requests handled.\n"
        "# TYPE app_requests_total counter\n"
        'app_requests_total{method="get",code="200"} 3.0\n'
        'app_requests_total{method="post",code="500"} 0.5\n'
    )


def test_gauge_render_exact_with_and_without_labels() -> None:
    registry = Registry()
    depth = registry.register(Gauge("app_depth", "Queue depth.", ("stage",)))
    up = registry.register(Gauge("app_up", "Whether up."))
    depth.labels(stage="a").set(7)
    depth.labels(stage="b").inc(3)
    depth.labels(stage="b").dec()
    up.set(1)
    assert registry.render() == (
        "# HELP app_depth Queue depth.\n"
        "# TYPE app_depth gauge\n"
        'app_depth{stage="a"} 7.0\n'
        'app_depth{stage="b"} 2.0\n'
        "# HELP app_up Whether up.\n"
        "# TYPE app_up gauge\n"
        "app_up 1.0\n"
    )


def test_histogram_render_exact_and_cumulative() -> None:
    registry = Registry()
    latency = registry.register(Histogram("app_seconds", "Latency.", ("stage",), buckets=(0.1, 1, 10)))
    child = latency.labels(stage="g2p")
    for value in (0.05, 0.1, 0.5, 0.7, 3.0, 12.0):  # 0.1 sits exactly on a bound: le means <=
        child.observe(value)
    assert registry.render() == (
        "# HELP app_seconds Latency.\n"
        "# TYPE app_seconds histogram\n"
        'app_seconds_bucket{stage="g2p",le="0.1"} 2.0\n'
        'app_seconds_bucket{stage="g2p",le="1.0"} 4.0\n'
        'app_seconds_bucket{stage="g2p",le="10.0"} 5.0\n'
        'app_seconds_bucket{stage="g2p",le="+Inf"} 6.0\n'
        'app_seconds_sum{stage="g2p"} 16.35\n'
        'app_seconds_count{stage="g2p"} 6.0\n'
    )
    counts, total = child.snapshot()
    assert counts == [2, 4, 5, 6]
    assert total == pytest.approx(16.35)


def test_unlabelled_histogram_renders_without_braces_on_sum_and_count() -> None:
    registry = Registry()
    registry.register(Histogram("app_ttfa_seconds", "First audio.", buckets=(0.5,))).observe(0.25)
    assert registry.render().splitlines()[2:] == [
        'app_ttfa_seconds_bucket{le="0.5"} 1.0',
        'app_ttfa_seconds_bucket{le="+Inf"} 1.0',
        "app_ttfa_seconds_sum 0.25",
        "app_ttfa_seconds_count 1.0",
    ]


def test_labelled_metric_without_children_renders_only_header() -> None:
    registry = Registry()
    registry.register(Counter("app_errors_total", "Errors.", ("code",)))
    assert registry.render() == "# HELP app_errors_total Errors.\n# TYPE app_errors_total counter\n"


def test_label_value_and_help_escaping() -> None:
    registry = Registry()
    errors = registry.register(
        Counter("app_errors_total", 'Errors with "codes" \\ and\nnewlines.', ("code",))
    )
    errors.labels(code='a"b\\c\nd').inc()
    lines = registry.render().splitlines()
    assert lines[0] == '# HELP app_errors_total Errors with "codes" \\\\ and\\nnewlines.'
    assert lines[2] == 'app_errors_total{code="a\\"b\\\\c\\nd"} 1.0'
    assert SAMPLE.fullmatch(lines[2])


def test_eight_threads_ten_thousand_increments_each(fast_switching: None) -> None:
    counter = Counter("app_total", "Total.")
    gauge = Gauge("app_gauge", "Gauge.", ("k",))
    histogram = Histogram("app_h", "H.", buckets=(0.5,))

    def work() -> None:
        child = gauge.labels(k="x")
        for _ in range(10_000):
            counter.inc()
            child.inc()
            histogram.observe(1.0)

    run_threads(8, work)
    assert counter.value == 80_000
    assert gauge.labels(k="x").value == 80_000
    assert histogram.labels().snapshot() == ([0, 80_000], 80_000.0)  # count and sum agree with the buckets


def test_concurrent_label_creation_yields_one_child(fast_switching: None) -> None:
    counter = Counter("app_total", "Total.", ("who",))
    seen: list[object] = []

    def work() -> None:
        child = counter.labels(who="same")
        seen.append(child)
        for _ in range(1_000):
            child.inc()

    run_threads(8, work)
    assert all(child is seen[0] for child in seen)
    assert counter.labels(who="same").value == 8_000


def test_callback_gauge_is_read_at_scrape_time() -> None:
    registry = Registry()
    depth = registry.register(Gauge("app_queue_depth", "Depth.", ("stage",)))
    queue: list[int] = []
    depth.labels(stage="g2p").set_function(lambda: float(len(queue)))
    assert 'app_queue_depth{stage="g2p"} 0.0' in registry.render()
    queue.extend([1, 2, 3])
    assert 'app_queue_depth{stage="g2p"} 3.0' in registry.render()
    assert depth.labels(stage="g2p").value == 3.0


def test_unlabelled_callback_gauge() -> None:
    gauge = Gauge("app_g", "G.")
    gauge.set_function(lambda: 2.5)
    assert gauge.value == 2.5


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0.0"),
        (3, "3.0"),
        (0.1, "0.1"),
        (1e-05, "1e-05"),
        (1e16, "1e+16"),
        (-2.5, "-2.5"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_format_value_is_prometheus_parsable(value: float, text: str) -> None:
    assert format_value(value) == text


def test_misuse_is_rejected() -> None:
    labelled = Counter("app_total", "T.", ("code",))
    with pytest.raises(ValueError, match=r"use \.labels"):
        labelled.inc()
    with pytest.raises(ValueError, match="takes labels"):
        labelled.labels(status="x")
    with pytest.raises(ValueError, match="takes labels"):
        Counter("app_plain_total", "T.").labels(code="x")
    with pytest.raises(ValueError, match="only goes up"):
        Counter("app_other_total", "T.").inc(-1)
    with pytest.raises(ValueError, match="invalid metric name"):
        Gauge("app-dash", "G.")
    with pytest.raises(ValueError, match="invalid label name"):
        Gauge("app_g", "G.", ("__reserved",))
    with pytest.raises(ValueError, match="duplicate label"):
        Gauge("app_g", "G.", ("a", "a"))
    with pytest.raises(ValueError, match="reserved"):
        Histogram("app_h", "H.", ("le",), buckets=(1.0,))
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram("app_h", "H.", buckets=(1.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        Histogram("app_h", "H.", buckets=(1.0, float("inf")))
    with pytest.raises(ValueError, match="finite"):
        Histogram("app_h", "H.", buckets=())
    registry = Registry()
    registry.register(Gauge("app_g", "G."))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Counter("app_g", "C."))


def test_speakd_metrics_families_and_types() -> None:
    metrics = SpeakdMetrics()
    metrics.connections.inc()
    metrics.connections_total.inc()
    metrics.contexts.inc()
    metrics.stage_queue_depth.labels(stage="acoustic").set_function(lambda: 4.0)
    metrics.stage_seconds.labels(stage="acoustic").observe(0.02)
    metrics.batch_items.labels(stage="vocoder").observe(3)
    metrics.time_to_first_audio.observe(0.3)
    metrics.errors.labels(code="overloaded").inc()
    metrics.audio_seconds.inc(1.25)
    metrics.segments.inc()
    metrics.ready.set(1)
    text = metrics.registry.render()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert types == {
        "speakd_connections": "gauge",
        "speakd_contexts": "gauge",
        "speakd_connections_total": "counter",
        "speakd_stage_queue_depth": "gauge",
        "speakd_stage_seconds": "histogram",
        "speakd_batch_items": "histogram",
        "speakd_time_to_first_audio_seconds": "histogram",
        "speakd_errors_total": "counter",
        "speakd_audio_seconds_total": "counter",
        "speakd_segments_total": "counter",
        "speakd_load": "gauge",
        "speakd_capacity_streams": "gauge",
        "speakd_admission_queued": "gauge",
        "speakd_ready": "gauge",
    }
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert all(SAMPLE.fullmatch(line) for line in samples), [
        bad for bad in samples if not SAMPLE.fullmatch(bad)
    ]
    assert 'speakd_stage_queue_depth{stage="acoustic"} 4.0' in samples
    assert 'speakd_errors_total{code="overloaded"} 1.0' in samples
    assert "speakd_audio_seconds_total 1.25" in samples
    assert "speakd_ready 1.0" in samples
    assert 'speakd_stage_seconds_bucket{stage="acoustic",le="0.025"} 1.0' in samples
    assert 'speakd_stage_seconds_bucket{stage="acoustic",le="0.01"} 0.0' in samples
    assert "speakd_time_to_first_audio_seconds_count 1.0" in samples
    assert 'speakd_batch_items_bucket{stage="vocoder",le="2.0"} 0.0' in samples
    assert 'speakd_batch_items_bucket{stage="vocoder",le="4.0"} 1.0' in samples
    assert text.endswith("\n")


def test_bucket_ranges_match_the_brief() -> None:
    assert (STAGE_BUCKETS[0], STAGE_BUCKETS[-1]) == (0.001, 10.0)
    assert (FIRST_AUDIO_BUCKETS[0], FIRST_AUDIO_BUCKETS[-1]) == (0.01, 10.0)


def test_separate_instances_do_not_share_state() -> None:
    first, second = SpeakdMetrics(), SpeakdMetrics()
    first.segments.inc()
    assert second.segments.value == 0.0
