"""The application's keys, shared by the doors: configuration, metrics, the loading core, stop."""

from __future__ import annotations

import asyncio

from aiohttp import web

from speakd.server.config import Config
from speakd.server.core.synthesis import SynthesisCore
from speakd.server.metrics import SpeakdMetrics

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", SpeakdMetrics)
LOADER: web.AppKey[asyncio.Task[SynthesisCore]] = web.AppKey("loader")
# Set by a signal or by a model that cannot load: the daemon's run loop waits on it.
STOP = web.AppKey("stop", asyncio.Event)


def loaded_core(app: web.Application) -> SynthesisCore | None:
    """The synthesis core once the model is loaded and warm, else None."""
    loader = app.get(LOADER)
    if loader is not None and loader.done() and not loader.cancelled() and loader.exception() is None:
        return loader.result()
    return None
