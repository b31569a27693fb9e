"""Access tokens: the token file, constant-time checks, the bind guard, the Origin policy, and the
middleware in front of a real aiohttp server over HTTP and WebSocket, with aiohttp's own log lines."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from speakd.server.errors import ConfigError
from speakd.server.frontends.auth import (
    AUTH_SUBPROTOCOL_PREFIX,
    DEFAULT_PUBLIC_PATHS,
    AccessTokens,
    RedactSecrets,
    auth_middleware,
    check_bind,
    install_log_redaction,
    normalize_origin,
    offered_subprotocols,
    origin_allowed,
    presented_token,
    redact,
)

TOKEN = "s3cret-token_for.tests~1"
HASHED_TOKEN = "another-token"
HASHED_HEX = hashlib.sha256(HASHED_TOKEN.encode()).hexdigest()
ALLOWED_ORIGIN = "https://app.example"
PUBLIC = DEFAULT_PUBLIC_PATHS | {"/v1/voices"}


# --- the token file --------------------------------------------------------------------------------


def test_plain_and_hashed_lines_comments_and_blanks() -> None:
    tokens = AccessTokens.from_lines(
        ["# comment", "", f"  {TOKEN}  ", "   ", f"sha256:{HASHED_HEX.upper()}", "  # indented comment"]
    )
    assert tokens
    assert len(tokens) == 2
    assert tokens.check(TOKEN)
    assert tokens.check(HASHED_TOKEN)


def test_duplicates_count_once() -> None:
    assert (
        len(AccessTokens.from_lines([TOKEN, TOKEN, f"sha256:{hashlib.sha256(TOKEN.encode()).hexdigest()}"]))
        == 1
    )


def test_empty_is_falsy() -> None:
    assert not AccessTokens()
    assert not AccessTokens.from_lines(["# nothing", ""])
    assert not AccessTokens().check("")
    assert not AccessTokens().check(TOKEN)


def test_check_refuses_wrong_empty_and_the_digest_itself() -> None:
    tokens = AccessTokens.from_lines([TOKEN, f"sha256:{HASHED_HEX}"])
    assert not tokens.check("wrong")
    assert not tokens.check("")
    assert not tokens.check(TOKEN + " ")
    assert not tokens.check(HASHED_HEX)  # the stored digest is not the token
    assert not tokens.check("\ud800")  # a lone surrogate neither raises nor matches


def test_memory_holds_digests_only() -> None:
    tokens = AccessTokens.from_lines([TOKEN])
    assert tokens.digests == (hashlib.sha256(TOKEN.encode()).digest(),)
    assert TOKEN not in repr(tokens)
    with pytest.raises(AttributeError):
        tokens.digests = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    "line",
    ["sha256:abc", f"sha256:{HASHED_HEX}00", f"sha256:{'g' * 64}", "sha256:", f"SHA256: {HASHED_HEX[:-1]}"],
)
def test_malformed_sha256_names_the_line_number_but_not_the_line(line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AccessTokens.from_lines(["# header", TOKEN, line], source="tokens.txt")
    message = str(caught.value)
    assert "tokens.txt:3" in message
    secret_part = line.partition(":")[2].strip()
    assert not secret_part or secret_part not in message


@pytest.mark.parametrize("line", ["has space", "quote'd", "sha512:abcd", "a,b", "tab\tbed"])
def test_tokens_outside_the_safe_alphabet_are_refused_without_echo(line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AccessTokens.from_lines([line], source="t")
    assert "t:1" in str(caught.value)
    assert line not in str(caught.value)


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# speakd tokens\n{TOKEN}\nsha256:{HASHED_HEX}\n", encoding="utf-8")
    path.chmod(0o600)
    tokens = AccessTokens.from_file(path)
    assert len(tokens) == 2 and tokens.check(TOKEN) and tokens.check(HASHED_TOKEN)


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read token file"):
        AccessTokens.from_file(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no token"):
        AccessTokens.from_file(empty)
    bad = tmp_path / "bad"
    bad.write_text(f"{TOKEN}\nsha256:1234\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        AccessTokens.from_file(bad)
    assert f"{bad}:2" in str(caught.value) and "1234" not in str(caught.value)
    binary = tmp_path / "binary"
    binary.write_bytes(b"good\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r":2: token file is not UTF-8"):
        AccessTokens.from_file(binary)


# --- binding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LocalHost", "::ffff:127.0.0.1"]
)
def test_loopback_binds_without_a_token(host: str) -> None:
    check_bind(host, have_tokens=False, allow_unauthenticated=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "speakd.example", "localhost.example"])
def test_exposed_binds_need_a_token_or_an_explicit_opt_out(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_bind(host, have_tokens=False, allow_unauthenticated=False)
    message = str(caught.value)
    for hint in (
        "--token-file",
        "auth.token_file",
        "--allow-unauthenticated",
        "auth.allow_unauthenticated = true",
    ):
        assert hint in message
    check_bind(host, have_tokens=True, allow_unauthenticated=False)
    check_bind(host, have_tokens=False, allow_unauthenticated=True)


# --- presented credentials and the Origin policy ---------------------------------------------------


def _request(headers: dict[str, str], path: str = "/v1/stream") -> web.Request:
    return make_mocked_request("GET", path, headers=headers)


def test_presented_token_prefers_the_header() -> None:
    assert presented_token(_request({})) is None
    assert presented_token(_request({"Authorization": f"bearer {TOKEN}"})) == TOKEN
    assert presented_token(_request({"Authorization": f"Bearer   {TOKEN}  "})) == TOKEN
    both = {"Authorization": "Bearer header", "Sec-WebSocket-Protocol": "speakd.v1, speakd.auth.proto"}
    assert presented_token(_request(both)) == "header"
    assert presented_token(_request({"Sec-WebSocket-Protocol": "speakd.v1, speakd.auth.proto"})) == "proto"
    assert presented_token(_request({"Authorization": "Basic dXNlcjpwYXNz"})) is None


def test_offered_subprotocols_drop_the_token() -> None:
    request = _request({"Sec-WebSocket-Protocol": f"speakd.v1, {AUTH_SUBPROTOCOL_PREFIX}{TOKEN}, other"})
    assert offered_subprotocols(request) == ["speakd.v1", "other"]
    assert offered_subprotocols(_request({})) == []


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("https://App.Example", "https://app.example"),
        ("https://app.example:443", "https://app.example"),
        ("http://app.example:80/", "http://app.example"),
        ("http://app.example:8080", "http://app.example:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("null", None),
        ("https://app.example/path", None),
        ("https://user@app.example", None),
        ("https://app.example:99999", None),
        ("app.example", None),
    ],
)
def test_normalize_origin(value: str, normalized: str | None) -> None:
    assert normalize_origin(value) == normalized


def test_origin_policy() -> None:
    def allowed(origin: str | None, allow: list[str], host: str = "127.0.0.1:8765") -> bool:
        headers = {"Host": host} | ({"Origin": origin} if origin is not None else {})
        return origin_allowed(_request(headers), allow)

    assert allowed(None, [])  # not a browser
    assert allowed("http://127.0.0.1:8765", [])  # a page the daemon serves itself
    assert allowed("https://speakd.example", [], host="speakd.example")  # TLS ended at a proxy
    assert not allowed("https://evil.example", [])
    assert not allowed("http://127.0.0.1:9999", [])
    assert allowed("https://APP.example:443", [ALLOWED_ORIGIN])
    assert not allowed("http://app.example", [ALLOWED_ORIGIN])  # scheme is part of the origin
    assert not allowed("https://app.example.evil", [ALLOWED_ORIGIN])
    assert not allowed("null", [ALLOWED_ORIGIN])
    assert allowed("https://evil.example", ["*"])


def test_bad_allow_list_entries_fail_at_startup() -> None:
    with pytest.raises(ConfigError, match="allowed origins"):
        auth_middleware(AccessTokens(), ["app.example"], PUBLIC)


# --- log redaction ---------------------------------------------------------------------------------


def test_redact() -> None:
    assert redact("['speakd.v1', 'speakd.auth.abc-1']") == "['speakd.v1', 'speakd.auth.<redacted>']"
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer <redacted>"
    assert redact("b'Authorization: bearer abc\\r\\n'") == "b'Authorization: bearer <redacted>\\r\\n'"
    assert (
        redact('"GET /v1/stream?token=abc&x=1 HTTP/1.1"') == '"GET /v1/stream?token=<redacted>&x=1 HTTP/1.1"'
    )
    once = redact("speakd.auth.x, Bearer y")
    assert redact(once) == once


def test_filter_rewrites_message_args_traceback_and_extras() -> None:
    record = logging.LogRecord(
        "t", logging.WARNING, __file__, 1, "%s offered %r", ("peer", ["speakd.auth.abc"]), None
    )
    try:
        raise ValueError("Bearer abc")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    record.request_header = {"Authorization": "Bearer abc"}
    assert RedactSecrets().filter(record)
    assert "abc" not in record.getMessage()
    assert record.exc_info is None and record.exc_text and "abc" not in record.exc_text
    assert record.request_header == {"Authorization": "Bearer <redacted>"}
    assert "abc" not in logging.Formatter().format(record)


def test_install_log_redaction_is_idempotent() -> None:
    install_log_redaction()
    install_log_redaction()
    for name in ("aiohttp.websocket", "aiohttp.server", "aiohttp.access"):
        filters = logging.getLogger(name).filters
        assert sum(isinstance(f, RedactSecrets) for f in filters) == 1
    for handler in logging.getLogger().handlers:
        assert sum(isinstance(f, RedactSecrets) for f in handler.filters) == 1


# --- a real server ---------------------------------------------------------------------------------


async def _hello(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _stream(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("speakd.v1",))
    await ws.prepare(request)
    # What the handler sees: the token entry is gone before aiohttp negotiates.
    await ws.send_json({"offered": request.headers.get("Sec-WebSocket-Protocol")})
    await ws.close()
    return ws


def _app(tokens: AccessTokens, origins: list[str] | None = None) -> web.Application:
    app = web.Application(middlewares=[auth_middleware(tokens, origins or [ALLOWED_ORIGIN], PUBLIC)])
    app.router.add_get("/healthz", _hello)
    app.router.add_get("/v1/voices", _hello)
    app.router.add_get("/v1/{name}", _hello)
    app.router.add_post("/v1/audio/speech", _hello)
    app.router.add_get("/v1/stream", _stream)
    return app


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(
        TestServer(_app(AccessTokens.from_lines([TOKEN, f"sha256:{HASHED_HEX}"])))
    ) as test_client:
        yield test_client


async def _assert_refusal(response: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert response.status == status
    body = await response.json()
    error = body["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] == code
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="speakd"'
    message: str = error["message"]
    return message


async def test_http_without_a_token_is_refused(client: TestClient[web.Request, web.Application]) -> None:
    message = await _assert_refusal(await client.post("/v1/audio/speech", json={}), 401, "invalid_api_key")
    assert "Missing" in message


async def test_http_with_a_wrong_token_is_refused(client: TestClient[web.Request, web.Application]) -> None:
    response = await client.post("/v1/audio/speech", headers={"Authorization": "Bearer nope"})
    message = await _assert_refusal(response, 401, "invalid_api_key")
    assert "Invalid" in message and "nope" not in message


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", TOKEN])
async def test_malformed_authorization_is_refused(
    client: TestClient[web.Request, web.Application], header: str
) -> None:
    response = await client.get("/v1/models", headers={"Authorization": header})
    message = await _assert_refusal(response, 401, "invalid_api_key")
    assert "Malformed" in message and TOKEN not in message


@pytest.mark.parametrize("token", [TOKEN, HASHED_TOKEN])
async def test_http_with_the_right_token(
    client: TestClient[web.Request, web.Application], token: str
) -> None:
    response = await client.post("/v1/audio/speech", headers={"Authorization": f"BEARER {token}"})
    assert response.status == 200


async def test_public_paths_need_no_token(client: TestClient[web.Request, web.Application]) -> None:
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/v1/voices")).status == 200
    # Percent-decoding must not let another route borrow a public path's exemption.
    assert (await client.get("/v1%2Fvoices")).status == 401
    assert (await client.get("/v1/models")).status == 401


async def test_websocket_with_the_header(client: TestClient[web.Request, web.Application]) -> None:
    async with client.ws_connect(
        "/v1/stream", protocols=("speakd.v1",), headers={"Authorization": f"Bearer {TOKEN}"}
    ) as ws:
        assert ws.protocol == "speakd.v1"
        assert await ws.receive_json() == {"offered": "speakd.v1"}


async def test_websocket_with_the_subprotocol(client: TestClient[web.Request, web.Application]) -> None:
    async with client.ws_connect(
        "/v1/stream", protocols=("speakd.v1", f"{AUTH_SUBPROTOCOL_PREFIX}{TOKEN}"), origin=ALLOWED_ORIGIN
    ) as ws:
        assert ws.protocol == "speakd.v1"
        assert await ws.receive_json() == {"offered": "speakd.v1"}


@pytest.mark.parametrize(
    "protocols",
    [("speakd.v1", f"{AUTH_SUBPROTOCOL_PREFIX}wrong"), ("speakd.v1",), (f"{AUTH_SUBPROTOCOL_PREFIX}",)],
)
async def test_websocket_with_a_wrong_or_no_token_never_opens(
    client: TestClient[web.Request, web.Application], protocols: tuple[str, ...]
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect("/v1/stream", protocols=protocols)
    assert caught.value.status == 401


async def test_disallowed_origin_is_forbidden(client: TestClient[web.Request, web.Application]) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(
            "/v1/stream",
            protocols=("speakd.v1", f"{AUTH_SUBPROTOCOL_PREFIX}{TOKEN}"),
            origin="https://evil.example",
        )
    assert caught.value.status == 403
    response = await client.post(
        "/v1/audio/speech", headers={"Authorization": f"Bearer {TOKEN}", "Origin": "https://evil.example"}
    )
    await _assert_refusal(response, 403, "origin_not_allowed")
    # Public HTTP paths answer any page; a WebSocket upgrade on them is still checked.
    assert (await client.get("/healthz", headers={"Origin": "https://evil.example"})).status == 200


async def test_without_tokens_only_the_origin_is_checked() -> None:
    async with TestClient(TestServer(_app(AccessTokens()))) as test_client:
        assert (await test_client.post("/v1/audio/speech")).status == 200
        async with test_client.ws_connect("/v1/stream", protocols=("speakd.v1",)) as ws:
            assert ws.protocol == "speakd.v1"
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await test_client.ws_connect("/v1/stream", origin="https://evil.example")
        assert caught.value.status == 403


async def test_aiohttp_never_logs_the_token(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp warns with the offered list when no subprotocol overlaps; the token must not be in it.

    A bare handler without the middleware, so aiohttp's own negotiation sees the token entry and the
    redaction filter alone has to keep it out.
    """
    install_log_redaction()
    app = web.Application()
    app.router.add_get("/v1/stream", _stream)
    caplog.set_level(logging.DEBUG)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        async with session.ws_connect(server.make_url("/v1/stream"), protocols=["speakd.auth.secret"]) as ws:
            assert ws.protocol is None
            await ws.receive()
        response = await session.get(
            server.make_url("/v1/stream?token=secret"), headers={"Authorization": "Bearer secret"}
        )
        assert response.status == 400
    warnings = [r for r in caplog.records if r.name == "aiohttp.websocket"]
    assert warnings, "aiohttp's subprotocol warning was not emitted; the test no longer covers it"
    assert any("speakd.auth.<redacted>" in r.getMessage() for r in warnings)
    for record in caplog.records:
        assert "secret" not in record.getMessage()
    assert "secret" not in caplog.text


async def test_parser_errors_never_log_the_token(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp's "Error handling request" traceback quotes the offending header line verbatim."""
    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    async with TestServer(web.Application()) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\x01\r\n"
            b"Sec-WebSocket-Protocol: speakd.v1, speakd.auth.secret\x01\r\n\r\n"
        )
        await writer.drain()
        assert (await reader.read(64)).startswith(b"HTTP/1.0 400")
        writer.close()
        await writer.wait_closed()
    assert any(r.name == "aiohttp.server" for r in caplog.records)
    assert "secret" not in caplog.text
