"""Whether this machine can play sound: the no-device tests only mean something where it cannot."""

from __future__ import annotations

import pytest


def has_output_device() -> bool:
    try:
        import sounddevice

        sounddevice.query_devices(kind="output")
    except Exception:
        return False
    return True


only_without_audio_device = pytest.mark.skipif(
    has_output_device(), reason="this machine has an audio output device; the no-device path is moot"
)
