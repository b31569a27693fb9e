"""A tiny thread-safe Prometheus registry, so /metrics needs no prometheus_client dependency.

Output is the text exposition format 0.0.4. Stage worker threads and the event loop update the same
metrics, so every value sits behind a lock; a scrape reads a consistent snapshot of each child.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise
from typing import Any, ClassVar, Generic, TypeVar

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# Time per item or batch in a pipeline stage: 1 ms to 10 s.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Segments per batch: powers of two up to the largest max_batch allowed.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# From a context's first text to its first audio frame: 10 ms to 10 s, finest where the target lies.
FIRST_AUDIO_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)

C = TypeVar("C")
M = TypeVar("M", bound="_Metric[Any]")
_Sample = tuple[str, tuple[tuple[str, str], ...], float]


def format_value(value: float) -> str:
    """A float as Prometheus (Go's ParseFloat) reads it: `+Inf`, `-Inf`, `NaN`, else the shortest repr."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class CounterChild:
    """One labelled series of a counter: a value that only goes up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; got inc({amount})")
        with self._lock:
            self._value += amount

    @property
    def value(self) -> float:
        with self._lock:
            return self._value


class GaugeChild:
    """One labelled series of a gauge; with a callback set, the callback alone decides its value."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0.0
        self._function: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value += amount

    def dec(self, amount: float = 1.0) -> None:
        with self._lock:
            self._value -= amount

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from `function` at scrape time, e.g. a queue's current depth."""
        with self._lock:
            self._function = function

    @property
    def value(self) -> float:
        with self._lock:
            function, value = self._function, self._value
        # Called outside the lock so a callback may itself touch metrics.
        return float(function()) if function is not None else value


class HistogramChild:
    """One labelled series of a histogram: counts per bucket, their sum and total."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._lock = threading.Lock()
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self._bounds, value)  # first bucket whose upper bound is >= value
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        """Cumulative counts per bucket (+Inf last, equal to the count) and the sum, read together."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        for i in range(1, len(counts)):
            counts[i] += counts[i - 1]
        return counts, total


class _Metric(ABC, Generic[C]):
    """A named family of children, one per combination of label values."""

    kind: ClassVar[str]

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in label_names:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r} for {name}")
        if len(set(label_names)) != len(label_names):
            raise ValueError(f"duplicate label names for {name}: {list(label_names)}")
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], C] = {}
        if not self.label_names:
            self._children[()] = self._new_child()

    def labels(self, **values: str) -> C:
        """The child for these label values, created on first use."""
        if set(values) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {list(self.label_names)}, got {sorted(values)}")
        key = tuple(values[label] for label in self.label_names)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def _only_child(self) -> C:
        if self.label_names:
            raise ValueError(f"{self.name} has labels {list(self.label_names)}; use .labels() first")
        return self._children[()]

    def render(self) -> Iterator[str]:
        """HELP and TYPE lines, then one line per sample, without trailing newlines."""
        with self._lock:
            children = list(self._children.items())
        yield f"# HELP {self.name} {_escape_help(self.help_text)}"
        yield f"# TYPE {self.name} {self.kind}"
        for key, child in children:
            labels = tuple(zip(self.label_names, key, strict=True))
            for suffix, extra, value in self._samples(child):
                pairs = ",".join(f'{label}="{_escape_label(text)}"' for label, text in labels + extra)
                braced = f"{{{pairs}}}" if pairs else ""
                yield f"{self.name}{suffix}{braced} {format_value(value)}"

    @abstractmethod
    def _new_child(self) -> C: ...

    @abstractmethod
    def _samples(self, child: C) -> Iterator[_Sample]:
        """(name suffix, extra labels, value) for each line of one child."""


class Counter(_Metric[CounterChild]):
    """Counts events; without labels, `inc` and `value` act on the single series."""

    kind = "counter"

    def inc(self, amount: float = 1.0) -> None:
        self._only_child().inc(amount)

    @property
    def value(self) -> float:
        return self._only_child().value

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _samples(self, child: CounterChild) -> Iterator[_Sample]:
        yield "", (), child.value


class Gauge(_Metric[GaugeChild]):
    """A value that goes up and down; without labels, the methods act on the single series."""

    kind = "gauge"

    def inc(self, amount: float = 1.0) -> None:
        self._only_child().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._only_child().dec(amount)

    def set(self, value: float) -> None:
        self._only_child().set(value)

    def set_function(self, function: Callable[[], float]) -> None:
        self._only_child().set_function(function)

    @property
    def value(self) -> float:
        return self._only_child().value

    def _new_child(self) -> GaugeChild:
        return GaugeChild()

    def _samples(self, child: GaugeChild) -> Iterator[_Sample]:
        yield "", (), child.value


class Histogram(_Metric[HistogramChild]):
    """Distribution over fixed buckets (upper bounds; +Inf is implicit)."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str] = (), *, buckets: Sequence[float]
    ) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or not all(math.isfinite(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be finite numbers (+Inf is added implicitly)")
        if any(lower >= upper for lower, upper in pairwise(bounds)):
            raise ValueError(f"{name}: buckets must be strictly increasing")
        if "le" in label_names:
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        self.buckets = bounds
        super().__init__(name, help_text, label_names)

    def observe(self, value: float) -> None:
        self._only_child().observe(value)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def _samples(self, child: HistogramChild) -> Iterator[_Sample]:
        counts, total = child.snapshot()
        for bound, count in zip((*self.buckets, math.inf), counts, strict=True):
            yield "_bucket", (("le", format_value(bound)),), count
        yield "_sum", (), total
        yield "_count", (), counts[-1]


class Registry:
    """An ordered set of metrics rendered together; names must be unique."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric[Any]] = {}

    def register(self, metric: M) -> M:
        """Add `metric` and return it, so creation and registration read as one line."""
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name!r} is already registered")
            self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """The whole registry in text exposition format 0.0.4."""
        with self._lock:
            metrics = list(self._metrics.values())
        return "".join(f"{line}\n" for metric in metrics for line in metric.render())


class SpeakdMetrics:
    """The daemon's metrics, on a registry of their own so that several apps in one process never clash."""

    def __init__(self) -> None:
        registry = self.registry = Registry()
        self.connections = registry.register(
            Gauge(
                "speakd_connections",
                "Open sessions: WebSocket and Wyoming connections, HTTP speech requests.",
            )
        )
        self.contexts = registry.register(Gauge("speakd_contexts", "Open synthesis contexts."))
        self.connections_total = registry.register(
            Counter("speakd_connections_total", "Sessions admitted since start.")
        )
        self.stage_queue_depth = registry.register(
            Gauge("speakd_stage_queue_depth", "Items waiting for each pipeline stage.", ("stage",))
        )
        self.stage_seconds = registry.register(
            Histogram(
                "speakd_stage_seconds",
                "Time a pipeline stage spends on one item or batch.",
                ("stage",),
                buckets=STAGE_BUCKETS,
            )
        )
        self.batch_items = registry.register(
            Histogram(
                "speakd_batch_items",
                "Segments (or windows) per batch a pipeline stage computes.",
                ("stage",),
                buckets=BATCH_BUCKETS,
            )
        )
        self.time_to_first_audio = registry.register(
            Histogram(
                "speakd_time_to_first_audio_seconds",
                "From a context's first text to its first audio frame.",
                buckets=FIRST_AUDIO_BUCKETS,
            )
        )
        self.errors = registry.register(
            Counter("speakd_errors_total", "Errors sent to clients, by code.", ("code",))
        )
        self.audio_seconds = registry.register(
            Counter("speakd_audio_seconds_total", "Seconds of audio synthesized and sent.")
        )
        self.segments = registry.register(Counter("speakd_segments_total", "Text segments synthesized."))
        self.load = registry.register(
            Gauge(
                "speakd_load",
                "Share of real-time synthesis capacity in use: streams playing over the streams this "
                "box keeps up with, as measured (1 = full; above it listeners stall). Autoscale on it.",
            )
        )
        self.capacity_streams = registry.register(
            Gauge(
                "speakd_capacity_streams",
                "Real-time streams this box keeps up with, measured from its recent work (compute "
                "seconds per second of audio); 0 until measured. New contexts are refused (or queued, "
                "limits.admission) beyond limits.admission_headroom of it.",
            )
        )
        self.admission_queued = registry.register(
            Gauge(
                "speakd_admission_queued",
                'Contexts waiting for a place at measured capacity (limits.admission = "queue").',
            )
        )
        self.ready = registry.register(
            Gauge("speakd_ready", "1 once the model is loaded and serving, else 0.")
        )
