"""Refusals the core gives a door: each carries a protocol error code the door maps to its convention."""

from __future__ import annotations

from speakd.protocol import ErrorCode
from speakd.server.errors import SpeakdError


class RequestRefused(SpeakdError):
    """A request the core will not carry out (bad voice, too much text, too many utterances, ...)."""

    def __init__(
        self, code: ErrorCode, message: str, context: str | None = None, *, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.context = context
        self.retry_after_s = retry_after_s  # for refusals that a later retry may not get (overloaded)


class Busy(SpeakdError):
    """The daemon is at its session limit or stopping: the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
