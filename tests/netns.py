"""Hosts for multi-host tests on one machine: Linux network namespaces joined by a bridge.

Each :class:`Host` is a network namespace with a veth link to a bridge in the root namespace
and its own address on a private /24; processes started with :meth:`Host.popen` see only that
host's network (its loopback and its address), so what crosses between roles crosses a network.
Needs root (CI runs as root) and ``ip`` from iproute2. Everything is removed by
:meth:`Network.close` (also after a failed test).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO

IP = "/usr/sbin/ip"


def available() -> bool:
    """Whether namespaces can be made here (root and iproute2)."""
    return os.geteuid() == 0 and Path(IP).is_file()


def usable() -> bool:
    """Whether a namespace with a veth link can really be made here (root is not enough in a
    container without CAP_SYS_ADMIN or NET_ADMIN): one is created and removed."""
    if not available():
        return False
    name = f"dnprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
        try:
            _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
            _ip("link", "delete", f"{name}a")
        finally:
            _ip("netns", "delete", name)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=30)


class Host:
    """One namespace with an address on the test network."""

    def __init__(self, network: Network, name: str, index: int) -> None:
        self.network = network
        self.name = name
        self.namespace = f"{network.tag}-{name}"
        self.address = f"{network.prefix}.{index}"
        outer, inner = f"{network.tag}o{index}", f"{network.tag}i{index}"
        _ip("netns", "add", self.namespace)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", self.namespace)
        _ip("link", "set", outer, "master", network.bridge, "up")
        self.exec("ip", "addr", "add", f"{self.address}/24", "dev", inner)
        self.exec("ip", "link", "set", inner, "up")
        self.exec("ip", "link", "set", "lo", "up")

    def prefix(self) -> list[str]:
        """The command prefix that runs a program in this host's namespace."""
        return [IP, "netns", "exec", self.namespace]

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(), *command], check=True, capture_output=True,
                              text=True, timeout=60)

    def popen(
        self, command: Sequence[str], *, log: IO[bytes], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` in this host (its own session, so it can be killed as a group)."""
        return subprocess.Popen([*self.prefix(), *command], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


class Network:
    """A bridge and the hosts on it (``10.<n>.<m>.0/24``, unique per network)."""

    def __init__(self) -> None:
        self.tag = f"dn{uuid.uuid4().hex[:4]}"
        octets = int(self.tag[2:], 16)
        self.prefix = f"10.{200 + octets % 50}.{octets % 250}"
        self.bridge = f"{self.tag}br"
        self.hosts: list[Host] = []
        self.gateway = f"{self.prefix}.1"
        """The test machine's own address on the network (the bridge's), e.g. for a modality."""
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, name: str) -> Host:
        host = Host(self, name, len(self.hosts) + 2)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run([IP, "netns", "delete", host.namespace], capture_output=True,
                           timeout=30, check=False)
        subprocess.run([IP, "link", "delete", self.bridge], capture_output=True, timeout=30,
                       check=False)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
