"""The synthesis core every door uses: admission, sessions of utterances, limits and shutdown.

A session is one client's scope: a WebSocket connection, or one HTTP request. The core counts
sessions against `limits.max_connections` at admission (before a door answers), validates what an
utterance asks for against the loaded model, admits it by measured capacity (refused or queued, see
admission.py), and gives each utterance the same text budget, segmentation and cancel, so every
door behaves alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from speakd.protocol import DoneReason, ErrorCode
from speakd.server.config import Config
from speakd.server.core.admission import Admission
from speakd.server.core.errors import Busy, RequestRefused
from speakd.server.core.events import EventSink
from speakd.server.core.pace import Pace, check_pace
from speakd.server.core.segmenter import Segmenter
from speakd.server.core.utterance import Utterance
from speakd.server.engines.backend import SpeechBackend
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.job import AudioEncoder
from speakd.server.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

SPEED_RANGE = (0.25, 4.0)
"""Speeds every door accepts: OpenAI's range, which holds protocol v1's 0.5-2.0."""


class SynthesisCore:
    """The loaded model and its pipeline, shared by every door."""

    def __init__(
        self, *, backend: SpeechBackend, pipeline: Pipeline, config: Config, metrics: SpeakdMetrics
    ) -> None:
        self.backend = backend
        self.pipeline = pipeline
        self.config = config
        self.metrics = metrics
        self._sessions: set[Session] = set()
        self.closing = False
        self.admission = Admission(
            config.limits,
            capacity=lambda: self.pipeline.capacity.streams(),
            streams=self._active,
            metrics=metrics,
        )
        metrics.load.set_function(self.load)

    @property
    def default_voice(self) -> str:
        return self.config.model.default_voice

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def admit(
        self,
        sink: EventSink,
        *,
        max_utterances: int | None = None,
        on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ) -> Session:
        """A new session, counted at once so concurrent admissions cannot overshoot the limit.

        Raises `Busy` when the daemon is stopping or at `limits.max_connections`."""
        limit = self.config.limits.max_connections
        if self.closing:
            raise Busy("the daemon is stopping")
        if len(self._sessions) >= limit:
            raise Busy(f"at most {limit} connections and requests at once")
        session = Session(
            self,
            sink,
            max_utterances or self.config.limits.max_contexts_per_connection,
            on_shutdown,
        )
        self._sessions.add(session)
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        return session

    def release(self, session: Session) -> None:
        """Give a session's place back; `Session.close` calls it, once."""
        if session in self._sessions:
            self._sessions.discard(session)
            self.metrics.connections.dec()

    def check_voice(self, voice: str | None, context: str | None = None) -> str:
        """The voice to use: `voice`, or the default; refused when the model lacks it."""
        voice = voice or self.default_voice
        names = self.backend.voice_names
        if voice not in names:
            raise RequestRefused(
                ErrorCode.UNKNOWN_VOICE, f"unknown voice {voice!r}; known: {', '.join(names)}", context
            )
        return voice

    def check_language(self, lang: str, context: str | None = None) -> str:
        languages = self.backend.languages
        if lang not in languages:
            raise RequestRefused(
                ErrorCode.INVALID_PARAM,
                f"lang {lang!r} is not supported; use one of {', '.join(languages)}",
                context,
            )
        return lang

    def _active(self) -> list[Utterance]:
        return [u for session in self._sessions for u in session if u.active]

    def active_streams(self) -> int:
        """Utterances that are real-time streams now (work in the pipeline, or audio left to play)."""
        return len(self._active())

    def load(self) -> float:
        """The share of real-time synthesis capacity in use (`speakd_load`): streams playing over
        the streams this box keeps up with, as measured; above 1, listeners stall. Until the
        capacity is measured, the busiest stage's busy fraction stands in."""
        capacity = self.pipeline.capacity.streams()
        if capacity is None:
            return self.pipeline.load()
        return self.active_streams() / capacity

    async def shutdown(self, grace_s: float) -> None:
        """Daemon stop: no new sessions; utterances waiting for admission are refused at once, open
        ones get `grace_s` to finish, then are cut off."""
        self.closing = True
        await self.admission.close()
        await asyncio.gather(*(s.shutdown(grace_s) for s in list(self._sessions)), return_exceptions=True)


class Session:
    """One client's utterances by name; closing it drops whatever is still open."""

    def __init__(
        self,
        core: SynthesisCore,
        sink: EventSink,
        max_utterances: int,
        on_shutdown: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._core = core
        self._sink = sink
        self._max_utterances = max_utterances
        self._on_shutdown = on_shutdown
        self._utterances: dict[str, Utterance] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._utterances)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(list(self._utterances.values()))

    def get(self, name: str) -> Utterance | None:
        return self._utterances.get(name)

    def open(
        self,
        name: str,
        *,
        voice: str | None,
        lang: str,
        speed: float,
        encoder: Callable[[], AudioEncoder],
        sample_rate: int,
        words: bool = False,
        pace: Pace | None = None,
    ) -> Utterance:
        """Open utterance `name` after checking everything it asks for; `encoder` is called last, so
        a refused request never builds one. With `words`, each segment's word timing comes before
        its audio (`SegmentWords`). With `pace`, a live context: its lag is kept under `pace.max_lag_s`
        (`core.pace`). In queue mode, an utterance without a place yet opens
        `queued`: it takes text at once and synthesizes it once admitted (or gets `overloaded`)."""
        if self._core.closing or self.closed:
            raise RequestRefused(ErrorCode.SHUTTING_DOWN, "the daemon is stopping; no new contexts", name)
        if name in self._utterances:
            raise RequestRefused(ErrorCode.DUPLICATE_CONTEXT, f"context {name!r} is already open", name)
        if len(self._utterances) >= self._max_utterances:
            raise RequestRefused(
                ErrorCode.TOO_MANY_CONTEXTS,
                f"at most {self._max_utterances} open contexts per connection",
                name,
            )
        chosen = self._core.check_voice(voice, name)
        self._core.check_language(lang, name)
        low, high = SPEED_RANGE
        if not low <= speed <= high:
            raise RequestRefused(ErrorCode.INVALID_PARAM, f"speed must be between {low} and {high}", name)
        if pace is not None:
            check_pace(pace, speed, name)
        queued = self._core.admission.must_wait(name)
        config = self._core.config
        utterance = Utterance(
            name=name,
            voice=chosen,
            lang=lang,
            speed=speed,
            encoder=encoder(),
            sample_rate=sample_rate,
            segmenter=Segmenter(
                first_clause_min_words=config.pipeline.first_clause_min_words,
                max_chars=config.pipeline.max_segment_chars,
            ),
            text_budget=config.limits.max_buffered_text_chars,
            pipeline=self._core.pipeline,
            sink=self._sink,
            metrics=self._core.metrics,
            on_closed=self._forget,
            queued=queued,
            words=words,
            pace=pace,
        )
        self._utterances[name] = utterance
        self._idle.clear()
        self._core.metrics.contexts.inc()
        if queued:
            self._core.admission.enqueue(utterance)
        return utterance

    def _forget(self, utterance: Utterance) -> None:
        """Every way an utterance ends comes here, so `wait_idle` never misses one."""
        if self._utterances.get(utterance.name) is utterance:
            del self._utterances[utterance.name]
            self._core.metrics.contexts.dec()
        self._core.admission.discard(utterance)  # out of the queue, and its place may be free now
        if not self._utterances:
            self._idle.set()

    async def wait_idle(self, limit_s: float | None = None) -> bool:
        """Whether every utterance has ended within `limit_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await self._idle.wait()
        return self._idle.is_set()

    def abort_all(self, code: ErrorCode, message: str, reason: DoneReason) -> None:
        for utterance in self:
            utterance.abort(code, message, reason)

    def close(self) -> None:
        """The client is gone: drop what is open and give the session's place back."""
        self.closed = True
        for utterance in self:
            utterance.drop()
        self._core.release(self)

    async def shutdown(self, grace_s: float) -> None:
        if not await self.wait_idle(grace_s):
            self.abort_all(ErrorCode.SHUTTING_DOWN, "the daemon is stopping", DoneReason.CANCEL)
        if self._on_shutdown is not None:
            await self._on_shutdown()
