"""Typed field access on an untrusted decoded map, turning every surprise into a precise `ProtocolError`.

Wrong types are `bad_message` (the sender is broken); well-typed values outside what v1 allows are
`invalid_param` (the sender asked for something unsupported). Keys nobody asks for are ignored, so
newer peers may add fields without breaking older ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from enum import Enum, StrEnum
from typing import TypeGuard, TypeVar

from .errors import ErrorCode, ProtocolError
from .messages import DEFAULT_CONTEXT, MAX_CONTEXT_ID_LENGTH

E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


class Required(Enum):
    """Sentinel default marking a field that must be present (None is a legitimate default)."""

    FIELD = "required"


REQUIRED = Required.FIELD


def is_context_id(value: object) -> TypeGuard[str]:
    """Whether `value` may name a context: a non-empty string of bounded length."""
    return isinstance(value, str) and 0 < len(value) <= MAX_CONTEXT_ID_LENGTH


def _type_name(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def _allowed(values: Iterable[object]) -> str:
    return ", ".join(str(v) for v in values)


class Fields:
    """The fields of one decoded message of type `kind`, whose errors are addressed to `address`."""

    def __init__(self, raw: Mapping[str, object], kind: str, address: str | None) -> None:
        self._raw = raw
        self.kind = kind
        self.address = address

    def _bad(self, name: str, expected: str, value: object) -> ProtocolError:
        return ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{self.kind}.{name} must be {expected}, got {_type_name(value)}",
            self.address,
        )

    def _invalid(self, name: str, detail: str) -> ProtocolError:
        return ProtocolError(ErrorCode.INVALID_PARAM, f"{self.kind}.{name} {detail}", self.address)

    def _missing(self, name: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{self.kind} is missing required field {name!r}", self.address
        )

    def context(self) -> str:
        """The context id; an absent key means the default context."""
        value = self._raw.get("context", DEFAULT_CONTEXT)
        if is_context_id(value):
            return value
        got = f"{len(value)} chars" if isinstance(value, str) else _type_name(value)
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{self.kind}.context must be a string of 1 to {MAX_CONTEXT_ID_LENGTH} chars, got {got}",
            self.address,
        )

    def optional_context(self) -> str | None:
        """Like `context`, but nil is allowed (and is the default) for messages about no context."""
        if self._raw.get("context") is None:
            return None
        return self.context()

    def string(self, name: str, default: str | Required = REQUIRED, *, non_empty: bool = False) -> str:
        """A str (never bin: text and binary data must not be confused)."""
        value = self._raw.get(name, default)
        if value is REQUIRED:
            raise self._missing(name)
        if not isinstance(value, str):
            raise self._bad(name, "a string", value)
        if non_empty and not value:
            raise self._invalid(name, "must be a non-empty string")
        return value

    def optional_string(self, name: str) -> str | None:
        """A string that may be nil or absent (both meaning None)."""
        value = self._raw.get(name)
        if value is None:
            return None
        return self.string(name)

    def integer(
        self,
        name: str,
        default: int | Required = REQUIRED,
        *,
        minimum: int = 0,
        allowed: tuple[int, ...] | None = None,
    ) -> int:
        """An int at least `minimum`, and in `allowed` when given."""
        value = self._raw.get(name, default)
        if value is REQUIRED:
            raise self._missing(name)
        # bool is an int subclass in Python but never a valid integer field on the wire.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(name, "an integer", value)
        if allowed is not None and value not in allowed:
            raise self._invalid(name, f"must be one of {_allowed(allowed)}, got {value}")
        if value < minimum:
            raise self._invalid(name, f"must be at least {minimum}, got {value}")
        return value

    def optional_integer(self, name: str, *, minimum: int = 0) -> int | None:
        """An int at least `minimum` that may be nil or absent (both meaning None)."""
        if self._raw.get(name) is None:
            return None
        return self.integer(name, minimum=minimum)

    def number(
        self,
        name: str,
        default: float | Required = REQUIRED,
        *,
        minimum: float = 0.0,
        maximum: float = math.inf,
    ) -> float:
        """A finite float within [minimum, maximum]; integers are accepted and converted."""
        value = self._raw.get(name, default)
        if value is REQUIRED:
            raise self._missing(name)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(name, "a number", value)
        number = float(value)
        if not (math.isfinite(number) and minimum <= number <= maximum):
            bounds = f"at least {minimum}" if maximum == math.inf else f"between {minimum} and {maximum}"
            raise self._invalid(name, f"must be {bounds}, got {value}")
        return number

    def boolean(self, name: str, default: bool | Required = REQUIRED) -> bool:
        """A msgpack bool; 0 and 1 are not booleans on the wire."""
        value = self._raw.get(name, default)
        if value is REQUIRED:
            raise self._missing(name)
        if not isinstance(value, bool):
            raise self._bad(name, "a boolean", value)
        return value

    def records(self, name: str, build: Callable[[Fields], T]) -> list[T]:
        """An array of maps, each checked by `build`; errors name the item (`words[3].start_ms`)."""
        value = self._raw.get(name, REQUIRED)
        if value is REQUIRED:
            raise self._missing(name)
        if not isinstance(value, list):
            raise self._bad(name, "an array", value)
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict) or not all(isinstance(key, str) for key in item):
                raise self._bad(f"{name}[{i}]", "a map with string keys", item)
            out.append(build(Fields(item, f"{self.kind}.{name}[{i}]", self.address)))
        return out

    def binary(self, name: str) -> bytes:
        """A msgpack bin; a str is refused so audio never passes through a text codec."""
        value = self._raw.get(name, REQUIRED)
        if value is REQUIRED:
            raise self._missing(name)
        if not isinstance(value, bytes):
            raise self._bad(name, "binary (msgpack bin)", value)
        return value

    def choice(self, name: str, enum: type[E], default: E | Required = REQUIRED) -> E:
        """A string that must be one of `enum`'s values."""
        value = self.string(name, default)
        try:
            return enum(value)
        except ValueError:
            raise self._invalid(name, f"must be one of {_allowed(enum)}, got {value!r}") from None
