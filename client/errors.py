"""The client's exception tree: callers catch `SpeakdClientError`, or one leaf to react to one failure."""

from speakd.protocol import ErrorCode


class SpeakdClientError(Exception):
    """Root of every failure the client reports on purpose, so one `except` covers them all."""


class ConnectFailed(SpeakdClientError):
    """The daemon could not be reached (most often it is simply not running, or still starting)."""

    def __init__(self, url: str, reason: str, hint: str) -> None:
        super().__init__(url, reason, hint)
        self.url = url
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return f"cannot connect to {self.url}: {self.reason}; {self.hint}"


class StreamError(SpeakdClientError):
    """The stream broke off or carried something this client cannot use (a protocol violation)."""


class ServerError(SpeakdClientError):
    """The server sent an `error` for our context or for the whole connection. `retry_after_ms` is
    the server's hint (`overloaded`): how long to wait before trying again; None without one."""

    def __init__(self, code: ErrorCode, message: str, retry_after_ms: int | None = None) -> None:
        # Passing every constructor argument to Exception keeps the error picklable.
        super().__init__(code, message, retry_after_ms)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        return f"server error {self.code.value}: {self.message}"


class NoAudioDevice(SpeakdClientError):
    """Live playback is impossible here (no PortAudio, no output device), but a file would still work."""
