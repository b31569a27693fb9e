"""Error vocabulary shared by both ends: the codes on the wire and the exception that carries them."""

from enum import StrEnum


class ErrorCode(StrEnum):
    """Machine-readable reason in an `error` message; clients branch on this, never on the text."""

    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_CONTEXT = "unknown_context"
    DUPLICATE_CONTEXT = "duplicate_context"
    INVALID_PARAM = "invalid_param"
    UNKNOWN_VOICE = "unknown_voice"
    TEXT_TOO_LONG = "text_too_long"
    TOO_MANY_CONTEXTS = "too_many_contexts"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"
    MESSAGE_TOO_LARGE = "message_too_large"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTTING_DOWN = "shutting_down"


class ProtocolError(Exception):
    """A request the peer got wrong, with everything needed to answer it as an `error` message.

    `context` is the context id the offending frame named, when it could be read, so the
    server can address the reply; it is None when the frame was too broken to tell.
    """

    def __init__(self, code: ErrorCode, message: str, context: str | None = None) -> None:
        # Passing every constructor argument to Exception keeps the error picklable.
        super().__init__(code, message, context)
        self.code = code
        self.message = message
        self.context = context

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


TEXT_FRAME_MESSAGE = "text frames are not accepted; send msgpack in binary frames"


def text_frame_error() -> ProtocolError:
    """The error for a WebSocket text frame, worded once so server and clients agree."""
    return ProtocolError(ErrorCode.BAD_MESSAGE, TEXT_FRAME_MESSAGE)
