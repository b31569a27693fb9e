"""`speakd serve`: parse options, load the configuration, run the daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from speakd.server.config import Config, load_config
from speakd.server.dependencies import check_dependencies
from speakd.server.errors import SpeakdError
from speakd.server.frontends.auth import AccessTokens, check_bind, install_log_redaction
from speakd.server.sd_notify import notify, watchdog_interval_s

logger = logging.getLogger("speakd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speakd", description="Real-time streaming speech daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="TOML configuration file (default: $SPEAKD_CONFIG)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8765; 0 picks a free one)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    serve.add_argument("--cache-dir", help="where the assembled model is cached (default ~/.cache/speakd)")
    serve.add_argument(
        "--model-dir",
        help="directory with the official Kokoro-82M weights (config.json, kokoro-v1_0.pth, voices/*.pt), "
        "run on the torch engine (default: model.dir of the config file, else $SPEAKD_MODEL_DIR, else the "
        "embedded model)",
    )
    serve.add_argument(
        "--voice",
        help="default voice (default jf_gongitsune; with a model dir af_heart, else an English one)",
    )
    serve.add_argument(
        "--engine",
        choices=["auto", "torch", "onnx"],
        help="inference engine (default onnx, auto with a model dir; auto: torch on a GPU or a model dir)",
    )
    serve.add_argument("--device", help="torch engine device: auto, cpu, cuda or cuda:N (default auto)")
    serve.add_argument("--threads", type=int, help="inference threads per stage (default: all cores)")
    serve.add_argument(
        "--token-file",
        help="file of access tokens, one per line (or sha256:<hex> of one); with any, every endpoint but "
        "/healthz, /readyz and the voice and model lists needs one (default: auth.token_file)",
    )
    serve.add_argument(
        "--allow-unauthenticated",
        action="store_const",
        const=True,
        help="listen on a non-loopback address without a token (only behind something that authenticates)",
    )
    serve.add_argument(
        "--wyoming",
        metavar="[HOST:]PORT",
        help="also serve Home Assistant's Wyoming protocol on this TCP port (host 127.0.0.1 unless given; "
        "10200 is Home Assistant's usual TTS port; default: wyoming.listen, off)",
    )
    serve.add_argument(
        "--wyoming-allow-remote",
        action="store_const",
        const=True,
        help="let the Wyoming port listen on a non-loopback address (Wyoming has no authentication)",
    )
    serve.add_argument(
        "--wyoming-zeroconf",
        action="store_const",
        const=True,
        help="announce the Wyoming port over mDNS so Home Assistant discovers it (default: wyoming.zeroconf)",
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "server.host": args.host,
        "server.port": args.port,
        "server.log_level": args.log_level,
        "model.dir": args.model_dir,
        "model.cache_dir": args.cache_dir,
        "model.default_voice": args.voice,
        "model.engine": args.engine,
        "model.device": args.device,
        "model.threads": args.threads,
        "auth.token_file": args.token_file,
        "auth.allow_unauthenticated": args.allow_unauthenticated,
        "wyoming.listen": args.wyoming,
        "wyoming.allow_remote": args.wyoming_allow_remote,
        "wyoming.zeroconf": args.wyoming_zeroconf,
    }


async def _watchdog(period_s: float) -> None:
    """Pings systemd's watchdog from the event loop: a loop blocked for WatchdogSec gets restarted."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(period_s)


async def _serve(config: Config, tokens: AccessTokens) -> None:
    from speakd.server.app import LOADER, STOP, create_app, drain, load_error

    app = create_app(config, tokens)
    # handler_cancellation: a client that hangs up mid-request cancels its handler, so its synthesis
    # leaves every stage at once instead of when the next write fails.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        # The drain below has already let utterances finish (or cut them off): handlers end at once.
        shutdown_timeout=5.0,
        handler_cancellation=True,
    )
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port)
    await site.start()
    for address in runner.addresses:
        host, port = address[0], address[1]
        logger.info("listening on ws://%s:%d/v1/stream (model loading; /readyz says when ready)", host, port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app[STOP].set)

    def ready(task: asyncio.Task[object]) -> None:
        if load_error(app) is None and not task.cancelled():
            notify("READY=1", "STATUS=serving")

    app[LOADER].add_done_callback(ready)
    interval = watchdog_interval_s()
    watchdog = asyncio.create_task(_watchdog(interval)) if interval else None
    await app[STOP].wait()
    error = load_error(app)
    if error is None:
        notify("STOPPING=1", "STATUS=draining")
        logger.info("draining: finishing open contexts (up to %.0f s)", config.server.shutdown_grace_s)
        await drain(app)  # still listening: /readyz says 503 and new work is refused, not dropped
    if watchdog is not None:
        watchdog.cancel()
    await runner.cleanup()
    if error is not None:
        raise error
    logger.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config, _overrides(args))
        tokens = AccessTokens.for_config(config.auth.token_file)
        check_bind(config.server.host, bool(tokens), config.auth.allow_unauthenticated)
    except SpeakdError as exc:
        print(f"speakd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    install_log_redaction()
    if tokens:
        logger.info("access tokens: %d configured", len(tokens))
    try:
        check_dependencies()
        asyncio.run(_serve(config, tokens))
    except SpeakdError as exc:
        logger.critical("cannot start: %s", exc)
        return 1
    except OSError as exc:
        logger.critical("cannot listen on %s:%d: %s", config.server.host, config.server.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
