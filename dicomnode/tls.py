"""DICOM TLS (PS3.15 Annex B.9, the BCP 195 profile): ``ssl.SSLContext`` objects for the
listener and the sender, built from the ``[tls]`` table.

Both sides, per BCP 195 (RFC 9325) and DICOM's non-downgrading BCP 195 profile:

- TLS 1.2 at least, TLS 1.3 allowed (SSL 3, TLS 1.0 and 1.1 are refused);
- TLS 1.2 cipher suites limited to forward-secret AEAD ones: ECDHE or DHE key exchange with
  AES-GCM or ChaCha20-Poly1305 (TLS 1.3 suites are all AEAD and forward-secret; OpenSSL's
  defaults are kept); OpenSSL security level 2 (RSA/DH keys of 2048 bits or more, no SHA-1
  signatures);
- no TLS compression (CRIME), no renegotiation.

The listener (:func:`server_context`) presents the node's certificate. With
``tls.ca_certificates`` it requires a client certificate signed by that CA (mutual
authentication); without it it asks for none. Its handshake runs in the association's own
thread with a time limit, never in pynetdicom's accept loop, so a peer that connects and
stalls, or fails the handshake, costs one connection and never blocks other peers
(:func:`accept_handshake`).

The sender (:func:`client_context`) presents the node's certificate when the destination asks
for one and verifies the destination's certificate against ``tls.ca_certificates``, or the
system's trust store when none is configured. It also checks that the certificate names the
host it dialled (``check_hostname``): an IP address must appear as an IP address entry of the
certificate's subjectAltName, a host name as a DNS entry. DICOM peers are usually addressed by
IP; without this check any certificate from the CA (another modality's, say) could stand in for
the PACS. :func:`failure_reason` and :func:`is_permanent` turn a failed handshake into a reason
for the logs and ``dicomnode status``.
"""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

from dicomnode.config import Config, ConfigError, TlsConfig

#: TLS 1.2 cipher suites (OpenSSL names): ECDHE/DHE key exchange with AES-GCM or
#: ChaCha20-Poly1305, as BCP 195 (RFC 9325 section 4.2) recommends; ECDHE first, 128-bit AES
#: first. ``@SECLEVEL=2`` refuses keys under 2048 bits (RSA, DH) and SHA-1 signatures.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
        "@SECLEVEL=2",
    )
)

#: Options set on every context: no compression, no renegotiation (TLS 1.2; TLS 1.3 has none).
_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION

#: Errors that mean the connection went away during the handshake (peer restarting, network),
#: not that the two sides disagree: worth retrying.
_DROPPED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)

#: OpenSSL reasons that need a word of explanation in a log line or ``dicomnode status``.
_HINTS = {
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS on this port",
    "UNSUPPORTED_PROTOCOL": "the peer offers only TLS versions below 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer refuses our TLS versions (1.2, 1.3)",
    "NO_SHARED_CIPHER": "the peer offers none of the BCP 195 cipher suites",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer found no common TLS parameters",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "HTTP_REQUEST": "the peer sent plain text, not TLS",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the handshake",
}


class TlsError(ConfigError):
    """A ``[tls]`` file cannot be used: unreadable, not PEM, encrypted, or key and certificate
    do not belong together. The message names the key, as other configuration errors do."""


class ListenerContext(ssl.SSLContext):
    """A server context whose handshake is deferred to :func:`accept_handshake`.

    pynetdicom wraps each accepted socket in its accept loop; a handshake there would stall every
    other peer behind one that connects and sends nothing. This context only wraps (no
    handshake) and gives the socket ``handshake_timeout`` seconds per network operation.
    """

    handshake_timeout: float = 30.0

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        if server_side:
            sock.settimeout(self.handshake_timeout)
            do_handshake_on_connect = False
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


class _WatchedSocket(ssl.SSLSocket):
    """An SSLSocket that records its first TLS failure on its :class:`ClientContext`.

    pynetdicom catches and logs handshake and read errors itself; this keeps the reason so that
    the sender can tell "certificate refused" from "cannot connect". Reads are watched too:
    with TLS 1.3 a server that refuses our client certificate says so after the handshake.
    """

    def _record(self, exc: OSError) -> None:
        context = self.context
        if isinstance(context, ClientContext) and context.failure is None:
            context.failure = exc

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except OSError as exc:
            self._record(exc)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            self._record(exc)
            raise


class ClientContext(ssl.SSLContext):
    """A client context for one association; ``failure`` is its first TLS error, if any."""

    sslsocket_class = _WatchedSocket
    failure: OSError | None = None


def _readable_pem(key: str, path: Path, marker: str, what: str) -> str:
    """The text of the PEM file ``path`` (config key ``key``); TlsError unless it holds
    ``marker`` (e.g. ``CERTIFICATE-----``)."""
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise TlsError(f"tls.{key}: cannot read {path}: {exc.strerror or exc}") from exc
    if marker not in text:
        raise TlsError(f"tls.{key}: {path} holds no PEM {what}")
    return text


def _check_files(tls: TlsConfig) -> None:
    """Readable PEM certificate(s) and an unencrypted PEM private key, or TlsError."""
    _readable_pem("certificate", tls.certificate, "CERTIFICATE-----", "certificate")
    key = _readable_pem("private_key", tls.private_key, "PRIVATE KEY-----", "private key")
    if "ENCRYPTED" in key:
        raise TlsError(
            f"tls.private_key: {tls.private_key} is encrypted; the service needs it unencrypted "
            "(protect it with file permissions: readable by the service user only)"
        )
    if tls.ca_certificates is not None:
        _readable_pem("ca_certificates", tls.ca_certificates, "CERTIFICATE-----", "certificate")


def _no_password() -> bytes:
    """Never prompt on a terminal for a key password (the service has none)."""
    return b""


def _load_identity(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Our certificate (chain) and its key; TlsError when they do not match or are refused."""
    try:
        context.load_cert_chain(tls.certificate, tls.private_key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"tls.private_key: {tls.private_key} is not the key of tls.certificate "
                f"{tls.certificate}"
            ) from exc
        raise TlsError(
            f"tls.certificate: cannot use {tls.certificate} with key {tls.private_key}: "
            f"{failure_reason(exc)}"
        ) from exc


def _load_trust(context: ssl.SSLContext, ca_certificates: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except ssl.SSLError as exc:
        raise TlsError(
            f"tls.ca_certificates: cannot use {ca_certificates}: {failure_reason(exc)}"
        ) from exc


def _bcp195(context: ssl.SSLContext) -> None:
    """TLS 1.2 minimum, the BCP 195 TLS 1.2 suites, no compression, no renegotiation."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= _OPTIONS


def server_context(tls: TlsConfig, handshake_timeout: float = 30.0) -> ListenerContext:
    """The listener's context: our certificate; client certificates required and verified
    against ``tls.ca_certificates`` when configured (mutual authentication), else not asked.

    ``handshake_timeout`` bounds each network operation of the handshake (a stalled peer is
    dropped after it). Raises :class:`TlsError` for unusable files.
    """
    _check_files(tls)
    context = ListenerContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout = handshake_timeout
    _bcp195(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_identity(context, tls)
    if tls.ca_certificates is not None:
        _load_trust(context, tls.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: TlsConfig) -> ClientContext:
    """The sender's context for one association: our certificate for destinations that ask for
    it; the destination's certificate verified against ``tls.ca_certificates`` (else the system
    trust store) and checked to name the host we connect to. Raises :class:`TlsError`."""
    _check_files(tls)
    context = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    _bcp195(context)
    _load_identity(context, tls)
    if tls.ca_certificates is not None:
        _load_trust(context, tls.ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def listener_context(config: Config) -> ListenerContext | None:
    """The listener's context when ``node.tls`` is set (None for plain TCP); the handshake gets
    ``node.acse_timeout_seconds``, the bound on waiting for an association request."""
    if not config.node.tls:
        return None
    if config.tls is None:
        raise TlsError("node.tls: needs a [tls] table with certificate and private_key")
    return server_context(config.tls, config.node.acse_timeout_seconds)


def mode(config: Config) -> str:
    """How the listener talks: ``plain``, ``tls`` (server certificate only) or ``mutual``."""
    if not config.node.tls:
        return "plain"
    return "mutual" if config.tls is not None and config.tls.ca_certificates else "tls"


def failure_reason(exc: BaseException) -> str:
    """A one-line reason for a TLS failure (OpenSSL's, with a hint where it is cryptic)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset during the TLS handshake (does the peer speak TLS on this port?)"
    if isinstance(exc, ssl.SSLError):
        text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc.args[1] if len(exc.args) > 1 else exc))
        hint = _HINTS.get(exc.reason or "")
        return f"{text} ({hint})" if hint else text
    return f"{type(exc).__name__}: {exc}"


def is_permanent(exc: BaseException) -> bool:
    """True when the two sides disagree (certificate refused, no common version or cipher,
    not TLS at all): the same attempt fails again until someone changes a certificate or the
    configuration. False when the connection dropped or timed out during the handshake, which
    is also how a plain DICOM port usually answers a TLS client (it resets the connection): a
    peer restarting looks the same, so that is retried until ``give_up_after_seconds``."""
    return isinstance(exc, ssl.SSLError) and not isinstance(exc, _DROPPED)


def accept_handshake(sock: socket.socket | None) -> str | None:
    """Complete the server handshake on an accepted socket (in the association's thread).

    Returns None on success (or when ``sock`` is not TLS) and the socket is blocking again as
    pynetdicom expects; otherwise the reason the peer was refused (the caller closes it).
    """
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        sock.do_handshake()
    except OSError as exc:
        return failure_reason(exc)
    sock.settimeout(None)
    return None


def session_summary(sock: socket.socket | None) -> dict[str, str]:
    """Protocol version and cipher suite of an established TLS socket (empty if not TLS)."""
    if not isinstance(sock, ssl.SSLSocket):
        return {}
    cipher = sock.cipher()
    return {"tls_version": sock.version() or "", "cipher": cipher[0] if cipher else ""}
