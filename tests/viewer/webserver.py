"""A static file server for a built single-page web viewer plus a reverse proxy to a DICOMweb
server, on one 127.0.0.1 origin (so the viewer needs no CORS).

``python tests/viewer/webserver.py --root DIST --config APP_CONFIG_JS --upstream URL --port N``

- ``/app-config.js`` is answered with the file given by ``--config`` (the built viewer's own
  ``app-config.js`` is left untouched);
- ``/dicom-web/...`` and ``/wado...`` are forwarded to ``--upstream`` (the PACS), with the
  browser's ``Host`` so that the URLs the PACS writes into its answers point back here;
- every other path is a file under ``--root``, or ``index.html`` when there is none (the
  viewer's client-side routes such as ``/viewer?StudyInstanceUIDs=...``).

Every response carries ``Cross-Origin-Opener-Policy: same-origin`` and
``Cross-Origin-Embedder-Policy: require-corp`` so that the page is cross-origin isolated
(``SharedArrayBuffer`` available to the viewer's image decoders). Binds 127.0.0.1 only; it
prints ``serving`` on stdout once it listens. Requests are logged to stderr, one line each.
"""

from __future__ import annotations

import argparse
import http.client
import mimetypes
import posixpath
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROXIED = ("/dicom-web", "/wado")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


def make_handler(root: Path, config: Path, upstream: str) -> type[BaseHTTPRequestHandler]:
    target = urllib.parse.urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_POST(self) -> None:
            if self.path.startswith(PROXIED):
                self._proxy()
            else:
                self.send_error(405)

        def _serve(self, head: bool) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path.startswith(PROXIED):
                self._proxy()
                return
            if path == "/app-config.js":
                self._file(config, head)
                return
            relative = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
            candidate = (root / relative).resolve()
            inside = candidate == root or root in candidate.parents
            if relative and inside and candidate.is_file():
                self._file(candidate, head)
            else:
                self._file(root / "index.html", head)

        def _file(self, path: Path, head: bool) -> None:
            data = path.read_bytes()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in ISOLATION.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _proxy(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
            except OSError as error:
                self.send_error(502, f"upstream: {error}")
                return
            finally:
                connection.close()
            self.send_response(answer.status, answer.reason)
            for name, value in answer.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            for name, value in ISOLATION.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    handler = make_handler(args.root.resolve(), args.config.resolve(), args.upstream)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    print("serving", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
