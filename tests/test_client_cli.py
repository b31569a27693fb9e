"""`speakd-say` end to end against a fake daemon that speaks protocol v1 with real Opus.

The fake runs on its own thread and event loop, so the CLI can own the main thread exactly as it does
when run from a shell (asyncio.run, the SIGINT handler). Streaming and Ctrl-C run the CLI as a
subprocess, since they are about pipes and signals.
"""

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import opuslib
import pytest
from devices import only_without_audio_device
from websockets.asyncio.server import ServerConnection, serve

from speakd.client.cli import main
from speakd.client.speak import CANCEL_GRACE_S
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
    Segment,
    Start,
    Started,
    Text,
    decode_client,
    encode,
)

SEGMENTS = 2
FRAMES_PER_SEGMENT = 10


def sweep(samples: int, rate: int) -> npt.NDArray[np.int16]:
    t = np.arange(samples) / rate
    return (np.sin(2 * np.pi * (200 * t + 1500 * t * t)) * 12000).astype(np.int16)


class FakeDaemon:
    """Answers `start` with `started`; on `end` speaks two segments of a sweep, then `done`."""

    def __init__(
        self, *, error_on_text: tuple[ErrorCode, str] | None = None, answer_cancel: bool = True
    ) -> None:
        self.error_on_text = error_on_text
        self.answer_cancel = answer_cancel
        self.received: list[ClientMessage] = []
        self.saw_text = threading.Event()
        self.saw_cancel = threading.Event()
        self.pcm_sent: list[npt.NDArray[np.int16]] = []
        self.pre_skip = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}{PATH}"

    def texts(self) -> list[str]:
        with self._lock:
            return [msg.text for msg in self.received if isinstance(msg, Text)]

    def messages(self) -> list[ClientMessage]:
        with self._lock:
            return list(self.received)

    def __enter__(self) -> "FakeDaemon":
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handle, "127.0.0.1", 0) as server:
            self._port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None and ws.request.path == PATH
        start = Start()
        encoder: Any = None
        async for frame in ws:
            assert isinstance(frame, bytes)
            msg = decode_client(frame)
            with self._lock:
                self.received.append(msg)
            if isinstance(msg, Start) and msg.voice == "nope":
                await ws.send(
                    encode(Error(context=msg.context, code=ErrorCode.UNKNOWN_VOICE, message="no 'nope'"))
                )
            elif isinstance(msg, Start):
                start = msg
                if msg.codec is AudioCodec.OPUS:
                    encoder = opuslib.Encoder(msg.sample_rate, 1, opuslib.APPLICATION_AUDIO)
                    encoder.bitrate = 64000
                    self.pre_skip = int(encoder.lookahead)
                await ws.send(
                    encode(
                        Started(
                            context=msg.context,
                            voice=msg.voice or "af_fake",
                            codec=msg.codec,
                            sample_rate=msg.sample_rate,
                            frame_ms=msg.frame_ms,
                            pre_skip=self.pre_skip,
                        )
                    )
                )
            elif isinstance(msg, Text):
                self.saw_text.set()
                if self.error_on_text is not None:
                    code, message = self.error_on_text
                    await ws.send(encode(Error(context=msg.context, code=code, message=message)))
            elif isinstance(msg, End):
                await self._speak(ws, start, encoder)
            elif isinstance(msg, Cancel):
                self.saw_cancel.set()
                if self.answer_cancel:
                    done = Done(context=msg.context, reason=DoneReason.CANCEL, audio_ms=0.0, segments=0)
                    await ws.send(encode(done))

    async def _speak(self, ws: ServerConnection, start: Start, encoder: Any) -> None:
        frame = start.sample_rate * start.frame_ms // 1000
        source = sweep(SEGMENTS * FRAMES_PER_SEGMENT * frame, start.sample_rate)
        self.pcm_sent.append(source)
        chunks = list(source.reshape(-1, frame))
        if encoder is not None:  # silence that pushes the encoder's look-ahead out
            chunks += [np.zeros(frame, np.int16)] * -(-self.pre_skip // frame)
        seq = 0
        for segment in range(SEGMENTS):
            start_ms = segment * FRAMES_PER_SEGMENT * start.frame_ms
            seg = Segment(context=start.context, segment=segment, text=f"part {segment}.", start_ms=start_ms)
            await ws.send(encode(seg))
            last = segment == SEGMENTS - 1
            for chunk in chunks[seq : None if last else seq + FRAMES_PER_SEGMENT]:
                data = encoder.encode(chunk.tobytes(), frame) if encoder is not None else chunk.tobytes()
                audio = Audio(
                    context=start.context, segment=segment, seq=seq, data=bytes(data), samples=frame
                )
                await ws.send(encode(audio))
                seq += 1
        audio_ms = seq * start.frame_ms
        await ws.send(
            encode(Done(context=start.context, reason=DoneReason.END, audio_ms=audio_ms, segments=SEGMENTS))
        )


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with FakeDaemon() as fake:
        yield fake


def read_wav(path: Path) -> tuple[int, npt.NDArray[np.int16]]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        return wav.getframerate(), np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def snr_db(heard: npt.NDArray[np.int16], want: npt.NDArray[np.int16]) -> float:
    noise = heard[: len(want)].astype(np.float64) - want
    return float(10 * np.log10(np.mean(want.astype(np.float64) ** 2) / np.mean(noise**2)))


CLI = [sys.executable, "-c", "import sys; from speakd.client.cli import main; sys.exit(main())"]


def test_out_writes_the_opus_stream_as_a_wav_of_the_right_length(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.wav"
    assert (
        main(["Hello there.", "--url", daemon.url, "--out", str(out), "--voice", "af_x", "--speed", "1.25"])
        == 0
    )

    rate, pcm = read_wav(out)
    (source,) = daemon.pcm_sent
    frame = 480
    flush_frames = -(-daemon.pre_skip // frame)
    assert rate == 24000
    assert len(pcm) == len(source) + flush_frames * frame - daemon.pre_skip
    assert snr_db(pcm, source) > 20  # trimmed pre_skip: the speech lines up with what was sent
    assert daemon.messages() == [
        Start(voice="af_x", speed=1.25),
        Text(text="Hello there."),
        End(),
    ]
    err = capsys.readouterr().err
    assert "time to first audio: " in err
    assert f"audio duration: {len(pcm) / rate:.2f} s" in err
    assert "real-time factor: " in err
    assert "underruns" not in err  # nothing was played


def test_pcm16_at_16_khz_is_written_sample_for_sample(daemon: FakeDaemon, tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    argv = [
        "Hi.",
        "--url",
        daemon.url,
        "--out",
        str(out),
        "--codec",
        "pcm16",
        "--sample-rate",
        "16000",
        "--quiet",
    ]
    assert main(argv) == 0
    rate, pcm = read_wav(out)
    assert rate == 16000
    np.testing.assert_array_equal(pcm, daemon.pcm_sent[0])


def test_quiet_prints_nothing(daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["Hi.", "--url", daemon.url, "--out", str(tmp_path / "x.wav"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_stdin_is_streamed_chunk_by_chunk_before_eof(daemon: FakeDaemon, tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    proc = subprocess.Popen(
        [*CLI, "-", "--url", daemon.url, "--out", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    try:
        # Ends inside the two-byte UTF-8 "é": the client must send what it has and carry the rest.
        proc.stdin.write(b"Hello there. Caf" + "é".encode()[:1])
        proc.stdin.flush()
        assert daemon.saw_text.wait(10), "nothing reached the daemon while stdin stayed open"
        assert proc.poll() is None
        assert daemon.texts() == ["Hello there. Caf"]
        assert not any(isinstance(msg, End) for msg in daemon.messages())

        _, err = proc.communicate("é".encode()[1:] + b" is open.\n", timeout=20)  # then EOF
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "".join(daemon.texts()) == "Hello there. Café is open.\n"
    assert len(daemon.texts()) >= 2
    assert isinstance(daemon.messages()[-1], End)
    _, pcm = read_wav(out)
    assert len(pcm) > len(daemon.pcm_sent[0]) - daemon.pre_skip


@pytest.mark.parametrize("answer_cancel", [True, False], ids=["confirmed", "server-silent"])
def test_ctrl_c_cancels_the_context_and_exits_130(answer_cancel: bool, tmp_path: Path) -> None:
    with FakeDaemon(answer_cancel=answer_cancel) as fake:
        proc = subprocess.Popen(
            [*CLI, "-", "--url", fake.url, "--out", str(tmp_path / "x.wav")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"Once upon a time")
            proc.stdin.flush()
            assert fake.saw_text.wait(10)
            began = time.monotonic()
            proc.send_signal(signal.SIGINT)
            # stdin stays open: the text is still "arriving". The limit only fires on a hang.
            proc.wait(timeout=CANCEL_GRACE_S + 20)
            took = time.monotonic() - began
        finally:
            proc.kill()
            _, err = proc.communicate()
        assert proc.returncode == 130, err.decode()
        assert fake.saw_cancel.is_set()
        assert not any(isinstance(msg, End) for msg in fake.messages())
        assert "interrupted" in err.decode()
        # It waits for `done`, but not past the grace: confirmed, it leaves on `done` (the grace never
        # runs out); unanswered, it gives up when the grace runs out, and not before.
        gave_up = "no confirmation from the server" in err.decode()
        assert gave_up is not answer_cancel, err.decode()
        if not answer_cancel:
            assert took >= CANCEL_GRACE_S


def test_a_server_error_exits_1_with_the_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeDaemon(error_on_text=(ErrorCode.INTERNAL, "synthesis failed: out of memory")) as fake:
        assert main(["Hello.", "--url", fake.url, "--out", str(tmp_path / "x.wav")]) == 1
    err = capsys.readouterr().err
    assert "server error internal: synthesis failed: out of memory" in err


def test_a_rejected_start_exits_1_and_leaves_no_file(
    daemon: FakeDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.wav"
    assert main(["Hello.", "--url", daemon.url, "--out", str(out), "--voice", "nope"]) == 1
    assert "server error unknown_voice: no 'nope'" in capsys.readouterr().err
    assert not out.exists()


def test_a_refused_connection_exits_1_and_says_how_to_start_the_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "x.wav"
    assert main(["Hello.", "--url", f"ws://127.0.0.1:{port}{PATH}", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to ws://127.0.0.1:{port}{PATH}" in err
    assert "is the daemon running? Start it with `speakd serve`" in err
    assert not out.exists()


class RealTimeSoundCard:
    """A fake sounddevice.OutputStream whose thread pulls 20 ms blocks at real-time pace."""

    latency = 0.0
    opened: list["RealTimeSoundCard"] = []  # noqa: RUF012 - a registry the test inspects

    def __init__(self, *, samplerate: int, channels: int, dtype: str, callback: Any) -> None:
        self.settings = (samplerate, channels, dtype)
        self.callback = callback
        self.played: list[npt.NDArray[np.int16]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        RealTimeSoundCard.opened.append(self)

    def _run(self) -> None:
        block = self.settings[0] // 50
        while not self._stop.wait(0.02):
            outdata = np.zeros((block, 1), dtype=np.int16)
            self.callback(outdata, block, None, types.SimpleNamespace(output_underflow=False))
            self.played.append(outdata[:, 0].copy())

    def start(self) -> None:
        self._thread.start()

    def abort(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        pass


def test_live_playback_plays_everything_before_exiting(
    daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = types.ModuleType("sounddevice")
    module.OutputStream = RealTimeSoundCard  # type: ignore[attr-defined]
    module.PortAudioError = OSError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sounddevice", module)
    RealTimeSoundCard.opened.clear()

    assert main(["Hello there.", "--url", daemon.url]) == 0

    (card,) = RealTimeSoundCard.opened
    assert card.settings == (24000, 1, "int16")
    played = np.concatenate(card.played)
    audible = np.flatnonzero(played)
    expected = len(daemon.pcm_sent[0]) + 480 - daemon.pre_skip  # one flush frame, pre_skip trimmed
    # drain() waited for the tail: playback ran from the first sample to (nearly) the last one.
    assert expected - 480 <= audible[-1] - audible[0] + 1 <= expected
    err = capsys.readouterr().err
    assert "underruns: 0" in err
    assert f"audio duration: {expected / 24000:.2f} s" in err


@only_without_audio_device
def test_no_audio_device_exits_3_and_suggests_out(
    daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["Hello.", "--url", daemon.url]) == 3
    err = capsys.readouterr().err
    assert "no usable audio output device" in err
    assert "--out FILE.wav" in err
    assert daemon.texts() == []  # failed before sending anything to synthesize


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["hi", "--speed", "3"],
        ["hi", "--codec", "mp3"],
        ["hi", "--sample-rate", "44100"],
        ["hi", "--bogus"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: speakd-say" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--out FILE.wav" in capsys.readouterr().out
