"""Study pixels for workers on other hosts, without a shared filesystem: the site serves its
stored instances over HTTP(S), the worker fetches the ones its job names and checks each one's
size and SHA-256 against the job.

Why pull over HTTP rather than instances in the broker's messages (``docs/multi-host.md`` has
the figures): a study is tens to hundreds of megabytes (a 60-view study of 10 MB radiographs is
600 MB), above RabbitMQ's default message size limit (128 MiB in 3.10) and, in a quorum queue,
written to every member's log before it is confirmed; pulling moves each byte once, straight from
the site's disk, only for a job a worker actually runs, and a retried job is fetched again from
the same immutable files. The broker carries only the job (a few hundred bytes per instance).

The server (site side) answers ``GET /instances/<SOP Instance UID>`` with the stored file as
received (``application/dicom``, ``ETag`` = its SHA-256), after checking the bearer token (a
shared secret from a file); it knows only instances the state database records, so a path can
never be asked for. Serve it over TLS between hosts (``certificate``/``private_key``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shutil
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dicomnode.queue.messages import InstanceRef
from dicomnode.records import StoredInstance

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
CHUNK = 1 << 20


class TransferError(RuntimeError):
    """An instance could not be fetched or did not match the job (retry the job later)."""


@dataclass(frozen=True)
class ServerTls:
    certificate: Path
    private_key: Path


def read_token(path: Path) -> str:
    """The shared secret of the instance server (first line of a file)."""
    token = path.read_text(encoding="utf-8").strip().splitlines()[0] if path.is_file() else ""
    if len(token) < 16:
        raise TransferError(f"{path}: expected a token of at least 16 characters")
    return token


class InstanceServer:
    """Serves stored instances by SOP Instance UID (``lookup`` maps a UID to its stored record)."""

    def __init__(
        self,
        bind: str,
        port: int,
        lookup: Callable[[str], StoredInstance | None],
        token: str,
        tls: ServerTls | None = None,
    ) -> None:
        handler = _handler(lookup, token)
        self.httpd = ThreadingHTTPServer((bind, port), handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(tls.certificate), str(tls.private_key))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="instance-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> InstanceServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def _handler(
    lookup: Callable[[str], StoredInstance | None], token: str
) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # no request logging
            return

        def do_GET(self) -> None:
            given = (self.headers.get("Authorization") or "").encode()
            if not hmac.compare_digest(given, expected):
                self._status(401, "token missing or wrong")
                return
            prefix = "/instances/"
            uid = self.path[len(prefix) :] if self.path.startswith(prefix) else ""
            if not _UID.fullmatch(uid) or len(uid) > 64:
                self._status(404, "not an instance")
                return
            stored = lookup(uid)
            if stored is None or not stored.path.is_file():
                self._status(404, "no such instance")
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom")
            self.send_header("Content-Length", str(stored.path.stat().st_size))
            if stored.sha256:  # "" where the listener stored it without hashing
                self.send_header("ETag", f'"{stored.sha256}"')
            self.end_headers()
            with stored.path.open("rb") as handle:
                if isinstance(self.connection, ssl.SSLSocket):
                    shutil.copyfileobj(handle, self.wfile, CHUNK)
                else:  # plain TCP (loopback, tests): the kernel copies the file
                    self.connection.sendfile(handle)

        def _status(self, code: int, text: str) -> None:
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


#: Instances of one job fetched at once (the site serves each request in its own thread).
PARALLEL_FETCHES = 4


def fetch_instances(
    refs: Sequence[InstanceRef],
    study_instance_uid: str,
    folder: Path,
    token: str,
    *,
    ca_certificates: Path | None = None,
    timeout: float = 60.0,
    parallel: int = PARALLEL_FETCHES,
) -> tuple[StoredInstance, ...]:
    """Download every instance of a job into ``folder`` (up to ``parallel`` at once) and check
    each one's size and SHA-256; the stored records point at the local copies (the worker
    decodes those), in the job's order. The first failure raises :class:`TransferError`."""
    folder.mkdir(parents=True, exist_ok=True)
    context = ssl.create_default_context(cafile=str(ca_certificates) if ca_certificates else None)

    def fetch(ref: InstanceRef) -> StoredInstance:
        return _fetch_one(ref, study_instance_uid, folder, token, context, timeout)

    if parallel <= 1 or len(refs) <= 1:
        return tuple(fetch(ref) for ref in refs)
    with ThreadPoolExecutor(max_workers=min(parallel, len(refs))) as pool:
        return tuple(pool.map(fetch, refs))


def _fetch_one(
    ref: InstanceRef,
    study_instance_uid: str,
    folder: Path,
    token: str,
    context: ssl.SSLContext,
    timeout: float,
) -> StoredInstance:
    path = folder / f"{ref.sop_instance_uid}.dcm"
    digest = hashlib.sha256()
    size = 0
    request = urllib.request.Request(ref.url, headers={"Authorization": f"Bearer {token}"})
    try:
        with (
            urllib.request.urlopen(request, timeout=timeout, context=context) as answer,
            path.open("wb") as out,
        ):
            while chunk := answer.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        raise TransferError(f"fetching {ref.sop_instance_uid}: {exc}") from exc
    if size != ref.size or digest.hexdigest() != ref.sha256:
        raise TransferError(
            f"{ref.sop_instance_uid}: got {size} bytes with another SHA-256 than the job's "
            "(the site replaced it meanwhile: the study will run again)"
        )
    return StoredInstance(
        sop_instance_uid=ref.sop_instance_uid,
        sop_class_uid=ref.sop_class_uid,
        study_instance_uid=study_instance_uid,
        series_instance_uid=ref.series_instance_uid,
        transfer_syntax_uid=ref.transfer_syntax_uid,
        path=path,
        size=size,
        sha256=ref.sha256,
        calling_ae="",
    )
