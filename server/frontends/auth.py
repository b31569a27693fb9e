"""Access tokens for every door: an aiohttp middleware, the token file, the Origin check, log redaction.

A client presents a token in one of two places:

* `Authorization: Bearer <token>` — HTTP requests and WebSockets opened by servers and scripts.
* the WebSocket subprotocol list `speakd.v1, speakd.auth.<token>` — browsers cannot set headers on a
  WebSocket, but they can offer subprotocols. The server answers `speakd.v1`, never the token entry,
  and the middleware removes the token entry from the request before the handler sees it.

Tokens in the query string (`?token=...`) are refused on purpose: URLs end up in access logs, proxy
logs, browser history and `Referer` headers, so a token there leaks to every system the URL passes.

The token file holds one token per line, or `sha256:<64 hex digits>`, the SHA-256 of a token's UTF-8
bytes (`printf %s "$TOKEN" | sha256sum`), so the file need not hold the secret itself. Only digests
are kept in memory, and a presented token is hashed and compared with every digest in constant time.

The Origin policy (`origin_allowed`) guards against cross-site WebSocket hijacking: browsers attach
the page's `Origin` to every WebSocket, and the same-origin policy does not protect WebSockets. A
request without `Origin` (curl, servers, the Python client) always passes; a request from a page
served by the daemon itself (Origin host:port equal to the `Host` header) always passes; any other
Origin must be in the allow-list, where `"*"` allows all. An empty allow-list thus means same-origin
only. The check also covers plain HTTP to non-public paths: the daemon sends no CORS headers, so no
legitimate cross-origin page needs it, and refusing them stops cross-site form posts from driving an
unauthenticated daemon on loopback.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from multidict import CIMultiDict

from speakd.server.errors import ConfigError

logger = logging.getLogger(__name__)

AUTH_SUBPROTOCOL_PREFIX: Final = "speakd.auth."
WS_SUBPROTOCOL: Final = "speakd.v1"
REALM: Final = "speakd"
DEFAULT_PUBLIC_PATHS: Final = frozenset({"/healthz", "/readyz"})

_SHA256_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# Plain tokens must travel unchanged in a Bearer header (RFC 6750 b64token) and in a subprotocol
# (RFC 7230 token), and must end where RedactSecrets expects them to end: the common subset.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+-]+")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@dataclass(frozen=True, slots=True, repr=False)
class AccessTokens:
    """The configured tokens as SHA-256 digests only; empty (falsy) means authentication is off."""

    digests: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if any(len(digest) != hashlib.sha256().digest_size for digest in self.digests):
            raise ValueError("AccessTokens holds SHA-256 digests of 32 bytes")

    @classmethod
    def from_file(cls, path: Path) -> AccessTokens:
        """Read a token file; an unreadable file or one without any token is a ConfigError, because
        the operator asked for authentication and silently serving without it would fail open."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {path}: {exc.strerror or exc}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: token file is not UTF-8") from None
        tokens = cls.from_lines(text.splitlines(), source=str(path))
        if not tokens:
            raise ConfigError(f"token file {path} holds no token (one per line, or sha256:<64 hex>)")
        _warn_if_world_readable(path, text)
        return tokens

    @classmethod
    def for_config(cls, token_file: str) -> AccessTokens:
        """The tokens auth.token_file names (`~` expanded); none when it is empty."""
        return cls.from_file(Path(token_file).expanduser()) if token_file else cls()

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<tokens>") -> AccessTokens:
        """Parse token lines; errors name the source and line number, never the line, which is a secret."""
        digests: dict[bytes, None] = {}
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line[: len(_SHA256_PREFIX)].lower() == _SHA256_PREFIX:
                hex_digest = line[len(_SHA256_PREFIX) :].strip()
                if not _HEX64.fullmatch(hex_digest):
                    raise ConfigError(
                        f"{source}:{number}: malformed sha256 line: expected 'sha256:' and 64 hex digits"
                    )
                digests[bytes.fromhex(hex_digest)] = None
            elif _TOKEN_CHARS.fullmatch(line):
                digests[_digest(line)] = None
            else:
                raise ConfigError(
                    f"{source}:{number}: a token may hold only letters, digits and . _ ~ + - "
                    "(or write the line as sha256:<64 hex digits>)"
                )
        return cls(tuple(digests))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def __len__(self) -> int:
        return len(self.digests)

    def __repr__(self) -> str:
        return f"AccessTokens(<{len(self.digests)} tokens>)"

    def check(self, token: str) -> bool:
        """Whether `token` is one of ours: compared as digests with every stored one, without early
        exit, so neither the timing nor the position of a match says anything about the tokens."""
        presented = _digest(token)
        match = False
        for digest in self.digests:
            match |= hmac.compare_digest(presented, digest)
        return match and bool(token)


def _digest(token: str) -> bytes:
    """SHA-256 of the token's UTF-8 bytes; surrogatepass so no presented string can make it raise."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _warn_if_world_readable(path: Path, text: str) -> None:
    """Plain tokens in a file others can read are shared secrets no longer; say so, without them."""
    if os.name != "posix":
        return
    plain = any(
        line.strip() and not line.strip().startswith("#") and not line.strip().lower().startswith("sha256:")
        for line in text.splitlines()
    )
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if plain and mode & stat.S_IROTH:
        logger.warning(
            "token file %s holds plain tokens and is readable by other users; chmod 600 it, "
            "or store the tokens as sha256:<hex> lines",
            path,
        )


# --- what the client presented ---------------------------------------------------------------------


class _Malformed(Exception):
    """The request carries credentials we cannot read; answered with 401 like a wrong token."""


def _split_header_list(values: Iterable[str]) -> list[str]:
    """A comma-separated header list, over every occurrence of the header, empty entries dropped."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def _is_auth_subprotocol(protocol: str) -> bool:
    return protocol[: len(AUTH_SUBPROTOCOL_PREFIX)].lower() == AUTH_SUBPROTOCOL_PREFIX


def _credentials(request: web.BaseRequest) -> str | None:
    """The presented token: the Bearer header first, else the subprotocol; raises _Malformed."""
    authorizations = request.headers.getall(hdrs.AUTHORIZATION, [])
    if len(authorizations) > 1:
        raise _Malformed("more than one Authorization header")
    if authorizations:
        scheme, _, token = authorizations[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
            raise _Malformed("Authorization header is not 'Bearer <token>'")
        return token
    offered = [
        protocol[len(AUTH_SUBPROTOCOL_PREFIX) :]
        for protocol in _split_header_list(request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, []))
        if _is_auth_subprotocol(protocol)
    ]
    if len(offered) > 1:
        raise _Malformed("more than one speakd.auth.* subprotocol")
    return offered[0] if offered else None


def presented_token(request: web.BaseRequest) -> str | None:
    """The token the client sent: `Authorization: Bearer` first, else a `speakd.auth.*` subprotocol.

    None when there is none or the credentials are malformed (the middleware tells those apart).
    """
    try:
        return _credentials(request)
    except _Malformed:
        return None


def offered_subprotocols(request: web.BaseRequest) -> list[str]:
    """The client's offered subprotocols without `speakd.auth.*`, so that negotiation, and any log
    line about it, never involves the token."""
    offered = _split_header_list(request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, []))
    return [protocol for protocol in offered if not _is_auth_subprotocol(protocol)]


def _without_auth_subprotocol(request: web.Request) -> web.Request:
    """The request as the handler should see it: the token entry dropped from Sec-WebSocket-Protocol,
    so aiohttp's negotiation (and its warning when nothing overlaps) never sees the token."""
    values = request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, [])
    if not any(_is_auth_subprotocol(p) for p in _split_header_list(values)):
        return request
    headers = CIMultiDict(request.headers)
    headers.popall(hdrs.SEC_WEBSOCKET_PROTOCOL)
    kept = offered_subprotocols(request)
    if kept:
        headers[hdrs.SEC_WEBSOCKET_PROTOCOL] = ", ".join(kept)
    try:
        return request.clone(headers=headers)
    except UnicodeEncodeError:
        # clone() re-encodes every header as UTF-8; undecodable bytes elsewhere leave the original in
        # place, and RedactSecrets still keeps the token out of aiohttp's log lines.
        return request


# --- Origin ----------------------------------------------------------------------------------------


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]` with scheme and host lowercased and the default port dropped; None for
    anything that is not such an origin (including the opaque origin `null`)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if not scheme or not host or parts.username is not None or parts.password is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _same_origin(origin: str, host_header: str) -> bool:
    """Whether the page's origin is this server as the browser addressed it (the `Host` header); a
    Host without a port means the default port of the origin's scheme (TLS may end at a proxy)."""
    scheme = origin.partition("://")[0]
    return normalize_origin(f"{scheme}://{host_header}") == origin


def origin_allowed(request: web.BaseRequest, allowed: Sequence[str]) -> bool:
    """The Origin policy of the module docstring: no Origin, same origin, `"*"`, or an exact match."""
    origins = request.headers.getall(hdrs.ORIGIN, [])
    if not origins:
        return True
    if len(origins) > 1:
        return False
    if "*" in allowed:
        return True
    origin = normalize_origin(origins[0])
    if origin is None:
        return False
    if any(normalize_origin(entry) == origin for entry in allowed):
        return True
    host = request.headers.get(hdrs.HOST)
    return host is not None and _same_origin(origin, host)


# --- the middleware --------------------------------------------------------------------------------


def _error(status: int, message: str, code: str) -> web.Response:
    """An OpenAI-shaped error body, so OpenAI client libraries show the message."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    headers = {hdrs.WWW_AUTHENTICATE: f'Bearer realm="{REALM}"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


def _is_websocket_upgrade(request: web.BaseRequest) -> bool:
    upgrade = _split_header_list(request.headers.getall(hdrs.UPGRADE, []))
    return any(token.lower() == "websocket" for token in upgrade)


def _is_public(request: web.Request, public_paths: frozenset[str]) -> bool:
    """Public only when the router matched a plain route at exactly that path: `request.path` is
    percent-decoded, so `/v1%2Fvoices` must not borrow `/v1/voices`'s exemption for another route."""
    if request.path not in public_paths:
        return False
    resource = request.match_info.route.resource
    return resource is not None and resource.canonical == request.path


def auth_middleware(
    tokens: AccessTokens, allowed_origins: Sequence[str], public_paths: frozenset[str]
) -> Middleware:
    """The middleware: Origin check first (403), then the token (401), both before any handler runs,
    so a refused WebSocket is answered with a plain HTTP status and never opens.

    With no tokens the Origin check still applies, so a loopback daemon without tokens is not open to
    every web page the user visits. Malformed allow-list entries are a ConfigError here, at startup.
    """
    allowed = tuple(allowed_origins)
    bad = [entry for entry in allowed if entry != "*" and normalize_origin(entry) is None]
    if bad:
        raise ConfigError(f"allowed origins must look like scheme://host[:port] or '*', got {bad!r}")

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        websocket = _is_websocket_upgrade(request)
        public = _is_public(request, public_paths)
        if (websocket or not public) and not origin_allowed(request, allowed):
            logger.info(
                "403 %s %s from %s: origin %r not allowed",
                request.method,
                request.path,
                request.remote,
                request.headers.get(hdrs.ORIGIN),
            )
            return _error(403, "Origin not allowed: add it to auth.allowed_origins.", "origin_not_allowed")
        if tokens and not public:
            try:
                token = _credentials(request)
            except _Malformed as exc:
                logger.info("401 %s %s from %s: %s", request.method, request.path, request.remote, exc)
                return _error(401, f"Malformed credentials: {exc}.", "invalid_api_key")
            if token is None:
                logger.info("401 %s %s from %s: no token", request.method, request.path, request.remote)
                return _error(
                    401,
                    "Missing access token: send 'Authorization: Bearer <token>' "
                    f"(browser WebSockets: the subprotocol '{AUTH_SUBPROTOCOL_PREFIX}<token>').",
                    "invalid_api_key",
                )
            if not tokens.check(token):
                logger.info("401 %s %s from %s: wrong token", request.method, request.path, request.remote)
                return _error(401, "Invalid access token.", "invalid_api_key")
        if websocket:
            request = _without_auth_subprotocol(request)
        return await handler(request)

    return authenticate


# --- logs ------------------------------------------------------------------------------------------

_REDACTED = "<redacted>"
_SECRET_PATTERNS: Final = (
    (re.compile(r"(speakd\.auth\.)(?!<redacted>)[^\s,'\"\\\[\](){}<>;]+", re.IGNORECASE), r"\1<redacted>"),
    (re.compile(r"\b(bearer\s+)(?!<redacted>)[^\s,'\"\\]+", re.IGNORECASE), r"\1<redacted>"),
    # Not an accepted way in (see the module docstring), but a client may still try it.
    (
        re.compile(r"([?&](?:access_token|api_key|apikey|key|token)=)[^&#\s'\"\\]+", re.IGNORECASE),
        r"\1<redacted>",
    ),
)
# Attributes every LogRecord has; anything else came in through `extra=` (aiohttp's access logger
# passes the request line and headers that way, for structured formatters).
_RECORD_ATTRIBUTES: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}
_TRACEBACKS = logging.Formatter()


def redact(text: str) -> str:
    """`text` with every `speakd.auth.<token>`, `Bearer <token>` and query token replaced."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    return value


class RedactSecrets(logging.Filter):
    """Rewrites a record so no token survives in its message, traceback, stack or extras.

    The message is formatted once and, when anything was redacted, stored back with no args: args can
    be lists or tuples (aiohttp's subprotocol warning), whose repr would bring the token back.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it itself, without our help
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[0] is not None:
            text = record.exc_text or _TRACEBACKS.formatException(record.exc_info)
            clean = redact(text)
            if clean != text:
                # Keep the clean text and drop the exception, or another formatter would render it again.
                record.exc_text, record.exc_info = clean, None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in list(vars(record).items()):
            if name not in _RECORD_ATTRIBUTES:
                setattr(record, name, _redact_value(value))
        return True


_AIOHTTP_LOGGERS: Final = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)


def _add_once(target: logging.Logger | logging.Handler) -> None:
    if not any(isinstance(existing, RedactSecrets) for existing in target.filters):
        target.addFilter(RedactSecrets())


def install_log_redaction() -> None:
    """Attach RedactSecrets to aiohttp's loggers, where records are born (a logger's filters do not
    see records of its children), and to the root logger's handlers, for everything else that
    propagates there. Idempotent; call it again after adding root handlers."""
    for name in _AIOHTTP_LOGGERS:
        _add_once(logging.getLogger(name))
    for handler in logging.getLogger().handlers:
        _add_once(handler)


# --- binding ---------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and `localhost`; everything else, including the wildcard
    addresses and other names (which may resolve anywhere), counts as reachable from outside."""
    name = host.strip().rstrip(".").lower()
    if name == "localhost":
        return True
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_bind(host: str, have_tokens: bool, allow_unauthenticated: bool) -> None:
    """Refuse to listen beyond loopback without a token, unless the operator opted out in so many words."""
    if have_tokens or is_loopback(host):
        return
    if allow_unauthenticated:
        logger.warning("listening on %s without access tokens: anyone who can reach it can use it", host)
        return
    raise ConfigError(
        f"refusing to listen on {host!r} without an access token: anyone who can reach that address "
        "could use the daemon. Add a token file (one token per line) with --token-file FILE or "
        "auth.token_file in the config, or serve without one on purpose with --allow-unauthenticated "
        "or auth.allow_unauthenticated = true."
    )
