"""The aiohttp application: the WebSocket endpoint and the HTTP endpoints beside it.

The model loads in a background task after the socket is bound, so `/healthz` answers at once and
`/readyz` says 503 until the model is warm. Shutdown is ordered: stop accepting, let connections
finish or cancel their contexts (on_shutdown), then stop the pipeline (cleanup context).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

from aiohttp import web

from speakd.protocol import PATH
from speakd.server.config import Config
from speakd.server.engines.kokoro.g2p import LANGUAGES
from speakd.server.engines.kokoro.speech import Speech
from speakd.server.frontends.websocket import Connection
from speakd.server.metrics import SpeakdMetrics
from speakd.server.pipeline.fair_queue import BatchLimits
from speakd.server.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", SpeakdMetrics)
CONNECTIONS: web.AppKey[set[Connection]] = web.AppKey("connections")
LOADER: web.AppKey[asyncio.Task[tuple[Speech, Pipeline]]] = web.AppKey("loader")
# Set by a signal or by a model that cannot load: the daemon's run loop waits on it.
STOP = web.AppKey("stop", asyncio.Event)


def _loaded(app: web.Application) -> tuple[Speech, Pipeline] | None:
    loader = app[LOADER]
    if loader.done() and not loader.cancelled() and loader.exception() is None:
        loaded: tuple[Speech, Pipeline] = loader.result()
        return loaded
    return None


async def _load(app: web.Application) -> tuple[Speech, Pipeline]:
    config = app[CONFIG]
    speech = await asyncio.to_thread(Speech.load, config)
    pipeline = Pipeline(
        g2p=speech.g2p,
        engine=speech.engine,
        voices=speech.voices,
        metrics=app[METRICS],
        lane_limit=config.pipeline.max_queued_per_context,
        batching=BatchLimits(
            speech.max_batch,
            max_cost=config.pipeline.max_batch_frames,
            linger_s=config.pipeline.batch_linger_ms / 1000,
        ),
        encoder_workers=config.pipeline.encoder_threads or min(4, os.cpu_count() or 1),
    )
    started = time.perf_counter()
    try:
        requests = await asyncio.to_thread(speech.warm_up_requests, config.model.default_voice)  # G2P
        await pipeline.warm_up(requests)
    except BaseException:
        await pipeline.close()
        raise
    logger.info("model warmed up in %.2f s", time.perf_counter() - started)
    await pipeline.start()
    app[METRICS].ready.set(1)
    logger.info("ready: voices %s, default %s", ", ".join(speech.voices.names), config.model.default_voice)
    return speech, pipeline


def load_error(app: web.Application) -> BaseException | None:
    """Why the model could not be loaded, if it could not."""
    loader = app.get(LOADER)
    if loader is None or not loader.done() or loader.cancelled():
        return None
    error: BaseException | None = loader.exception()
    return error


async def _speech_context(app: web.Application) -> AsyncIterator[None]:
    loader = asyncio.create_task(_load(app), name="speakd-load")

    def stop_on_failure(task: asyncio.Task[tuple[Speech, Pipeline]]) -> None:
        if load_error(app) is not None:
            app[STOP].set()

    loader.add_done_callback(stop_on_failure)
    app[LOADER] = loader
    yield
    loader.cancel()
    await asyncio.gather(loader, return_exceptions=True)
    loaded = _loaded(app)
    if loaded is not None:
        await loaded[1].close()


async def _close_connections(app: web.Application) -> None:
    app[METRICS].ready.set(0)
    grace = app[CONFIG].server.shutdown_grace_s
    connections: set[Connection] = app[CONNECTIONS]
    await asyncio.gather(*(conn.shutdown(grace) for conn in list(connections)), return_exceptions=True)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    loader = request.app[LOADER]
    if _loaded(request.app) is not None:
        return web.Response(text="ready\n")
    if loader.done() and not loader.cancelled():
        return web.Response(status=503, text=f"model failed to load: {loader.exception()}\n")
    return web.Response(status=503, text="loading\n")


async def voices(request: web.Request) -> web.Response:
    loaded = _loaded(request.app)
    if loaded is None:
        return web.json_response({"error": "model not loaded yet"}, status=503)
    default = request.app[CONFIG].model.default_voice
    return web.json_response(
        [
            {"name": name, "default": name == default, "languages": list(LANGUAGES)}
            for name in loaded[0].voices.names
        ]
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].registry.render()
    return web.Response(
        body=body.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


async def stream(request: web.Request) -> web.StreamResponse:
    app = request.app
    loaded = _loaded(app)
    if loaded is None:
        raise web.HTTPServiceUnavailable(text="the model is still loading; retry when /readyz says ready\n")
    config = app[CONFIG]
    if len(app[CONNECTIONS]) >= config.limits.max_connections:
        raise web.HTTPServiceUnavailable(text=f"at most {config.limits.max_connections} connections\n")
    speech, pipeline = loaded
    # aiohttp closes with 1009 past its own cap; below it we answer message_too_large and stay open.
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=max(4 * config.limits.max_message_bytes, 1 << 20))
    await ws.prepare(request)
    conn = Connection(
        ws, request.transport, pipeline=pipeline, voices=speech.voices, config=config, metrics=app[METRICS]
    )
    app[CONNECTIONS].add(conn)
    app[METRICS].connections.inc()
    app[METRICS].connections_total.inc()
    try:
        await conn.serve()
    finally:
        app[CONNECTIONS].discard(conn)
        app[METRICS].connections.dec()
    return ws


def create_app(config: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[METRICS] = SpeakdMetrics()
    connections: set[Connection] = set()
    app[CONNECTIONS] = connections
    app[STOP] = asyncio.Event()
    app.cleanup_ctx.append(_speech_context)
    app.on_shutdown.append(_close_connections)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/voices", voices)
    app.router.add_get("/metrics", metrics)
    app.router.add_get(PATH, stream)
    return app
