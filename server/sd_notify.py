"""systemd's service notifications (sd_notify): READY when warm, STOPPING on drain, watchdog pings.

The protocol is one datagram to the Unix socket named by $NOTIFY_SOCKET; with no such variable (not
under systemd, or `Type=` other than notify) every call is a no-op. Written here rather than pulled
in as a dependency: it is a dozen lines, and the maintained binding needs libsystemd headers to build.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(*states: str) -> bool:
    """Send `states` ("READY=1", "STATUS=…") to systemd; whether they were sent."""
    address = os.environ.get(NOTIFY_SOCKET_ENV)
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never wait: this runs on the event loop, and a receiver that falls behind would block it.
            sock.sendto("\n".join(states).encode(), socket.MSG_DONTWAIT, address)
    except BlockingIOError:
        logger.debug("systemd's notify socket is full; dropped %s", states)
        return False
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often systemd wants a WATCHDOG=1 (half its WatchdogSec), or None when it wants none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
