"""One utterance: text in (feed, flush, end, cancel), events out, through the shared pipeline.

It owns what every door must get the same: the text budget, segmentation, the order of events,
cancel reaching queued work in every stage, and back-pressure from the door's reader. It is the
pipeline job's sink, so results arrive here on the event loop and leave as events. An utterance
opened to wait for admission (`queued`) takes text as usual but holds its segments until `admit`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from speakd.protocol import DoneReason, ErrorCode, WordTiming
from speakd.server.audio.encoders import Frame
from speakd.server.core.errors import RequestRefused
from speakd.server.core.events import (
    AudioChunk,
    Event,
    EventSink,
    Failed,
    Finished,
    SegmentStarted,
    SegmentWords,
    Skipped,
)
from speakd.server.core.live import LiveHold
from speakd.server.core.pace import Pace
from speakd.server.core.segmenter import Located, Segmenter
from speakd.server.errors import SynthesisError
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.job import AudioEncoder, EncodedSegment, Job
from speakd.server.pipeline.pipeline import Pipeline

# A live context's text due to be cut but with no word complete yet is looked at again after this.
CUT_RETRY_S = 0.25


class Utterance:
    """An open utterance; it closes itself with exactly one `Finished` event (or silently on `drop`)."""

    def __init__(
        self,
        *,
        name: str,
        voice: str,
        lang: str,
        speed: float,
        encoder: AudioEncoder,
        sample_rate: int,
        segmenter: Segmenter,
        text_budget: int,
        pipeline: Pipeline,
        sink: EventSink,
        metrics: SpeakdMetrics,
        on_closed: Callable[[Utterance], None],
        queued: bool = False,
        words: bool = False,
        pace: Pace | None = None,
    ) -> None:
        """`words`: announce each segment's word timing (`SegmentWords`) before its audio. `pace`: a
        live context, whose lag is kept under a bound by speeding up and skipping (`core.pace`)."""
        self.name = name
        self.words = words
        self.sample_rate = sample_rate
        self._segmenter = segmenter
        self._text_budget = text_budget
        self._pipeline = pipeline
        self._sink = sink
        self._metrics = metrics
        self._on_closed = on_closed
        self._job = Job(context=name, voice=voice, lang=lang, speed=speed, encoder=encoder, sink=self)
        self.ending = False
        self.closed = False
        self.segments = 0
        self.samples = 0
        self._seq = 0
        self._last_segment = -1
        self._first_submit_at: float | None = None
        self._audio_started = False
        self.queued = queued
        self._held: list[Located] = []  # segments cut while queued, in order, for the pipeline
        self._live = LiveHold(pace, speed) if pace is not None else None
        self._live_timer: asyncio.TimerHandle | None = None
        self._cut_timer: asyncio.TimerHandle | None = None  # cuts text waiting too long for its sentence
        self._ended = False  # the pipeline has the end marker
        # A live context's segments handed over and not yet wholly produced, by segment index (two
        # at most): [predicted seconds, seconds produced, characters, speed].
        self._live_made: dict[int, list[float]] = {}

    @property
    def voice(self) -> str:
        return self._job.voice

    @property
    def encoder(self) -> AudioEncoder:
        return self._job.encoder

    @property
    def audio_ms(self) -> float:
        return self.samples * 1000.0 / self.sample_rate

    @property
    def active(self) -> bool:
        """Whether this utterance is a real-time stream now: work of its is in the pipeline, or its
        listener still has audio to play."""
        return not self.closed and not self.queued and self._pipeline.active(self._job)

    @property
    def audio_in_hand_s(self) -> float:
        """Seconds of audio its listener has left to play, by the playback clock."""
        return self._job.playback.slack()

    @property
    def held_chars(self) -> int:
        """Text taken but not yet through the first stage: what counts against the text budget."""
        live = self._live.chars if self._live is not None else 0
        held = sum(len(s.text) for s in self._held)
        return self._segmenter.buffered_chars + self._job.pending_chars + held + live

    @property
    def submitted_any(self) -> bool:
        """Whether any of its text has reached the pipeline yet."""
        return self._job.texts_submitted > 0

    def admit(self) -> None:
        """A place came free: the segments held while queued go to the pipeline, in order."""
        if not self.queued or self.closed:
            return
        self.queued = False
        held, self._held = self._held, []
        if self._live is not None:
            for segment in held:
                self._live.hold(segment)
            self._pump_live()
            return
        for segment in held:
            self._pipeline.submit(self._job, segment.text, segment.offset)
        if self.ending:
            self._end_pipeline()

    # -- what a door asks ----------------------------------------------------------------------------

    def feed(self, text: str) -> None:
        """More text; refused (and nothing taken) when it would exceed the text budget."""
        self._check_open()
        held = self.held_chars
        if held + len(text) > self._text_budget:
            raise RequestRefused(
                ErrorCode.TEXT_TOO_LONG,
                f"context {self.name!r} would hold {held + len(text)} characters not yet synthesized; "
                f"the limit is {self._text_budget}: wait for audio, then send more",
                self.name,
            )
        if self._live is not None:
            self._live.arrived(text, time.monotonic())
        self._submit(self._segmenter.feed_located(text))
        if self._live is not None:
            self._cut_waiting()

    def flush(self) -> None:
        """Synthesize what is buffered now, even mid-sentence."""
        self._check_open()
        self._submit(self._segmenter.flush_located())

    def end(self) -> None:
        """No more text: synthesize the rest, then finish with reason end."""
        self._check_open()
        self._submit(self._segmenter.flush_located())
        self.ending = True
        self._cancel_cut_timer()
        if not self.queued and not self._live:
            self._end_pipeline()

    def cancel(self, reason: DoneReason = DoneReason.CANCEL) -> None:
        """Stop now: queued work leaves every stage, unsent audio is withdrawn, `Finished` follows."""
        if self.closed:
            return
        self._stop_live()
        self._pipeline.cancel(self._job)
        self._sink.retract(self)
        self._close(reason)

    def abort(
        self,
        code: ErrorCode,
        message: str,
        reason: DoneReason = DoneReason.ERROR,
        *,
        retry_after_s: int | None = None,
    ) -> None:
        """Stop with an error event first (overload, shutdown), then as `cancel`."""
        if self.closed:
            return
        self._fail_event(code, message, retry_after_s)
        self.cancel(reason)

    def drop(self) -> None:
        """The reader is gone: stop all work and send nothing."""
        if self.closed:
            return
        self._stop_live()
        self._pipeline.cancel(self._job)
        self.closed = True
        self._on_closed(self)

    def _check_open(self) -> None:
        if self.ending or self.closed:
            raise RequestRefused(
                ErrorCode.UNKNOWN_CONTEXT, f"context {self.name!r} has ended; wait for done", self.name
            )

    def _submit(self, segments: Sequence[Located]) -> None:
        for segment in segments:
            if self._first_submit_at is None:
                # Counted from the client's text, so time to first audio includes a wait for admission.
                self._first_submit_at = time.perf_counter()
            if self.queued:
                self._held.append(segment)
            elif self._live is not None:
                self._live.hold(segment)
            else:
                self._pipeline.submit(self._job, segment.text, segment.offset)
        if self._live is not None and segments:
            self._pump_live()

    def _end_pipeline(self) -> None:
        if not self._ended:
            self._ended = True
            self._pipeline.end(self._job)

    # -- a live context: one segment at a time, each when due (see `core.live`) -------------------------

    def _pump_live(self) -> None:
        """Hand the pipeline the next held segment once the listener's audio ahead runs low, after
        the skips and at the speed `pace.decide` chooses; then the end marker once all are handed."""
        live = self._live
        if live is None or self.closed or self.queued:
            return
        self._cancel_live_timer()
        if live:
            job = self._job
            if job.pending_chars > 0 or job.segments_made > self.segments:
                self._recheck(0.05)  # the last one handed over is still being made
                return
            now = time.monotonic()
            unmade = sum(max(0.0, expected - made) for expected, made, _, _ in self._live_made.values())
            ahead = job.playback.slack(now) + unmade
            if ahead > live.horizon_s:
                self._recheck(ahead - live.horizon_s)
                return
            handover = live.next(now, ahead)
            if handover.skipped:
                first, last = handover.skipped[0], handover.skipped[-1]
                self._emit(Skipped(first.offset, last.end))
            segment = handover.segment
            if segment is None:
                if self.ending:
                    self._end_pipeline()
                return
            # G2P is idle, so this text's (first) segment gets the next index.
            expected = live.seconds(segment) / handover.speed
            self._live_made[job.segments_made] = [expected, 0.0, len(segment.text), handover.speed]
            self._pipeline.submit(job, segment.text, segment.offset, handover.speed)
        if not live and self.ending:
            self._end_pipeline()

    def _recheck(self, delay_s: float) -> None:
        self._live_timer = asyncio.get_running_loop().call_later(delay_s, self._pump_live)

    def _cancel_live_timer(self) -> None:
        if self._live_timer is not None:
            self._live_timer.cancel()
            self._live_timer = None

    def _cut_waiting(self) -> None:
        """Cut a live context's text that has waited for its sentence to end as long as the bound
        (`LiveHold.cut_due`), and look again when the next text waiting is due."""
        live = self._live
        self._cancel_cut_timer()
        if live is None or self.closed or self.ending:
            return
        due = live.cut_due(self._segmenter.waiting_offset, time.monotonic())
        if due is not None and due <= 0:
            self._submit(self._segmenter.cut_waiting())
            due = live.cut_due(self._segmenter.waiting_offset, time.monotonic())
            if due is not None:
                due = max(due, CUT_RETRY_S)  # no word is complete yet: it is still arriving
        if due is not None:
            self._cut_timer = asyncio.get_running_loop().call_later(due, self._cut_waiting)

    def _cancel_cut_timer(self) -> None:
        if self._cut_timer is not None:
            self._cut_timer.cancel()
            self._cut_timer = None

    def _stop_live(self) -> None:
        self._cancel_live_timer()
        self._cancel_cut_timer()
        if self._live is not None:
            self._live.clear()

    # -- results from the pipeline (JobSink) ------------------------------------------------------------

    def has_room(self) -> bool:
        return self._sink.has_room(self)

    def deliver(self, job: Job, segment: EncodedSegment) -> None:
        if self.closed or job.cancelled:
            return
        if not segment.frames:
            if self._live is not None:
                self._live_progress(segment)
            return
        if not self._audio_started and self._first_submit_at is not None:
            self._audio_started = True
            self._metrics.time_to_first_audio.observe(time.perf_counter() - self._first_submit_at)
        if segment.index != self._last_segment:
            # A segment rendered in parts arrives in parts: announce it before its first frame only.
            self._last_segment = segment.index
            self.segments += 1
            self._metrics.segments.inc()
            start_ms = self.audio_ms
            self._emit(SegmentStarted(segment.index, segment.text, start_ms, segment.speed))
            if self.words:
                self._emit(SegmentWords(segment.index, self._timeline(segment, start_ms)))
        self._send_frames(segment.frames)
        if self._live is not None:
            self._live_progress(segment)

    def _live_progress(self, segment: EncodedSegment) -> None:
        """Count a live segment's audio as it is made; once whole, learn the voice's rate from it."""
        assert self._live is not None
        made = self._live_made.get(segment.index)
        if made is not None:
            made[1] += sum(frame.samples for frame in segment.frames) / self.sample_rate
            if segment.last_part:
                del self._live_made[segment.index]
                self._live.observe(int(made[2]), made[1], made[3])
        self._pump_live()

    @staticmethod
    def _timeline(segment: EncodedSegment, start_ms: float) -> tuple[WordTiming, ...]:
        """The segment's words on the utterance's audio timeline, in whole-ish milliseconds."""
        return tuple(
            WordTiming(
                word=w.word,
                start_ms=round(start_ms + 1000 * w.start_s, 1),
                end_ms=round(start_ms + 1000 * w.end_s, 1),
                char_start=w.char_start,
                char_end=w.char_end,
            )
            for w in segment.words
        )

    def finish(self, job: Job, tail: Sequence[Frame]) -> None:
        if self.closed:
            return
        if self.segments:
            self._send_frames(tail)
        self._close(DoneReason.END)

    def fail(self, job: Job, error: SynthesisError) -> None:
        if self.closed:
            return
        self._sink.retract(self)
        self._fail_event(ErrorCode.INTERNAL, str(error))
        self._close(DoneReason.ERROR)

    def _send_frames(self, frames: Sequence[Frame]) -> None:
        for frame in frames:
            if self._job.cancelled:
                return
            chunk = AudioChunk(self._last_segment, self._seq, frame.data, frame.samples)
            if not self._emit(chunk):
                return
            self._seq += 1
            self.samples += frame.samples
            self._metrics.audio_seconds.inc(frame.samples / self.sample_rate)

    def _fail_event(self, code: ErrorCode, message: str, retry_after_s: int | None = None) -> None:
        self._metrics.errors.labels(code=code.value).inc()
        self._emit(Failed(code, message, retry_after_s))

    def _close(self, reason: DoneReason) -> None:
        # The session forgets it first, so a door that sees `Finished` sees its session without it.
        self.closed = True
        self._on_closed(self)
        self._emit(Finished(reason, self.audio_ms, self.segments))

    def _emit(self, event: Event) -> bool:
        return self._sink.emit(self, event)

    def __repr__(self) -> str:
        return f"Utterance({self.name!r}, queued={self.queued}, closed={self.closed})"
