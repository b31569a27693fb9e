"""The sounddevice glue: samples reach the callback, drain and close behave, missing devices are explained."""

import asyncio
import sys
import threading
import types
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from typing import Any

import numpy as np
import pytest
from devices import only_without_audio_device

from speakd.client import NoAudioDevice, Player

RATE = 1000


class FakePortAudioError(Exception):
    pass


class FakeStream:
    """Stands in for sounddevice.OutputStream; the test plays the sound card by calling `pull`."""

    instances: list["FakeStream"] = []  # noqa: RUF012 - a registry the tests inspect
    latency = 0.0

    def __init__(self, *, samplerate: int, channels: int, dtype: str, callback: Any) -> None:
        self.settings = (samplerate, channels, dtype)
        self.callback = callback
        self.state = "created"
        FakeStream.instances.append(self)

    def start(self) -> None:
        self.state = "started"

    def abort(self) -> None:
        self.state = "aborted"

    def close(self, ignore_errors: bool = False) -> None:
        self.state = "closed"

    def pull(self, frames: int) -> Any:
        outdata = np.full((frames, 1), -7, dtype=np.int16)  # garbage the callback must overwrite
        self.callback(outdata, frames, None, types.SimpleNamespace(output_underflow=False))
        return outdata[:, 0].copy()


@pytest.fixture
def fake_sounddevice(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    module = types.ModuleType("sounddevice")
    module.OutputStream = FakeStream  # type: ignore[attr-defined]
    module.PortAudioError = FakePortAudioError  # type: ignore[attr-defined]
    FakeStream.instances.clear()
    monkeypatch.setitem(sys.modules, "sounddevice", module)
    yield module


async def test_written_audio_reaches_the_callback_and_drain_waits_for_it(
    fake_sounddevice: types.ModuleType,
) -> None:
    player = Player(RATE, prebuffer_ms=20)
    (stream,) = FakeStream.instances
    assert stream.settings == (RATE, 1, "int16")
    assert stream.state == "started"

    played: list[Any] = []
    stop = threading.Event()

    def sound_card() -> None:
        while not stop.is_set():
            played.append(stream.pull(16))
            stop.wait(0.001)

    card = threading.Thread(target=sound_card)
    card.start()
    try:
        sent = np.arange(1, 301, dtype=np.int16)
        await player.write(sent)
        await asyncio.wait_for(player.drain(), 5.0)
    finally:
        stop.set()
        card.join()
    audio = np.concatenate(played)
    np.testing.assert_array_equal(audio[audio != 0], sent)
    assert player.underruns == 0

    player.close()
    player.close()
    assert stream.state == "closed"


def test_a_device_that_cannot_be_opened_is_no_audio_device(
    fake_sounddevice: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**kwargs: Any) -> None:
        raise FakePortAudioError("Error querying device -1")

    monkeypatch.setattr(fake_sounddevice, "OutputStream", refuse)
    with pytest.raises(NoAudioDevice, match=r"Error querying device -1.*--out FILE\.wav") as info:
        Player(RATE)
    assert isinstance(info.value.__cause__, FakePortAudioError)


class _PortAudioMissing:
    """An import hook that fails the way `import sounddevice` does when libportaudio is absent."""

    def find_spec(self, name: str, path: object, target: object = None) -> ModuleSpec | None:
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return None


def test_missing_portaudio_is_no_audio_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_PortAudioMissing(), *sys.meta_path])
    with pytest.raises(NoAudioDevice, match=r"PortAudio library not found.*--out FILE\.wav"):
        Player(RATE)


@only_without_audio_device
def test_the_real_sounddevice_without_a_device_is_no_audio_device() -> None:
    with pytest.raises(NoAudioDevice, match=r"--out FILE\.wav"):
        Player(24000)
