"""The speakd sample client: a streaming connection, an audio decoder, live playback, and `speakd-say`."""

from .connection import DEFAULT_URL, Connection, ContextMessage
from .decoder import AudioDecoder
from .errors import ConnectFailed, NoAudioDevice, ServerError, SpeakdClientError, StreamError
from .jitter import JitterBuffer
from .player import Player
from .speak import AudioSink, SpeechReport, speak
from .wav import WavWriter

__all__ = [
    "DEFAULT_URL",
    "AudioDecoder",
    "AudioSink",
    "ConnectFailed",
    "Connection",
    "ContextMessage",
    "JitterBuffer",
    "NoAudioDevice",
    "Player",
    "ServerError",
    "SpeakdClientError",
    "SpeechReport",
    "StreamError",
    "WavWriter",
    "speak",
]
