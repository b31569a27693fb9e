"""One WebSocket to the daemon driving one context: send its requests, read back only its messages.

The socket is read by whoever iterates the connection, and written by anyone else; websockets allows
one reader and one writer at the same time, which is exactly what streaming text in while audio comes
out needs.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from types import TracebackType
from typing import TypeAlias

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from speakd.protocol import (
    DEFAULT_CODEC,
    DEFAULT_CONTEXT,
    DEFAULT_FRAME_MS,
    DEFAULT_HOST,
    DEFAULT_LANG,
    DEFAULT_PORT,
    DEFAULT_SAMPLE_RATE,
    DEFAULT_SPEED,
    PATH,
    Audio,
    AudioCodec,
    Cancel,
    ClientMessage,
    Done,
    End,
    Error,
    Flush,
    ProtocolError,
    Segment,
    ServerMessage,
    Skipped,
    Start,
    Started,
    Text,
    Words,
    decode_server,
    encode,
)

from .errors import ConnectFailed, ServerError, StreamError

logger = logging.getLogger(__name__)

DEFAULT_URL = f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}{PATH}"

ContextMessage: TypeAlias = Segment | Words | Skipped | Audio | Done
"""What iterating a connection yields; errors are raised as `ServerError` instead."""


def _connect_hint(exc: Exception) -> str:
    """What the user should do about a failed connection, judged from how it failed."""
    if isinstance(exc, InvalidStatus) and exc.response.status_code == HTTPStatus.SERVICE_UNAVAILABLE:
        return "the daemon is up but not ready yet (still loading its model?); try again in a moment"
    if isinstance(exc, InvalidStatus | InvalidURI):
        return f"is this the daemon's address? It serves ws://HOST:PORT{PATH}"
    return "is the daemon running? Start it with `speakd serve` (or scripts/serve in a checkout)"


class Connection:
    """A connection to speakd that runs one context at a time (start it again after its `done`).

    Iterate it (`async for msg in conn`) to read the context's messages; iteration ends after `done`.
    An `error` for the context, or for the whole connection, is raised from the iteration as
    `ServerError`; iterating again carries on with the next message.
    """

    def __init__(self, ws: ClientConnection, url: str, context: str = DEFAULT_CONTEXT) -> None:
        self._ws = ws
        self.url = url
        self.context = context
        self._open_context = False

    @classmethod
    async def open(
        cls, url: str = DEFAULT_URL, *, context: str = DEFAULT_CONTEXT, open_timeout: float = 5.0
    ) -> Connection:
        """Connect, turning every way of failing to (refused, timeout, bad URL, HTTP error) into one error."""
        try:
            # Audio frames are already compressed; deflate would only add latency. The daemon is local,
            # so a proxy from the environment would only get in the way.
            ws = await connect(url, open_timeout=open_timeout, compression=None, proxy=None)
        except (OSError, WebSocketException) as exc:
            raise ConnectFailed(url, str(exc) or type(exc).__name__, _connect_hint(exc)) from exc
        return cls(ws, url, context)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket; the server drops whatever context was still open."""
        await self._ws.close()

    async def start(
        self,
        *,
        voice: str | None = None,
        lang: str = DEFAULT_LANG,
        speed: float = DEFAULT_SPEED,
        codec: AudioCodec = DEFAULT_CODEC,
        sample_rate: int = DEFAULT_SAMPLE_RATE,
        frame_ms: int = DEFAULT_FRAME_MS,
        words: bool = False,
    ) -> Started:
        """Open the context and return the settings in force (the decoder needs them). With `words`
        the server times every word (`words` messages); `Started.words` says whether it will (a
        server older than protocol 1.1 leaves it False)."""
        await self._send(
            Start(
                context=self.context,
                voice=voice,
                lang=lang,
                speed=speed,
                codec=codec,
                sample_rate=sample_rate,
                frame_ms=frame_ms,
                words=words,
            )
        )
        msg = await self._receive()
        if not isinstance(msg, Started):
            raise StreamError(f"expected 'started' for context {self.context!r}, got {msg.type!r}")
        self._open_context = True
        return msg

    async def send_text(self, text: str) -> None:
        """Append text; the server speaks each sentence as soon as it is complete."""
        await self._send(Text(context=self.context, text=text))

    async def flush(self) -> None:
        """Speak what is buffered now, without waiting for the sentence to end."""
        await self._send(Flush(context=self.context))

    async def end(self) -> None:
        """No more text: the rest is spoken, then `done` ends the iteration."""
        await self._send(End(context=self.context))

    async def cancel(self) -> None:
        """Stop at once; pending audio is dropped and `done` (reason cancel) follows."""
        await self._send(Cancel(context=self.context))

    def __aiter__(self) -> Connection:
        return self

    async def __anext__(self) -> ContextMessage:
        if not self._open_context:
            raise StopAsyncIteration
        msg = await self._receive()
        if isinstance(msg, Started):
            raise StreamError(f"unexpected 'started' for running context {self.context!r}")
        if isinstance(msg, Done):
            self._open_context = False
        return msg

    async def _send(self, msg: ClientMessage) -> None:
        try:
            await self._ws.send(encode(msg))
        except ConnectionClosed as exc:
            raise StreamError(f"connection to {self.url} closed: {exc}") from exc

    async def _receive(self) -> Started | Segment | Words | Skipped | Audio | Done:
        """Next message for our context; errors that concern us are raised, other contexts skipped."""
        while True:
            msg = await self._receive_any()
            if msg.context is not None and msg.context != self.context:
                logger.debug("ignoring %r for context %r", msg.type, msg.context)
                continue
            if isinstance(msg, Error):
                raise ServerError(msg.code, msg.message, msg.retry_after_ms)
            return msg

    async def _receive_any(self) -> ServerMessage:
        try:
            frame = await self._ws.recv()
        except ConnectionClosed as exc:
            raise StreamError(f"connection to {self.url} closed before the context was done: {exc}") from exc
        if isinstance(frame, str):
            raise StreamError("the server sent a text frame; protocol v1 uses binary frames only")
        try:
            return decode_server(frame)
        except ProtocolError as exc:
            raise StreamError(f"the server sent a malformed message: {exc}") from exc
