"""An event sink for doors that pull: an HTTP body or an SSE stream reads events at its own pace.

It is bounded in bytes of audio, and says it has no room when full, so the pipeline holds that
utterance's work (its lanes fill, its stages take other jobs) instead of buffering without limit: a
slow reader stalls only itself. Taking audio out wakes the pipeline again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from speakd.server.core.events import AudioChunk, Event, Finished
from speakd.server.core.utterance import Utterance


class EventStream:
    """The events of one session's utterances, in order, for one reader."""

    def __init__(self, limit_bytes: int, wake: Callable[[], None]) -> None:
        self._limit = limit_bytes
        self._wake = wake
        self._events: deque[Event] = deque()
        self._bytes = 0
        self._ready = asyncio.Event()

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def has_room(self, utterance: Utterance) -> bool:
        return self._bytes < self._limit

    def emit(self, utterance: Utterance, event: Event) -> bool:
        self._events.append(event)
        if isinstance(event, AudioChunk):
            self._bytes += len(event.data)
        self._ready.set()
        return True

    def retract(self, utterance: Utterance) -> None:
        self._events = deque(event for event in self._events if not isinstance(event, AudioChunk))
        self._bytes = 0

    async def next(self) -> Event:
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        event = self._events.popleft()
        if isinstance(event, AudioChunk):
            was_full = self._bytes >= self._limit
            self._bytes -= len(event.data)
            if was_full and self._bytes < self._limit:
                self._wake()
        return event

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Events up to and including the first `Finished` (one utterance per stream)."""
        while True:
            event = await self.next()
            yield event
            if isinstance(event, Finished):
                return
