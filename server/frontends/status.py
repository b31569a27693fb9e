"""The daemon's own HTTP endpoints: liveness, readiness, the voice list and Prometheus metrics."""

from __future__ import annotations

from aiohttp import web

from speakd.server.frontends.keys import LOADER, METRICS, loaded_core


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    loader = request.app[LOADER]
    core = loaded_core(request.app)
    if core is not None and core.closing:
        return web.Response(status=503, text="draining\n")
    if core is not None:
        return web.Response(text="ready\n")
    if loader.done() and not loader.cancelled():
        return web.Response(status=503, text=f"model failed to load: {loader.exception()}\n")
    return web.Response(status=503, text="loading\n", headers={"Retry-After": "1"})


async def voices(request: web.Request) -> web.Response:
    core = loaded_core(request.app)
    if core is None:
        return web.json_response({"error": "model not loaded yet"}, status=503, headers={"Retry-After": "1"})
    languages = list(core.backend.languages)
    return web.json_response(
        [
            {"name": name, "default": name == core.default_voice, "languages": languages}
            for name in core.backend.voice_names
        ]
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].registry.render()
    return web.Response(
        body=body.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/voices", voices)
    app.router.add_get("/metrics", metrics)
