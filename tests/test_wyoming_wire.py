"""Reading Wyoming events within limits, and the Wyoming settings."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from speakd.protocol import ErrorCode
from speakd.server.config import load_config, parse_listen
from speakd.server.errors import ConfigError
from speakd.server.frontends.wyoming_door import bcp47
from speakd.server.frontends.wyoming_wire import MAX_HEADER_BYTES, WyomingWireError, read_event
from speakd.server.frontends.wyoming_zeroconf import announced_address


def stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES)
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_events_with_inline_data_a_data_block_a_payload_or_nothing() -> None:
    block = json.dumps({"text": "hello"}).encode()
    reader = stream(
        b'{"type": "describe"}\n'
        + b'{"type": "synthesize", "data": {"voice": {"name": "x"}}, "data_length": %d}\n' % len(block)
        + block
        + b'{"type": "audio-chunk", "data": {"rate": 24000}, "payload_length": 4}\n\x01\x02\x03\x04'
    )
    first, second, third = [await read_event(reader, 1024, 1024) for _ in range(3)]
    assert first is not None and (first.type, first.data, first.payload) == ("describe", {}, None)
    assert second is not None and second.data == {"voice": {"name": "x"}, "text": "hello"}
    assert third is not None and third.payload == b"\x01\x02\x03\x04"
    assert await read_event(reader, 1024, 1024) is None  # the peer left between events


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not json\n", ErrorCode.BAD_MESSAGE),
        (b"[1, 2]\n", ErrorCode.BAD_MESSAGE),
        (b'{"data": {}}\n', ErrorCode.BAD_MESSAGE),
        (b'{"type": ""}\n', ErrorCode.BAD_MESSAGE),
        (b'{"type": "x", "data": [1]}\n', ErrorCode.BAD_MESSAGE),
        (b'{"type": "x", "data_length": -1}\n', ErrorCode.BAD_MESSAGE),
        (b'{"type": "x", "data_length": "12"}\n', ErrorCode.BAD_MESSAGE),
        (b'{"type": "x", "data_length": 2}\n[]', ErrorCode.BAD_MESSAGE),
        (b'{"type": "x", "data_length": 4}\n{"a', ErrorCode.BAD_MESSAGE),
        (b'{"type": "x", "data_length": 5000}\n', ErrorCode.MESSAGE_TOO_LARGE),
        (b'{"type": "x", "payload_length": 5000}\n', ErrorCode.MESSAGE_TOO_LARGE),
        (b'{"type": "x"' + b" " * MAX_HEADER_BYTES + b"}\n", ErrorCode.MESSAGE_TOO_LARGE),
        (b'{"type": "describe"', ErrorCode.BAD_MESSAGE),  # cut off inside the header
    ],
)
async def test_what_is_not_an_event_within_limits_is_refused(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(WyomingWireError) as caught:
        await read_event(stream(data), 1024, 1024)
    assert caught.value.code is code


def test_listen_addresses() -> None:
    assert parse_listen("10200") == ("127.0.0.1", 10200)
    assert parse_listen("0.0.0.0:10200") == ("0.0.0.0", 10200)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("", "host:", ":80", "port", "1:99999"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_a_remote_wyoming_address_needs_allow_remote() -> None:
    assert load_config(overrides={"wyoming.listen": "localhost:10200"}).wyoming.listen == "localhost:10200"
    with pytest.raises(ConfigError, match="allow_remote"):
        load_config(overrides={"wyoming.listen": "0.0.0.0:10200"})
    config = load_config(overrides={"wyoming.listen": "0.0.0.0:10200", "wyoming.allow_remote": True})
    assert config.wyoming.allow_remote
    with pytest.raises(ConfigError, match="HOST"):
        load_config(overrides={"wyoming.listen": "ten-two-hundred"})


def test_zeroconf_needs_an_address_the_network_reaches() -> None:
    for listen in ("", "10200", "127.0.0.1:10200"):
        with pytest.raises(ConfigError, match="zeroconf"):
            load_config(overrides={"wyoming.listen": listen, "wyoming.zeroconf": True})
    remote = {"wyoming.listen": "0.0.0.0:10200", "wyoming.allow_remote": True, "wyoming.zeroconf": True}
    assert load_config(overrides=remote).wyoming.zeroconf


def test_the_announced_address_is_never_the_wildcard() -> None:
    assert announced_address("192.0.2.7") == "192.0.2.7"
    for wildcard in ("0.0.0.0", "::"):
        address = announced_address(wildcard)
        assert address != "0.0.0.0" and ipaddress.ip_address(address).version == 4


def test_languages_as_home_assistant_names_them() -> None:
    assert bcp47("en-us") == "en-US" and bcp47("en-gb") == "en-GB" and bcp47("ja") == "ja"
