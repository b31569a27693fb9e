"""Announcing the Wyoming door over mDNS (`_wyoming._tcp.local.`), so Home Assistant discovers it.

Home Assistant's Wyoming integration browses for that service type and offers what it finds. The
announcement carries an address Home Assistant can connect to, never 0.0.0.0: the listen address when
it is a specific one, else the address this host sends multicast from (the one a peer on the local
network sees). It is withdrawn (mDNS goodbye) when the daemon stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket

from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

logger = logging.getLogger(__name__)

SERVICE_TYPE = "_wyoming._tcp.local."
MDNS_GROUP = "224.0.0.251"


def announced_address(listen_host: str) -> str:
    """The IPv4 address to announce for a door listening on `listen_host`."""
    if listen_host not in ("", "0.0.0.0", "::"):
        return listen_host
    # Connecting a UDP socket sends nothing; it only picks the interface multicast would leave by.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((MDNS_GROUP, 5353))
        address: str = probe.getsockname()[0]
    return address


def zeroconf_name(configured: str) -> str:
    """The service instance name: as configured, else "speakd on <host name>"."""
    return configured or f"speakd on {socket.gethostname()}"[:63]


class Announcement:
    """One registered `_wyoming._tcp` service; `close` withdraws it."""

    def __init__(self, name: str, address: str, port: int) -> None:
        if ipaddress.ip_address(address).version != 4:
            raise ValueError(f"zeroconf announces IPv4 addresses; {address} is not one")
        self.name = name
        self.address = address
        self.port = port
        self._zeroconf = AsyncZeroconf()
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address)],
            port=port,
            properties={"program": "speakd"},
        )

    async def register(self) -> None:
        await self._zeroconf.async_register_service(self._info)
        logger.info("wyoming: announced as %r at %s:%d (zeroconf)", self.name, self.address, self.port)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # a network gone at shutdown must not stop the stop
            await self._zeroconf.async_unregister_service(self._info)
        await self._zeroconf.async_close()
