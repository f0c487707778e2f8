"""A real RabbitMQ for tests: Debian's ``rabbitmq-server`` started on loopback with its own node
name, ports, data folder, Erlang cookie and epmd port, stopped by PID (and its epmd by port)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pika

from dicomnode.demo import free_port
from dicomnode.records import StoredInstance

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
EPMD = Path("/usr/bin/epmd")
USER, PASSWORD = "dicomnode", "test-password"


class RabbitMQ:
    """One private broker in ``workdir`` (``bind``: the address to listen on)."""

    def __init__(self, workdir: Path, bind: str = "127.0.0.1", consumer_timeout_ms: int = 0,
                 channel_tick_ms: int = 0, tls: tuple[Path, Path, Path] | None = None):
        """``tls``: (CA, certificate, key) PEM files: also listen for amqps on ``tls_port``."""
        self.workdir = workdir
        self.bind = bind
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []  # the namespace it runs in (epmd is stopped there too)
        self.consumer_timeout_ms = consumer_timeout_ms
        for folder in ("mnesia", "log", "home"):
            (workdir / folder).mkdir(parents=True, exist_ok=True)
        lines = [
            f"listeners.tcp.1 = {bind}:{self.port}",
            "loopback_users = none",
            f"default_user = {USER}",
            f"default_pass = {PASSWORD}",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
        ]
        if consumer_timeout_ms:
            lines.append(f"consumer_timeout = {consumer_timeout_ms}")
        self.tls_port = free_port() if tls else 0
        if tls:
            ca, certificate, key = tls
            lines += [
                f"listeners.ssl.default = {bind}:{self.tls_port}",
                f"ssl_options.cacertfile = {ca}",
                f"ssl_options.certfile = {certificate}",
                f"ssl_options.keyfile = {key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
            ]
        (workdir / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        (workdir / "enabled_plugins").write_text("[].\n")
        # How often a channel checks consumer_timeout (60 s by default): advanced.config only.
        tick = f"{{channel_tick_interval, {channel_tick_ms}}}" if channel_tick_ms else ""
        (workdir / "advanced.config").write_text(f"[{{rabbit, [{tick}]}}].\n")

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{self.bind}:{self.port}/%2F"

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.workdir / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.bind,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
        }

    def start(self, timeout: float = 90.0, prefix: list[str] | None = None) -> RabbitMQ:
        """Start the broker (``prefix``: e.g. ``["ip", "netns", "exec", "ns"]``) and wait until
        it accepts AMQP connections."""
        log = (self.workdir / "server.log").open("ab")
        self.prefix = list(prefix or [])
        self.process = subprocess.Popen(
            [*self.prefix, str(SERVER)],
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {self.tail()}")
            try:
                pika.BlockingConnection(pika.URLParameters(self.url)).close()
                return self
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rabbitmq-server did not start: {self.tail()}") from None
                time.sleep(0.5)

    def tail(self) -> str:
        path = self.workdir / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""

    def stop(self, kill: bool = False) -> None:
        """Stop the broker (SIGTERM and wait, or SIGKILL) and its epmd."""
        if self.process is not None and self.process.poll() is None:
            sig = signal.SIGKILL if kill else signal.SIGTERM
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        subprocess.run([*self.prefix, str(EPMD), "-kill"], env=self.environment(),
                       capture_output=True, timeout=10, check=False)

    def __enter__(self) -> RabbitMQ:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stored_instance(tmp_path: Path, data: bytes) -> StoredInstance:
    """A stored instance of ``data`` (SOP Instance UID 1.2.3.4 of study 1.2.3) written to
    ``tmp_path``, as the instance server of a site would serve it."""
    path = tmp_path / "instance.dcm"
    path.write_bytes(data)
    return StoredInstance("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.3.9",
                          "1.2.840.10008.1.2.1", path, len(data),
                          hashlib.sha256(data).hexdigest(), "MODALITY")
