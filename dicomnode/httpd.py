"""The HTTP endpoint operators watch: ``/metrics``, ``/healthz`` and ``/readyz`` (``[http]``).

- ``/metrics``: the Prometheus text exposition of every process of the role
  (:mod:`dicomnode.metrics`).
- ``/healthz``: 200 while the process serves HTTP (liveness), with a JSON body.
- ``/readyz``: 200 when every readiness check of the role passes, else 503; the JSON body lists
  each check and its state (:mod:`dicomnode.health`).

A small ``http.server`` in daemon threads of the main process of ``serve``, ``listen`` or
``work``. With ``http.certificate`` and ``http.private_key`` it speaks HTTPS only (TLS 1.2 or
1.3, the BCP 195 cipher suites of :mod:`dicomnode.tls`); the handshake runs in the request's
own thread with a time limit, so a client that connects and stalls blocks no other. No request
is logged (a scrape a second would drown the log); a request that fails is.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from dicomnode import health, metrics, tls
from dicomnode.config import Config, ConfigError, HttpConfig, QueueBackend
from dicomnode.logging import get_logger
from dicomnode.state import StateDB
from dicomnode.storage import StateLayout

log = get_logger(__name__)

REQUEST_TIMEOUT_SECONDS = 10.0
"""Bound on the TLS handshake and on each read and write of a request."""
PATHS = ("/metrics", "/healthz", "/readyz")
JSON_TYPE = "application/json"


class Endpoints(Protocol):
    """What the server answers with."""

    def metrics(self) -> tuple[bytes, str]: ...

    def liveness(self) -> dict[str, Any]: ...

    def readiness(self) -> health.Health: ...


def https_context(http: HttpConfig) -> ssl.SSLContext | None:
    """The server context for ``http.certificate`` and ``http.private_key`` (None: plain
    HTTP). Raises ConfigError naming the key when the files cannot be used."""
    if http.certificate is None or http.private_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(tls.TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(http.certificate, http.private_key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"http.certificate: cannot use {http.certificate} with key {http.private_key}: "
            f"{tls.failure_reason(exc)}"
        ) from exc
    return context


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def version_string(self) -> str:
        return "dicomnode"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (see the module)."""

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        endpoints = self.server.endpoints
        try:
            if path == "/metrics":
                body, content_type = endpoints.metrics()
                self._send(200, body, content_type, send_body)
            elif path == "/healthz":
                self._json(200, endpoints.liveness(), send_body)
            elif path == "/readyz":
                found = endpoints.readiness()
                self._json(200 if found.ready else 503, found.as_json(), send_body)
            else:
                self._json(404, {"error": "not found", "paths": list(PATHS)}, send_body)
        except Exception as exc:
            log.exception("http_request_failed", path=path, error=type(exc).__name__)
            self._json(500, {"error": f"{type(exc).__name__} (see the node's log)"}, send_body)

    def _json(self, status: int, data: dict[str, Any], send_body: bool) -> None:
        body = json.dumps(data, indent=2).encode() + b"\n"
        self._send(status, body, JSON_TYPE, send_body)

    def _send(self, status: int, body: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], endpoints: Endpoints, context: ssl.SSLContext | None
    ) -> None:
        self.endpoints = endpoints
        self.context = context
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """Bind without ``HTTPServer``'s reverse DNS look-up of the address."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the request's thread: bound every read and write, and run the TLS handshake."""
        request.settimeout(REQUEST_TIMEOUT_SECONDS)
        if self.context is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("http_tls_handshake_failed", peer=client_address[0], reason=str(exc))
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            self.shutdown_request(wrapped)


class HttpEndpoint:
    """The running server: :meth:`start` binds ``http.bind``:``port`` and serves in a daemon
    thread; :meth:`stop` shuts it down."""

    def __init__(self, http: HttpConfig, port: int, endpoints: Endpoints) -> None:
        self.http = http
        self.requested_port = port
        self.endpoints = endpoints
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the HTTP endpoint is not running")
        return self._server.server_port

    @property
    def scheme(self) -> str:
        return "http" if self.http.certificate is None else "https"

    def start(self) -> HttpEndpoint:
        """Bind and serve; OSError when the address cannot be bound."""
        server = _Server(
            (self.http.bind, self.requested_port), self.endpoints, https_context(self.http)
        )
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


class NodeEndpoints:
    """What a role answers: its metrics (all its processes, plus the state database read at
    scrape time) and its readiness checks, from ``facts`` (the role's :class:`RoleFacts` now)."""

    def __init__(self, config: Config, role: str, facts: Callable[[], health.RoleFacts]) -> None:
        self.config = config
        self.role = role
        self.components = health.role_components(config, role)
        self.facts = facts
        self.started_at = time.time()
        self._db: StateDB | None = None
        self._db_lock = threading.Lock()
        collectors: list[metrics.Collector] = [metrics.NodeCollector(config, self.observe)]
        if config.queue.backend is QueueBackend.RABBITMQ:
            collectors.append(metrics.BrokerCollector(lambda: broker_stats(config)))
        self.registry = metrics.build_registry(*collectors)

    def _state(self) -> StateDB:
        with self._db_lock:
            if self._db is None:
                self._db = StateLayout(self.config.node.state_dir).open_db()
            return self._db

    def observe(self) -> health.Observation:
        return health.observe(self.config, self._state(), [self.facts()], self.components)

    def metrics(self) -> tuple[bytes, str]:
        return metrics.exposition(self.registry)

    def liveness(self) -> dict[str, Any]:
        return {
            "alive": True,
            "role": self.role,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "checks": [{"name": "process", "ok": True, "state": "ok", "detail": "serving HTTP"}],
        }

    def readiness(self) -> health.Health:
        return self.observe().health

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def broker_stats(config: Config) -> list[tuple[str, int, int]]:
    """The broker's queues this host uses, as (name, messages, consumers)."""
    from dicomnode.queue.roles import pool_stats

    return [(q.name, q.messages, q.consumers) for q in pool_stats(config)]


def url(endpoint: HttpEndpoint, path: str = "") -> str:
    host = endpoint.http.bind
    shown = f"[{host}]" if ":" in host else host
    return f"{endpoint.scheme}://{shown}:{endpoint.port}{path}"
