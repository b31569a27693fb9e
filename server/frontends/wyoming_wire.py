"""Reading Wyoming events with bounds: a header line, then `data_length` bytes of JSON, then a payload.

The `wyoming` package's own reader trusts the lengths a peer announces (a header saying 4 GB gets a
4 GB read) and turns a malformed header into end-of-stream, so the server could not tell a peer that
left from one that sent garbage. This reader checks every length against the door's limits before it
reads, and raises `WyomingWireError` with a message fit for an `error` event. Events themselves are
the package's `Event`, and writing stays the package's `async_write_event`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wyoming.event import Event

from speakd.protocol import ErrorCode

MAX_HEADER_BYTES = 8192
"""A header line is a small JSON object: type, lengths, version."""


class WyomingWireError(Exception):
    """The peer sent something that is not a Wyoming event within limits; the connection ends."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> None:
        super().__init__(message)
        self.code = code


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WyomingWireError(f"{key} must be a non-negative integer")
    if value > limit:
        raise WyomingWireError(
            f"{key} {value} is over this server's limit of {limit} bytes", ErrorCode.MESSAGE_TOO_LARGE
        )
    return value


async def read_event(
    reader: asyncio.StreamReader, max_data_bytes: int, max_payload_bytes: int
) -> Event | None:
    """The next event, or None when the peer closed the connection between events. The reader must
    have been made with a limit of at least MAX_HEADER_BYTES."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise WyomingWireError("the connection ended inside an event header") from exc
    except asyncio.LimitOverrunError as exc:
        raise WyomingWireError(
            f"an event header is longer than {MAX_HEADER_BYTES} bytes", ErrorCode.MESSAGE_TOO_LARGE
        ) from exc
    if len(line) > MAX_HEADER_BYTES:
        raise WyomingWireError(
            f"an event header is longer than {MAX_HEADER_BYTES} bytes", ErrorCode.MESSAGE_TOO_LARGE
        )
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WyomingWireError("an event header is not a JSON object") from exc
    if not isinstance(header, dict):
        raise WyomingWireError("an event header is not a JSON object")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise WyomingWireError("an event header has no type")
    inline = header.get("data")
    if inline is not None and not isinstance(inline, dict):
        raise WyomingWireError("an event's data must be a JSON object")
    data: dict[str, Any] = dict(inline or {})
    data_length = _length(header, "data_length", max_data_bytes)
    payload_length = _length(header, "payload_length", max_payload_bytes)
    try:
        if data_length:
            block = json.loads(await reader.readexactly(data_length))
            if not isinstance(block, dict):
                raise WyomingWireError("an event's data must be a JSON object")
            data.update(block)
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError as exc:
        raise WyomingWireError("the connection ended inside an event") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WyomingWireError("an event's data is not JSON") from exc
    return Event(type=kind, data=data, payload=payload)
