"""The aiohttp application: every door on one host and port, and the model loaded behind them.

The model loads in a background task after the socket is bound, so `/healthz` answers at once and
`/readyz` says 503 until the model is warm. Shutdown is ordered: stop accepting, let sessions finish
or cancel their utterances (on_shutdown), then stop the pipeline (cleanup context).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator

from aiohttp import web

from speakd.protocol import PATH
from speakd.server.config import Config, is_loopback, parse_listen
from speakd.server.core.errors import Busy
from speakd.server.core.synthesis import SynthesisCore
from speakd.server.engines.backend import SpeechBackend
from speakd.server.engines.kokoro.speech import Speech
from speakd.server.frontends import openai_speech, page_door, status
from speakd.server.frontends.auth import (
    DEFAULT_PUBLIC_PATHS,
    WS_SUBPROTOCOL,
    AccessTokens,
    auth_middleware,
)
from speakd.server.frontends.keys import CONFIG, LOADER, METRICS, STOP, loaded_core
from speakd.server.frontends.websocket import Connection
from speakd.server.frontends.wyoming_door import WyomingServer
from speakd.server.frontends.wyoming_zeroconf import Announcement, announced_address, zeroconf_name
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.fair_queue import BatchLimits
from speakd.server.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

__all__ = ["LOADER", "STOP", "create_app", "drain", "load_error"]


def load_backend(config: Config) -> SpeechBackend:
    """Blocking: the model named by the configuration (Kokoro, embedded or official weights)."""
    return Speech.load(config)


async def _load(app: web.Application) -> SynthesisCore:
    config = app[CONFIG]
    backend = await asyncio.to_thread(load_backend, config)
    pipeline = Pipeline(
        stages=backend.stages(),
        metrics=app[METRICS],
        lane_limit=config.pipeline.max_queued_per_context,
        batching=BatchLimits(
            backend.max_batch,
            max_cost=config.pipeline.max_batch_frames,
            linger_s=config.pipeline.batch_linger_ms / 1000,
        ),
        encoder_workers=config.pipeline.encoder_threads or min(4, os.cpu_count() or 1),
        sample_rate=backend.sample_rate,
    )
    started = time.perf_counter()
    try:
        steps, first_input = await asyncio.to_thread(backend.warm_up, config.model.default_voice)
        await pipeline.warm_up(steps, first_input)
    except BaseException:
        await pipeline.close()
        raise
    logger.info("model warmed up in %.2f s", time.perf_counter() - started)
    await pipeline.start()
    app[METRICS].ready.set(1)
    logger.info("ready: voices %s, default %s", ", ".join(backend.voice_names), config.model.default_voice)
    return SynthesisCore(backend=backend, pipeline=pipeline, config=config, metrics=app[METRICS])


def load_error(app: web.Application) -> BaseException | None:
    """Why the model could not be loaded, if it could not."""
    loader = app.get(LOADER)
    if loader is None or not loader.done() or loader.cancelled():
        return None
    error: BaseException | None = loader.exception()
    return error


async def _speech_context(app: web.Application) -> AsyncIterator[None]:
    loader = asyncio.create_task(_load(app), name="speakd-load")

    def stop_on_failure(task: asyncio.Task[SynthesisCore]) -> None:
        if load_error(app) is not None:
            app[STOP].set()

    loader.add_done_callback(stop_on_failure)
    app[LOADER] = loader
    yield
    loader.cancel()
    await asyncio.gather(loader, return_exceptions=True)
    core = loaded_core(app)
    if core is not None:
        await core.pipeline.close()


async def _wyoming_context(app: web.Application) -> AsyncIterator[None]:
    """The Wyoming listener, once the model is ready (Home Assistant retries a refused connection);
    closed before the pipeline stops."""
    config = app[CONFIG]
    if not config.wyoming.listen:
        yield
        return
    host, port = parse_listen(config.wyoming.listen)
    if not is_loopback(host):
        logger.warning(
            "wyoming: listening on %s, not loopback: Wyoming has no authentication, so anyone who can "
            "reach this port can use the daemon",
            host,
        )
    servers: list[WyomingServer] = []

    announcements: list[Announcement] = []

    async def start() -> None:
        core = await asyncio.shield(app[LOADER])
        server = WyomingServer(core)
        servers.append(server)
        bound = await server.start(host, port)
        logger.info("wyoming: listening on tcp://%s:%d", host, bound)
        if config.wyoming.zeroconf:
            name = zeroconf_name(config.wyoming.zeroconf_name)
            announcement = Announcement(name, announced_address(host), bound)
            announcements.append(announcement)
            await announcement.register()

    def stop_on_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and load_error(app) is None:
            logger.error("wyoming: cannot listen or announce on %s:%d: %s", host, port, task.exception())
            app[STOP].set()

    starting = asyncio.create_task(start(), name="speakd-wyoming")
    starting.add_done_callback(stop_on_failure)
    yield
    starting.cancel()
    await asyncio.gather(starting, return_exceptions=True)
    for announcement in announcements:
        await announcement.close()  # withdrawn first: Home Assistant stops offering a door that closes
    for server in servers:
        await server.close()


async def drain(app: web.Application) -> None:
    """Stop taking new work while still listening: /readyz says 503 so balancers send new clients
    elsewhere, new sessions are refused with 503, and open utterances get server.shutdown_grace_s
    to finish before they are cut off and their sockets closed with 1001. Idempotent."""
    app[METRICS].ready.set(0)
    core = loaded_core(app)
    if core is not None:
        await core.shutdown(app[CONFIG].server.shutdown_grace_s)


async def stream(request: web.Request) -> web.StreamResponse:
    core = loaded_core(request.app)
    if core is None:
        raise web.HTTPServiceUnavailable(
            text="the model is still loading; retry when /readyz says ready\n", headers={"Retry-After": "1"}
        )
    config = core.config
    # aiohttp closes with 1009 past its own cap; below it we answer message_too_large and stay open.
    # A browser offers `speakd.v1` (and its token, which the auth middleware has taken out): answer it.
    ws = web.WebSocketResponse(
        heartbeat=30.0,
        max_msg_size=max(4 * config.limits.max_message_bytes, 1 << 20),
        protocols=(WS_SUBPROTOCOL,),
    )
    try:
        conn = Connection(ws, request.transport, core=core)  # counts the session before the upgrade
    except Busy as exc:
        raise web.HTTPServiceUnavailable(
            text=f"{exc}\n", headers={"Retry-After": str(exc.retry_after_s)}
        ) from exc
    try:
        await ws.prepare(request)
        await conn.serve()
    finally:
        conn.close()
    return ws


PUBLIC_PATHS = DEFAULT_PUBLIC_PATHS | openai_speech.PUBLIC_PATHS | page_door.PUBLIC_PATHS | {"/v1/voices"}
"""What answers without a token: health checks, the voice and model listings (Open WebUI fetches
those without credentials; they reveal only names) and the browser page's files (it asks for the token
itself, and holds no secret)."""


async def _bound_send_buffer(request: web.Request, response: web.StreamResponse) -> None:
    """Cap the kernel's send buffer of the client's socket, so a reader that stalls holds a bounded
    amount of kernel memory and meets speakd's own limits (overloaded, back-pressure) soon."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, request.app[CONFIG].limits.socket_send_buffer_bytes
            )


def create_app(config: Config, tokens: AccessTokens | None = None) -> web.Application:
    """The application; `tokens` default to those of auth.token_file."""
    if tokens is None:
        tokens = AccessTokens.for_config(config.auth.token_file)
    app = web.Application(middlewares=[auth_middleware(tokens, config.auth.allowed_origins, PUBLIC_PATHS)])
    app[CONFIG] = config
    app[METRICS] = SpeakdMetrics()
    app[STOP] = asyncio.Event()
    app.cleanup_ctx.append(_speech_context)
    app.cleanup_ctx.append(_wyoming_context)  # cleaned up first: its sessions go before the pipeline
    app.on_shutdown.append(drain)
    app.on_response_prepare.append(_bound_send_buffer)
    status.add_routes(app)
    page_door.add_routes(app)
    openai_speech.add_routes(app)
    app.router.add_get(PATH, stream)
    return app
