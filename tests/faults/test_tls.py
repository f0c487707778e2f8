"""DICOM TLS (BCP 195) on both ends, against real peers: DCMTK's TLS-enabled ``echoscu``,
``storescu`` and ``storescp``, and ``openssl s_client`` where a client must be limited to an old
protocol or a weak cipher suite. Every certificate is made in the test with the ``openssl`` CLI:
our CA (the node, the modality and the PACS), a stranger CA (an intruding client, a fake PACS),
and a PACS certificate from our CA that names another host.

- Listening: ``dicomnode serve`` with ``node.tls`` and a CA (mutual authentication). Valid
  clients echo and store; plain DICOM, a client certificate from the stranger CA, no client
  certificate, TLS 1.1 and a non-BCP 195 cipher suite are refused (each logged with its reason);
  a peer that connects and stays silent blocks nobody; the listener keeps serving afterwards,
  and what it stored is delivered over TLS to a storescp that requires our certificate.
- Sending: the node's sender to storescp over TLS, with and without a required client
  certificate, and the ways it must fail (untrusted, misnamed, refusing us, not TLS), each with
  its delivery status and reason.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from dicomnode import tls
from dicomnode.config import ConfigError, TlsConfig, load_config
from dicomnode.demo import free_port
from dicomnode.records import JobState
from dicomnode.scu import FileStatus, Peer, send_files
from dicomnode.state import StateDB
from dicomnode.writers import ResultObjects
from tests.faults.conftest import NODE_AE, record_counts, save, small_dx
from tests.test_node_e2e import (
    ECHOSCU,
    STORESCU,
    NodeProcess,
    node,
    settled,
    wait_for,
    write_config,
)
from tests.test_scu import FAST, results, storescp  # noqa: F401 (results: a fixture)

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(240)]

OPENSSL = "/usr/bin/openssl"
LOOPBACK = "127.0.0.1"


# -- certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """The certificates of one test run, by name: ``<name>.crt`` and ``<name>.key``."""

    folder: Path

    def crt(self, name: str) -> Path:
        return self.folder / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"

    def tls(self, name: str, ca: str | None = "ca") -> TlsConfig:
        """A ``[tls]`` table: ``name``'s certificate and key, trusting ``ca`` (None: the
        system's trust store)."""
        return TlsConfig(self.crt(name), self.key(name), self.crt(ca) if ca else None)

    def dcmtk(self, name: str, *more: str, ca: str = "ca") -> list[str]:
        """DCMTK options: present ``name``'s certificate, trust ``ca``, then ``more``."""
        return ["+tls", str(self.key(name)), str(self.crt(name)), "+cf", str(self.crt(ca)), *more]


def openssl(*args: str | Path) -> None:
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.crt",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def make_leaf(folder: Path, name: str, ca: str, san: str) -> None:
    """A certificate for ``name`` signed by ``ca``, good as TLS server and client."""
    key, csr, ext = (folder / f"{name}.{suffix}" for suffix in ("key", "csr", "ext"))
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key,
        "-out", csr,
    )  # fmt: skip
    ext.write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl(
        "x509", "-req", "-in", csr, "-CA", folder / f"{ca}.crt", "-CAkey", folder / f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", folder / f"{name}.crt",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "stranger")
    make_leaf(folder, "node", "ca", f"IP:{LOOPBACK}")  # listens, and is our client certificate
    make_leaf(folder, "pacs", "ca", f"IP:{LOOPBACK}")
    make_leaf(folder, "modality", "ca", "DNS:modality.invalid")
    make_leaf(folder, "intruder", "stranger", "DNS:modality.invalid")
    make_leaf(folder, "fakepacs", "stranger", f"IP:{LOOPBACK}")
    make_leaf(folder, "misnamed", "ca", "DNS:pacs.invalid")  # our CA, not for 127.0.0.1
    for key in folder.glob("*.key"):
        key.chmod(0o600)  # as the config requires: readable by the service only
    return Pki(folder)


# -- the contexts -----------------------------------------------------------------------------


def test_contexts_follow_bcp195(pki: Pki) -> None:
    contexts = {
        "server": tls.server_context(pki.tls("node")),
        "client": tls.client_context(pki.tls("node")),
    }
    for side, context in contexts.items():
        assert context.minimum_version is ssl.TLSVersion.TLSv1_2, side
        assert context.options & ssl.OP_NO_COMPRESSION and context.options & ssl.OP_NO_RENEGOTIATION
        tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 and all(c["kea"] in ("kx-ecdhe", "kx-dhe") and c["aead"] for c in tls12)
        assert {c["symmetric"] for c in tls12} <= {
            "aes-128-gcm",
            "aes-256-gcm",
            "chacha20-poly1305",
        }
    assert contexts["server"].verify_mode is ssl.CERT_REQUIRED  # a CA: mutual authentication
    assert tls.server_context(pki.tls("node", ca=None)).verify_mode is ssl.CERT_NONE
    assert contexts["client"].verify_mode is ssl.CERT_REQUIRED and contexts["client"].check_hostname


def test_unusable_files_are_clear_errors(pki: Pki, tmp_path: Path) -> None:
    encrypted, small_key, small_crt = (
        tmp_path / "enc.key",
        tmp_path / "1024.key",
        tmp_path / "1024.crt",
    )
    openssl("pkey", "-in", pki.key("node"), "-aes256", "-passout", "pass:x", "-out", encrypted)
    openssl(
        "req", "-x509", "-newkey", "rsa:1024", "-nodes", "-days", "1", "-subj", "/CN=weak",
        "-keyout", small_key, "-out", small_crt,
    )  # fmt: skip
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    cases = {
        "is not the key of tls.certificate": TlsConfig(pki.crt("node"), pki.key("pacs"), None),
        "is encrypted": TlsConfig(pki.crt("node"), encrypted, None),
        r"tls\.certificate: .* holds no PEM certificate": TlsConfig(not_pem, pki.key("node"), None),
        r"tls\.private_key: .* holds no PEM private key": TlsConfig(pki.crt("node"), not_pem, None),
        r"tls\.ca_certificates: .* holds no PEM": TlsConfig(
            pki.crt("node"), pki.key("node"), not_pem
        ),
        r"tls\.certificate: cannot use .*too small": TlsConfig(small_crt, small_key, None),
        r"tls\.certificate: cannot read": TlsConfig(tmp_path / "gone.crt", pki.key("node"), None),
    }
    for message, config in cases.items():
        for build in (tls.server_context, tls.client_context):
            with pytest.raises(ConfigError, match=message):
                build(config)


# -- listening --------------------------------------------------------------------------------


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, input=stdin if stdin is not None else ""
    )


def s_client(port: int, pki: Pki, *options: str) -> subprocess.CompletedProcess[str]:
    """openssl s_client with the modality's (valid) certificate and ``options``."""
    cmd = [OPENSSL, "s_client", "-connect", f"{LOOPBACK}:{port}", "-CAfile", str(pki.crt("ca"))]
    cmd += ["-cert", str(pki.crt("modality")), "-key", str(pki.key("modality")), *options]
    return run(cmd)


def handshake_failures(running: NodeProcess, since: int) -> list[dict[str, Any]]:
    """The node's ``tls_handshake_failed`` events after its first ``since`` events."""
    return [e for e in running.events()[since:] if e["event"] == "tls_handshake_failed"]


def stored_instances(config: Path) -> set[str]:
    with StateDB(load_config(config).node.state_dir / "state.sqlite") as db:
        return {row[0] for row in db.query("SELECT sop_instance_uid FROM instances")}


def tls_node_config(folder: Path, weights: Path, pki: Pki, destination_port: int) -> Path:
    """A node listening with TLS + CA and sending to one TLS destination (storescp)."""
    extra = (
        f'[tls]\ncertificate = "{pki.crt("node")}"\nprivate_key = "{pki.key("node")}"\n'
        f'ca_certificates = "{pki.crt("ca")}"\n\n'
        f'[[destinations]]\nae_title = "TLSPACS"\nhost = "{LOOPBACK}"\n'
        f"port = {destination_port}\ntls = true\n"
    )
    config = write_config(folder, weights, [], port=free_port(), extra=extra)
    config.write_text(config.read_text().replace("[node]\n", "[node]\ntls = true\n", 1))
    return config


def test_listener_accepts_only_authenticated_bcp195_clients(
    pki: Pki, fault_weights: Path, tmp_path: Path
) -> None:
    received = tmp_path / "pacs"
    received.mkdir()
    with storescp(received, *pki.dcmtk("pacs", "-rc")) as pacs_port:
        config = tls_node_config(tmp_path / "node", fault_weights, pki, pacs_port)
        port = load_config(config).node.port
        with node("serve", config, tmp_path / "node.log") as running:
            assert running.event("listener_started", tls="mutual") is not None
            studies: list[str] = []

            def storescu(index: int, *options: str) -> subprocess.CompletedProcess[str]:
                ds = small_dx(index)
                path = save(ds, tmp_path / f"dx-{index}.dcm")
                answer = run([STORESCU, *options, "-aec", NODE_AE, LOOPBACK, str(port), str(path)])
                if answer.returncode == 0:
                    studies.append(str(ds.StudyInstanceUID))
                return answer

            def valid(index: int) -> Callable[[], subprocess.CompletedProcess[str]]:
                return lambda: storescu(index, *pki.dcmtk("modality"))

            def silent_peer_then_valid() -> subprocess.CompletedProcess[str]:
                with socket.create_connection((LOOPBACK, port)):  # connects, never speaks
                    return storescu(7, *pki.dcmtk("modality"))

            # name: (attempt, refused?, the reason the node logs for a failed handshake: for the
            # silent peer, its closing the connection once the valid store is done)
            cases: dict[str, tuple[Callable[[], subprocess.CompletedProcess[str]], bool, str]] = {
                "echoscu": (lambda: run([ECHOSCU, *pki.dcmtk("modality"), "-aec", NODE_AE,
                                         LOOPBACK, str(port)]), False, ""),
                "storescu": (valid(0), False, ""),
                "plain_storescu": (lambda: storescu(1), True, "WRONG_VERSION_NUMBER"),
                "stranger_ca_client": (lambda: storescu(2, *pki.dcmtk("intruder", ca="ca")),
                                       True, "certificate verify failed"),
                "no_client_certificate": (lambda: storescu(3, "+tla", "+cf", str(pki.crt("ca"))),
                                          True, "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
                "s_client_tls_1_1": (lambda: s_client(port, pki, "-tls1_1", "-cipher",
                                                    "DEFAULT:@SECLEVEL=0"),
                                   True, "UNSUPPORTED_PROTOCOL"),
                "s_client_weak_cipher": (lambda: s_client(port, pki, "-tls1_2", "-cipher",
                                                        "AES128-SHA"), True, "NO_SHARED_CIPHER"),
                "s_client_tls_1_2_bcp195": (lambda: s_client(port, pki, "-tls1_2"), False, ""),
                "silent_peer_then_storescu": (silent_peer_then_valid, False,
                                              "UNEXPECTED_EOF_WHILE_READING"),
                "storescu_after_failures": (valid(8), False, ""),
            }  # fmt: skip
            outcomes: dict[str, str] = {}
            answers: dict[str, subprocess.CompletedProcess[str]] = {}
            for name, (attempt, refused, reason) in cases.items():
                before = len(running.events())
                answers[name] = answer = attempt()
                if name.startswith("s_client"):  # exit 0 and a cipher: the handshake completed
                    ok = answer.returncode == 0 and "Cipher is (NONE)" not in answer.stdout
                else:
                    ok = answer.returncode == 0
                outcomes[name] = "succeeded" if ok else "refused"
                assert ok is not refused, (name, answer.stdout, answer.stderr)
                if reason:
                    failures = wait_for(name, partial(handshake_failures, running, before), 30)
                    assert len(failures) == 1 and reason in failures[0]["reason"], failures
                else:
                    assert not handshake_failures(running, before), name
            tls11 = answers["s_client_tls_1_1"].stdout
            assert "Protocol  : TLSv1.1" in tls11  # it did offer TLS 1.1, and only that
            assert running.process.poll() is None
            stored = stored_instances(config)
            for study in studies:  # delivered over TLS to a PACS requiring our certificate
                outcome = wait_for("delivery", partial(settled, config, study))
                assert outcome == (JobState.DELIVERED, None), (study, outcome)
    delivered = {p.name for p in received.iterdir()}
    counts = record_counts(
        "tls_listener",
        {
            "cases": len(cases),
            "refused_as_expected": sum(1 for _, r, _ in cases.values() if r),
            "succeeded": sum(1 for o in outcomes.values() if o == "succeeded"),
            "instances_stored": len(stored),
            "studies_delivered_over_tls": len(studies),
            "objects_at_tls_pacs": len(delivered),
            "outcomes": outcomes,
        },
    )
    assert counts["instances_stored"] == len(studies) == 3  # storescu, silent peer, after
    assert counts["objects_at_tls_pacs"] >= 2 * len(studies)  # an SR and an SC per study


# -- sending ----------------------------------------------------------------------------------


def test_sender_over_tls_to_storescp(pki: Pki, results: ResultObjects, tmp_path: Path) -> None:  # noqa: F811
    files = [w.path for w in results.all]
    node_tls = pki.tls("node")
    # name: (storescp options, our [tls], expected status, words in the reason)
    cases: dict[str, tuple[list[str], TlsConfig, FileStatus, str]] = {
        "mutual": (pki.dcmtk("pacs", "-rc"), node_tls, FileStatus.SUCCESS, ""),
        "server_only": (pki.dcmtk("pacs", "-ic"), node_tls, FileStatus.SUCCESS, ""),
        "stranger_ca_pacs": (pki.dcmtk("fakepacs", "-ic"), node_tls, FileStatus.PERMANENT,
                             "certificate verify failed: unable to get local issuer"),
        "misnamed_pacs": (pki.dcmtk("misnamed", "-ic"), node_tls, FileStatus.PERMANENT,
                          "mismatch"),
        "system_trust_store": (pki.dcmtk("pacs", "-ic"), pki.tls("node", ca=None),
                               FileStatus.PERMANENT, "certificate verify failed"),
        "pacs_refuses_our_certificate": (pki.dcmtk("pacs", "-rc", ca="stranger"), node_tls,
                                         FileStatus.PERMANENT, "TLSV1_ALERT_UNKNOWN_CA"),
        "pacs_without_tls": ([], node_tls, FileStatus.TRANSIENT, "does the peer speak TLS"),
    }  # fmt: skip
    outcomes: dict[str, str] = {}
    for name, (options, our_tls, expected, words) in cases.items():
        out = tmp_path / name
        out.mkdir()
        with storescp(out, *options) as port:
            destination = Peer(LOOPBACK, port, "STORESCP", calling_ae=NODE_AE, tls=our_tls)
            batch = send_files(destination, files, FAST)
        statuses = {o.status for o in batch.outcomes}
        reason = batch.outcomes[0].reason
        outcomes[name] = f"{'/'.join(sorted(statuses))}: {reason}"
        assert statuses == {expected}, (name, batch.outcomes)
        assert words in reason, (name, reason)
        stored = len(list(out.iterdir()))
        assert stored == (len(files) if expected is FileStatus.SUCCESS else 0), name
    counts = record_counts(
        "tls_sender",
        {
            "cases": len(cases),
            "delivered": sum(1 for c in cases.values() if c[2] is FileStatus.SUCCESS),
            "failed_as_expected": sum(
                1 for c in cases.values() if c[2] is not FileStatus.SUCCESS
            ),
            "outcomes": outcomes,
        },
    )
    assert counts["delivered"] == 2
