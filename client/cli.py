"""`speakd-say`: speak text or stdin through the daemon, live or into a WAV file, and report timings.

Exit codes: 0 done, 1 connection or server failure, 2 usage, 3 no audio device, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from speakd.protocol import (
    DEFAULT_LANG,
    DEFAULT_SAMPLE_RATE,
    MAX_SPEED,
    MIN_SPEED,
    SAMPLE_RATES,
    AudioCodec,
    Started,
    WordTiming,
)

from .connection import DEFAULT_URL, Connection
from .errors import NoAudioDevice, SpeakdClientError
from .player import Player
from .speak import AudioSink, SpeechReport, speak
from .text_source import fd_chunks, text_chunks
from .wav import WavWriter

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_AUDIO_DEVICE = 3
EXIT_INTERRUPTED = 130

_PROG = "speakd-say"


def _speed(value: str) -> float:
    speed = float(value)
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise argparse.ArgumentTypeError(f"must be between {MIN_SPEED} and {MAX_SPEED}, got {value}")
    return speed


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Speak text through the speakd daemon, starting before all of it has arrived.",
        epilog="example: llm 'tell me a story' | speakd-say -",
    )
    parser.add_argument("text", help="text to speak, or - to stream standard input as it arrives")
    parser.add_argument("--voice", help="voice id (default: the server's default voice)")
    parser.add_argument("--lang", default=DEFAULT_LANG, help=f"language (default {DEFAULT_LANG})")
    parser.add_argument("--speed", type=_speed, default=1.0, help=f"{MIN_SPEED} to {MAX_SPEED} (default 1.0)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"daemon WebSocket URL (default {DEFAULT_URL})")
    parser.add_argument(
        "--codec", type=AudioCodec, choices=list(AudioCodec), default=AudioCodec.OPUS, help="wire audio codec"
    )
    parser.add_argument(
        "--sample-rate", type=int, choices=SAMPLE_RATES, default=DEFAULT_SAMPLE_RATE, help="in Hz"
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE.wav", help="write a 16-bit mono WAV instead of playing"
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the timing summary")
    parser.add_argument(
        "--words",
        action="store_true",
        help="print each word to stdout as it is played: start and end (s on the audio timeline), word",
    )
    return parser


async def _run(args: argparse.Namespace) -> SpeechReport:
    text: AsyncIterator[str] = fd_chunks(sys.stdin.fileno()) if args.text == "-" else text_chunks(args.text)

    def open_sink(started: Started) -> AudioSink:
        return WavWriter(args.out, started.sample_rate) if args.out else Player(started.sample_rate)

    async with await Connection.open(args.url) as conn:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            return await speak(
                conn,
                text,
                open_sink,
                stop,
                voice=args.voice,
                lang=args.lang,
                speed=args.speed,
                codec=args.codec,
                sample_rate=args.sample_rate,
                on_word=_print_word if args.words else None,
            )
        finally:
            loop.remove_signal_handler(signal.SIGINT)


def _print_word(word: WordTiming) -> None:
    """One line per word, tab-separated so scripts can cut it: start s, end s, the word."""
    print(f"{word.start_ms / 1000:.3f}\t{word.end_ms / 1000:.3f}\t{word.word}", flush=True)


def _summary(report: SpeechReport) -> str:
    ttfa = report.time_to_first_audio_ms
    rtf = report.real_time_factor
    lines = [
        f"time to first audio: {'n/a' if ttfa is None else f'{ttfa:.0f} ms'}",
        f"audio duration: {report.audio_s:.2f} s",
        f"wall time: {report.wall_s:.2f} s",
        f"real-time factor: {'n/a' if rtf is None else f'{rtf:.3f}'}",
    ]
    if report.underruns is not None:
        lines.append(f"underruns: {report.underruns}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `speakd-say` console script; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits itself: 0 after --help, 2 on bad usage
        return EXIT_OK if exc.code in (0, None) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format=f"{_PROG}: %(levelname)s: %(message)s")
    try:
        report = asyncio.run(_run(args))
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NoAudioDevice as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_NO_AUDIO_DEVICE
    except (SpeakdClientError, OSError) as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if report.interrupted:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(_summary(report), file=sys.stderr)
    return EXIT_OK
