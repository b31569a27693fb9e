"""The client connection against scripted servers: what it sends, what it yields, what it raises."""

import pickle
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.server import ServerConnection, serve

from speakd.client import ConnectFailed, Connection, ServerError, StreamError
from speakd.protocol import (
    PATH,
    Audio,
    AudioCodec,
    Cancel,
    ClientMessage,
    Done,
    DoneReason,
    End,
    Error,
    ErrorCode,
    Flush,
    Segment,
    ServerMessage,
    Start,
    Started,
    Text,
    decode_client,
    encode,
)

Script = Callable[[ServerConnection, list[ClientMessage]], Awaitable[None]]

STARTED = Started(context="default", voice="af_test", codec=AudioCodec.PCM16, frame_ms=20, pre_skip=0)


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[str, list[ClientMessage]]]:
    """A server that runs `script` per connection; yields its URL and what clients sent it."""
    received: list[ClientMessage] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None and ws.request.path == PATH
        await script(ws, received)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}{PATH}", received


async def receive(ws: ServerConnection, received: list[ClientMessage]) -> ClientMessage:
    frame = await ws.recv()
    assert isinstance(frame, bytes), "the client must send binary frames"
    msg = decode_client(frame)
    received.append(msg)
    return msg


async def send(ws: ServerConnection, *messages: ServerMessage) -> None:
    for msg in messages:
        await ws.send(encode(msg))


SEGMENT = Segment(context="default", segment=0, text="Hi.", start_ms=0.0)
AUDIO = Audio(context="default", segment=0, seq=0, data=bytes(960), samples=480)
DONE = Done(context="default", reason=DoneReason.END, audio_ms=20.0, segments=1)


async def test_a_context_runs_start_to_done() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await send(ws, STARTED)
        await receive(ws, received)
        await receive(ws, received)
        await receive(ws, received)
        await send(ws, SEGMENT, AUDIO, DONE)
        await ws.wait_closed()

    async with scripted_server(script) as (url, received), await Connection.open(url) as conn:
        started = await conn.start(voice="af_test", speed=1.5, codec=AudioCodec.PCM16, sample_rate=16000)
        await conn.send_text("Hi.")
        await conn.flush()
        await conn.end()
        messages = [msg async for msg in conn]
        assert [msg async for msg in conn] == []  # finished after done

    assert started == STARTED
    assert messages == [SEGMENT, AUDIO, DONE]
    assert received == [
        Start(voice="af_test", speed=1.5, codec=AudioCodec.PCM16, sample_rate=16000),
        Text(text="Hi."),
        Flush(),
        End(),
    ]


async def test_other_contexts_are_skipped() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await send(
            ws,
            Error(context="other", code=ErrorCode.UNKNOWN_CONTEXT, message="not ours"),
            STARTED,
            Segment(context="other", segment=0, text="x", start_ms=0.0),
            SEGMENT,
            DONE,
        )
        await ws.wait_closed()

    async with scripted_server(script) as (url, _), await Connection.open(url) as conn:
        await conn.start()
        assert [msg async for msg in conn] == [SEGMENT, DONE]


async def test_an_error_for_our_context_is_raised_and_the_stream_goes_on() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await send(ws, STARTED)
        await receive(ws, received)
        await send(ws, Error(context="default", code=ErrorCode.TEXT_TOO_LONG, message="buffer full"))
        await receive(ws, received)
        await send(ws, DONE)
        await ws.wait_closed()

    async with scripted_server(script) as (url, _), await Connection.open(url) as conn:
        await conn.start()
        await conn.send_text("x" * 100)
        with pytest.raises(ServerError) as info:
            await anext(conn)
        assert info.value.code is ErrorCode.TEXT_TOO_LONG
        assert str(info.value) == "server error text_too_long: buffer full"
        await conn.end()
        assert [msg async for msg in conn] == [DONE]


async def test_a_connection_wide_error_is_raised() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await send(ws, STARTED, Error(context=None, code=ErrorCode.SHUTTING_DOWN, message="bye"))
        await ws.wait_closed()

    async with scripted_server(script) as (url, _), await Connection.open(url) as conn:
        await conn.start()
        with pytest.raises(ServerError, match="shutting_down: bye"):
            await anext(conn)


async def test_a_rejected_start_raises_server_error() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await send(ws, Error(context="default", code=ErrorCode.UNKNOWN_VOICE, message="no voice 'zz'"))
        await ws.wait_closed()

    async with scripted_server(script) as (url, _), await Connection.open(url) as conn:
        with pytest.raises(ServerError) as info:
            await conn.start(voice="zz")
        assert info.value.code is ErrorCode.UNKNOWN_VOICE
        assert [msg async for msg in conn] == []  # no context was opened
        assert info.value.retry_after_ms is None


async def test_an_overloaded_start_carries_the_servers_retry_hint() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        refusal = Error(
            context="default", code=ErrorCode.OVERLOADED, message="retry in 3 s", retry_after_ms=3000
        )
        await send(ws, refusal)
        await ws.wait_closed()

    async with scripted_server(script) as (url, _), await Connection.open(url) as conn:
        with pytest.raises(ServerError) as info:
            await conn.start()
        assert info.value.code is ErrorCode.OVERLOADED and info.value.retry_after_ms == 3000
        copy = pickle.loads(pickle.dumps(info.value))
        assert (copy.code, copy.message, copy.retry_after_ms) == (ErrorCode.OVERLOADED, "retry in 3 s", 3000)


async def test_cancel_is_sent_for_our_context() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await send(ws, Started(context="mine", voice="v"))
        await receive(ws, received)
        await send(ws, Done(context="mine", reason=DoneReason.CANCEL, audio_ms=0.0, segments=0))
        await ws.wait_closed()

    async with scripted_server(script) as (url, received), await Connection.open(url, context="mine") as conn:
        await conn.start()
        await conn.cancel()
        (done,) = [msg async for msg in conn]
    assert isinstance(done, Done) and done.reason is DoneReason.CANCEL
    assert received[1] == Cancel(context="mine")


async def test_closing_before_done_is_a_stream_error() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await send(ws, STARTED)
        await ws.close()

    async with scripted_server(script) as (url, _), await Connection.open(url) as conn:
        await conn.start()
        with pytest.raises(StreamError, match="closed before the context was done"):
            await anext(conn)


async def test_a_text_frame_from_the_server_is_a_stream_error() -> None:
    async def script(ws: ServerConnection, received: list[ClientMessage]) -> None:
        await receive(ws, received)
        await ws.send("started")
        await ws.wait_closed()

    async with scripted_server(script) as (url, _), await Connection.open(url) as conn:
        with pytest.raises(StreamError, match="binary frames only"):
            await conn.start()


async def test_a_refused_connection_says_to_start_the_daemon() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"ws://127.0.0.1:{port}{PATH}"
    with pytest.raises(ConnectFailed, match=r"is the daemon running\? Start it with `speakd serve`") as info:
        await Connection.open(url)
    assert str(info.value).startswith(f"cannot connect to {url}: ")
    assert isinstance(info.value.__cause__, OSError)
