"""The systemd notify protocol (``sd_notify(3)``), standard library only, for ``Type=notify``.

systemd passes the service a datagram socket in ``$NOTIFY_SOCKET`` (a path, or an abstract
socket name written with a leading ``@``); the service sends newline-separated ``KEY=VALUE``
assignments to it:

* ``READY=1`` once the service does its job (the listener's port is bound, the worker's weights
  are loaded); until then ``systemctl start`` waits, and ``After=`` units are held back.
* ``STATUS=...`` a one-line status shown by ``systemctl status``.
* ``WATCHDOG=1`` a keep-alive. With ``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC`` and
  ``$WATCHDOG_PID`` and kills and restarts the service if no ping arrives within the interval.
  Ping at **half** the interval (:func:`watchdog_interval` ``/ 2``), as ``sd_watchdog_enabled(3)``
  recommends, and only from a loop that proves the service works (not from a blind timer thread).
* ``STOPPING=1`` when a clean shutdown begins.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op that returns False, so the same code
runs under systemd, in a terminal and in tests. Sending never raises and never logs: a socket
that is gone (systemd restarted, the test's socket closed) just makes the call return False. Only
a malformed message (a programming error) raises ValueError.

A child process inherits ``$NOTIFY_SOCKET``; the units use ``NotifyAccess=main``, so only the
main process (``dicomnode serve``/``listen``/``work`` itself) may notify. :func:`watchdog_interval`
returns None in a child because ``$WATCHDOG_PID`` names the main process.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address for a ``$NOTIFY_SOCKET`` value, or None if it is not a unix socket.

    ``/path`` is a file-system socket; ``@name`` is the abstract socket ``\\0name`` (Linux).
    Other forms (systemd >= 253 also speaks ``vsock:CID:PORT`` to virtual machines) are not
    supported and give None, so the caller treats them like an unset variable.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def check_message(state: str) -> bytes:
    """``state`` encoded for the socket, after checking it is one or more ``KEY=VALUE`` lines.

    Raises ValueError for an empty message or a line without ``=`` (systemd would ignore it, so
    it is a bug in the caller that must not pass silently).
    """
    if not state:
        raise ValueError("sd_notify message is empty")
    for line in state.split("\n"):
        key, sep, _ = line.partition("=")
        if not sep or not key:
            raise ValueError(f"sd_notify message line is not KEY=VALUE: {line!r}")
    return state.encode("utf-8")


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=VALUE`` lines) to systemd; True if a datagram went out.

    False, without raising or logging, when ``$NOTIFY_SOCKET`` is unset or unsupported or the
    socket cannot be reached.
    """
    message = check_message(state)
    address = socket_address(os.environ.get(NOTIFY_SOCKET, ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def one_line(text: str) -> str:
    """``text`` if it fits on one status line, else ValueError (a newline would start a new key)."""
    if "\n" in text or "\r" in text:
        raise ValueError(f"sd_notify STATUS must be one line: {text!r}")
    return text


def ready(status: str | None = None) -> bool:
    """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
    message = "READY=1" if status is None else f"READY=1\nSTATUS={one_line(status)}"
    return notify(message)


def stopping() -> bool:
    """Tell systemd a clean shutdown has begun (``STOPPING=1``)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the one-line status that ``systemctl status`` shows (``STATUS=...``)."""
    return notify(f"STATUS={one_line(text)}")


def watchdog_ping() -> bool:
    """Reset the service watchdog timer (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog interval in seconds that systemd expects pings within, or None if off.

    Read from ``$WATCHDOG_USEC`` (microseconds, set from ``WatchdogSec=``). When
    ``$WATCHDOG_PID`` is set and is not this process, the watchdog belongs to another process
    (this is a child that inherited the environment) and the answer is None. Ping every
    ``watchdog_interval() / 2`` seconds. Raises ValueError if a variable is set but malformed.
    """
    usec_text = os.environ.get(WATCHDOG_USEC)
    if not usec_text:
        return None
    pid_text = os.environ.get(WATCHDOG_PID)
    if pid_text and positive_int(WATCHDOG_PID, pid_text) != os.getpid():
        return None
    return positive_int(WATCHDOG_USEC, usec_text) / 1_000_000


def positive_int(name: str, text: str) -> int:
    """The positive decimal integer in environment variable ``name``, else ValueError."""
    if not (text.isascii() and text.isdigit()) or int(text) == 0:
        raise ValueError(f"${name} is not a positive integer: {text!r}")
    return int(text)
