"""TLS between hosts (docs/multi-host.md): the broker over amqps and the site's instance server
over HTTPS, against a real rabbitmq-server with a TLS listener and certificates made by openssl.
A client trusting another CA, or a worker with the wrong token, gets nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.queue.messages import InstanceRef
from dicomnode.queue.rabbitmq import Broker, BrokerError, BrokerSettings
from dicomnode.queue.transfer import InstanceServer, ServerTls, TransferError, fetch_instances
from dicomnode.records import StoredInstance

from .brokers import PASSWORD, SERVER, USER, RabbitMQ, stored_instance
from .faults.test_tls import make_ca, make_leaf
from .test_rabbitmq import job

pytestmark = [
    pytest.mark.skipif(not SERVER.is_file(), reason="rabbitmq-server is not installed"),
    pytest.mark.timeout(300),
]
TOKEN = "tls-test-instance-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("broker-pki")
    make_ca(folder, "ca")
    make_ca(folder, "stranger")
    make_leaf(folder, "broker", "ca", "IP:127.0.0.1")
    make_leaf(folder, "site", "ca", "IP:127.0.0.1")
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return folder


@pytest.fixture(scope="module")
def rabbit(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    tls = (pki / "ca.crt", pki / "broker.crt", pki / "broker.key")
    with RabbitMQ(tmp_path_factory.mktemp("rabbitmq-tls"), tls=tls) as broker:
        yield broker


def amqps(rabbit: RabbitMQ, ca: Path) -> BrokerSettings:
    return BrokerSettings(url=f"amqps://127.0.0.1:{rabbit.tls_port}/%2F",
                          credentials=(USER, PASSWORD), ca_certificates=ca, prefix="tls")


def test_jobs_cross_the_broker_over_tls_and_an_untrusted_broker_is_refused(
    rabbit: RabbitMQ, pki: Path
) -> None:
    """The amqps listener speaks TLS only; a client trusting another CA is refused with
    BrokerError (which the role loops retry), not an unhandled SSL error."""
    with Broker(amqps(rabbit, pki / "ca.crt")) as site, \
            Broker(amqps(rabbit, pki / "ca.crt")) as worker:
        site.declare_site("site-a")
        site.publish_job(job(21))
        taken = worker.get_job()
        assert taken is not None and taken.message.job_id == 21
        worker.ack(taken.delivery_tag)
    with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED"):
        Broker(amqps(rabbit, pki / "stranger.crt"))


def test_pixels_are_fetched_over_https_only_with_the_trusted_certificate_and_the_token(
    pki: Path, tmp_path: Path
) -> None:
    data = b"DICM" * 1000
    stored = stored_instance(tmp_path, data)
    digest = stored.sha256
    server = InstanceServer("127.0.0.1", 0, lambda uid: stored if uid == "1.2.3.4" else None,
                            TOKEN, ServerTls(pki / "site.crt", pki / "site.key")).start()
    try:
        ref = InstanceRef("1.2.3.4", stored.sop_class_uid, "1.2.3.9", stored.transfer_syntax_uid,
                          len(data), digest, f"https://127.0.0.1:{server.port}/instances/1.2.3.4")
        got = fetch_instances([ref], "1.2.3", tmp_path / "ok", TOKEN,
                              ca_certificates=pki / "ca.crt")
        assert got[0].path.read_bytes() == data
        with pytest.raises(TransferError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch_instances([ref], "1.2.3", tmp_path / "untrusted", TOKEN,
                            ca_certificates=pki / "stranger.crt")
        with pytest.raises(TransferError, match="401"):
            fetch_instances([ref], "1.2.3", tmp_path / "token", "x" * 32,
                            ca_certificates=pki / "ca.crt")
        plain = InstanceRef(ref.sop_instance_uid, ref.sop_class_uid, ref.series_instance_uid,
                            ref.transfer_syntax_uid, ref.size, ref.sha256,
                            ref.url.replace("https://", "http://"))
        with pytest.raises(TransferError):  # the server speaks TLS only
            fetch_instances([plain], "1.2.3", tmp_path / "plain", TOKEN)
    finally:
        server.stop()


def test_a_jobs_instances_are_fetched_in_parallel_in_order_and_one_mismatch_fails_the_job(
    tmp_path: Path,
) -> None:
    stored = {}
    for i in range(6):
        data = bytes([i]) * (100_000 + i)
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(data)
        stored[f"1.2.3.{i}"] = StoredInstance(
            f"1.2.3.{i}", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.3.9",
            "1.2.840.10008.1.2.1", path, len(data), hashlib.sha256(data).hexdigest(), "M")
    server = InstanceServer("127.0.0.1", 0, stored.get, TOKEN).start()
    try:
        refs = [InstanceRef(uid, s.sop_class_uid, "1.2.3.9", s.transfer_syntax_uid, s.size,
                            s.sha256, f"http://127.0.0.1:{server.port}/instances/{uid}")
                for uid, s in stored.items()]
        got = fetch_instances(refs, "1.2.3", tmp_path / "all", TOKEN, parallel=4)
        assert [g.sop_instance_uid for g in got] == list(stored)
        assert all(g.path.read_bytes() == s.path.read_bytes()
                   for g, s in zip(got, stored.values(), strict=True))
        wrong = InstanceRef(refs[3].sop_instance_uid, refs[3].sop_class_uid, "1.2.3.9",
                            refs[3].transfer_syntax_uid, refs[3].size, "0" * 64, refs[3].url)
        with pytest.raises(TransferError, match=r"1\.2\.3\.3: got 100003 bytes with another SHA"):
            fetch_instances([*refs[:3], wrong, *refs[4:]], "1.2.3", tmp_path / "bad", TOKEN)
    finally:
        server.stop()
