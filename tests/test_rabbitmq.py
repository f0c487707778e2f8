"""The broker layer against a real RabbitMQ (Debian rabbitmq-server on loopback): quorum queues,
confirmed persistent messages, strict priority levels, redelivery, the delivery limit with its
dead-letter reason, and messages that survive a broker restart."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode.config import DeliveryConfig, RetryPolicy
from dicomnode.queue.messages import (
    InstanceRef,
    JobMessage,
    MessageError,
    OutcomeMessage,
    ResultFileMessage,
    decode_job,
    decode_outcome,
    decode_result_file,
    encode,
)
from dicomnode.queue.rabbitmq import Broker, BrokerSettings, death_reason
from dicomnode.queue.sqlite import SqliteJobQueue
from dicomnode.records import StoredInstance
from dicomnode.state import StateDB

from .brokers import SERVER, RabbitMQ, stored_instance

pytestmark = [
    pytest.mark.skipif(not SERVER.is_file(), reason="rabbitmq-server is not installed"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    with RabbitMQ(tmp_path_factory.mktemp("rabbitmq")) as broker:
        yield broker


def settings(rabbit: RabbitMQ, prefix: str, **changes: object) -> BrokerSettings:
    return BrokerSettings(url=rabbit.url, prefix=prefix, **changes)  # type: ignore[arg-type]


def job(job_id: int, priority: int = 1, site: str = "site-a") -> JobMessage:
    instance = InstanceRef("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.840.10008.1.2.1",
                           1234, "ab" * 32, "https://site-a:8443/instances/1.2.3.4")
    return JobMessage(site, job_id, 1, "1.2.3", 1, priority, (instance,), ())


def site_queue(db: StateDB, tmp_path: Path, max_attempts: int = 3) -> SqliteJobQueue:
    """A site's SQLite queue on ``db`` with one study of one instance queued (job 1)."""
    queue = SqliteJobQueue(db, stable_seconds=1, lease_seconds=3600, max_attempts=max_attempts,
                           delivery=DeliveryConfig(1, 2, 60, 10), job_retry=RetryPolicy(1, 2))
    db.record_instance(StoredInstance("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3",
                                      "1.2.3.9", "1.2.840.10008.1.2.1", tmp_path / "x.dcm",
                                      10, "ab" * 32, "MODALITY"), now=0)
    queue.enqueue_stable_studies(now=100)
    return queue


def test_messages_round_trip_and_refuse_what_they_do_not_know() -> None:
    message = job(7)
    assert decode_job(encode(message)) == message
    header = ResultFileMessage("site-a", 7, "sr", "1.2.840.10008.5.1.4.1.1.88.34", "1.2", "1.2.9",
                               "cd" * 32)
    outcome = OutcomeMessage("site-a", 7, 1, "1.2.3", 1, "results", (header,),
                             note="1 of 2 skipped")
    assert decode_result_file(encode(header)) == header
    assert decode_outcome(encode(outcome)) == outcome
    with pytest.raises(MessageError, match="unknown keys"):
        decode_job(encode(message).replace(b'"site"', b'"sites"'))
    with pytest.raises(MessageError, match="format"):
        decode_job(encode(message).replace(b'"format": 1', b'"format": 9'))
    with pytest.raises(MessageError, match="not JSON"):
        decode_outcome(b"\xff")


def test_jobs_come_most_urgent_first_and_are_redelivered_until_acknowledged(
    rabbit: RabbitMQ,
) -> None:
    s = settings(rabbit, "prio")
    with Broker(s) as site, Broker(s) as worker:
        site.declare_site("site-a")
        for job_id, priority in ((1, 1), (2, 1), (3, 0)):
            site.publish_job(job(job_id, priority))
        first = worker.get_job()
        assert first is not None and (first.message.job_id, first.level) == (3, 0)
        worker.ack(first.delivery_tag)
        second = worker.get_job()
        assert second is not None and second.message.job_id == 1 and second.deliveries == 1
        worker.give_back(second.delivery_tag)  # a retryable failure: comes back, counted
        again = worker.get_job()
        assert again is not None and again.message.job_id == 1 and again.deliveries == 2
        worker.ack(again.delivery_tag)
        third = worker.get_job()
        assert third is not None and third.message.job_id == 2
    # the worker's connection closed with job 2 unacknowledged: the broker gives it out again
    with Broker(s) as other:
        redelivered = other.get_job()
        assert redelivered is not None and redelivered.message.job_id == 2
        assert redelivered.deliveries == 2
        other.ack(redelivered.delivery_tag)
        assert other.get_job() is None


def test_a_job_over_its_delivery_limit_is_dead_lettered_to_its_site_with_the_reason(
    rabbit: RabbitMQ,
) -> None:
    s = settings(rabbit, "limit", delivery_limit=2)
    with Broker(s) as site, Broker(s) as worker:
        site.declare_site("site-a")
        site.declare_site("site-b")
        site.publish_job(job(5, site="site-a"))
        site.publish_job(job(6, site="site-b"))
        for _ in range(6):
            taken = worker.get_job()
            if taken is None:
                break
            worker.give_back(taken.delivery_tag)
        assert worker.get_job() is None  # both gave up after their deliveries
        dead: dict[str, list[tuple[int, str]]] = {"site-a": [], "site-b": []}
        for name in dead:
            site.drain(s.dead_queue(name), lambda p, body, name=name: dead[name].append(
                (decode_job(body).job_id, death_reason(p))))
        assert [j for j, _ in dead["site-a"]] == [5] and [j for j, _ in dead["site-b"]] == [6]
        assert "delivered the maximum number of times" in dead["site-a"][0][1]


def test_confirmed_messages_survive_a_broker_restart(tmp_path: Path) -> None:
    rabbit = RabbitMQ(tmp_path / "rabbitmq").start()
    try:
        s = BrokerSettings(url=rabbit.url, prefix="restart")
        with Broker(s) as site:
            site.declare_site("site-a")
            site.publish_job(job(11))
            header = ResultFileMessage("site-a", 11, "sc", "1.2.840.10008.5.1.4.1.1.7", "1.2",
                                       "1.2.10", "ef" * 32)
            site.publish_result_file(header, b"DICM-bytes")
        rabbit.stop()
        rabbit.start()  # the same data folder: quorum queues and persistent messages are back
        with Broker(s) as worker:
            taken = worker.get_job()
            assert taken is not None and taken.message.job_id == 11
            worker.ack(taken.delivery_tag)
            files: list[tuple[str, bytes]] = []
            worker.drain(s.results_queue("site-a"), lambda p, body: files.append(
                (decode_result_file(p.headers["header"].encode()).sop_instance_uid, body)))
            assert files == [("1.2.10", b"DICM-bytes")]
            (jobs, *_) = worker.stats([s.jobs_queue(0), s.jobs_queue(1)])
            assert jobs.messages == 0
    finally:
        rabbit.stop()


def test_a_job_whose_publication_fails_goes_back_to_the_site_queue_at_once(
    rabbit: RabbitMQ, tmp_path: Path
) -> None:
    """The dispatcher leases a job, then the broker connection is gone: the publish raises and
    the job is queued again at once (not after dispatch_seconds), its attempt not counted."""
    from dicomnode.queue.rabbitmq import BrokerError
    from dicomnode.queue.remote import BROKER_OWNER, JobDispatcher
    from dicomnode.records import JobState

    s = settings(rabbit, "release")
    with StateDB(tmp_path / "state.sqlite") as db:
        queue = site_queue(db, tmp_path, max_attempts=1)
        broker = Broker(s)
        broker.declare_site("site-a")
        dispatcher = JobDispatcher("site-a", queue, broker, "http://site-a:8080")
        broker.connection.close()
        with pytest.raises(BrokerError):
            dispatcher.dispatch_ready()
        job_id = db.query("SELECT job_id FROM jobs")[0][0]
        assert queue.job_state(job_id) == (JobState.QUEUED, None)
        with Broker(s) as again:
            dispatcher.broker = again
            assert dispatcher.dispatch_ready() == 1
            taken = again.get_job()
            assert taken is not None
            assert (taken.message.job_id, taken.message.attempt) == (job_id, 1)
            again.ack(taken.delivery_tag)
            assert queue.held_job(job_id, 1, BROKER_OWNER) is not None


def test_priority_rules_send_emergency_studies_to_the_most_urgent_level(
    rabbit: RabbitMQ, tmp_path: Path
) -> None:
    """[[queue.priority]] by calling AE title and by Station Name (read from the stored header):
    those studies are taken before an earlier routine one."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomnode.config import BrokerConfig, PriorityRuleConfig
    from dicomnode.queue.remote import JobDispatcher
    from dicomnode.queue.roles import priority_rules
    from dicomnode.records import StudyJob

    def stored(n: int, calling_ae: str, station: str) -> StoredInstance:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.{n}.1"
        ds.StationName = station
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return StoredInstance(f"1.2.{n}.1", "1.2.840.10008.5.1.4.1.1.1.1", f"1.2.{n}",
                              f"1.2.{n}.9", ExplicitVRLittleEndian, path, 10, "ab" * 32,
                              calling_ae)

    class NoQueue:  # message() needs no queue
        pass

    rules = priority_rules(BrokerConfig(url=rabbit.url, priority=(
        PriorityRuleConfig(0, calling_ae="ED_CR"), PriorityRuleConfig(0, station_name="ED-DR-1"),
    )))
    s = settings(rabbit, "rules")
    with Broker(s) as site, Broker(s) as worker:
        site.declare_site("site-a")
        dispatcher = JobDispatcher("site-a", NoQueue(), site, "http://a:1",  # type: ignore[arg-type]
                                   rules, default_priority=1)
        jobs = [
            StudyJob(1, "1.2.1", 1, 1, "broker", 0.0, (stored(1, "WARD", "DR-3"),), ()),
            StudyJob(2, "1.2.2", 1, 1, "broker", 0.0, (stored(2, "ED_CR", "DR-3"),), ()),
            StudyJob(3, "1.2.3", 1, 1, "broker", 0.0, (stored(3, "WARD", "ED-DR-1"),), ()),
        ]
        levels = [dispatcher.message(j).priority for j in jobs]
        assert levels == [1, 0, 0]
        for job in jobs:
            site.publish_job(dispatcher.message(job))
        order = []
        while (taken := worker.get_job()) is not None:
            order.append((taken.message.job_id, taken.level))
            worker.ack(taken.delivery_tag)
        assert order == [(2, 0), (3, 0), (1, 1)]


def test_broker_queues_are_metrics_and_an_unreachable_broker_is_down(
    rabbit: RabbitMQ, tmp_path: Path
) -> None:
    """What /metrics serves at a site: each queue's waiting messages, and broker_up 0 (not a
    failed scrape) when the broker does not answer."""
    from dicomnode.config import parse_config
    from dicomnode.demo import free_port
    from dicomnode.httpd import broker_stats
    from dicomnode.metrics import BrokerCollector

    from .brokers import PASSWORD, USER

    credentials = tmp_path / "credentials"
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    credentials.chmod(0o600)

    def config(port: int) -> object:
        return parse_config({"node": {"state_dir": str(tmp_path)}, "queue": {
            "backend": "rabbitmq", "url": f"amqp://127.0.0.1:{port}/%2F", "prefix": "metrics",
            "credentials_file": str(credentials), "site": "site-a"}}, tmp_path)

    with Broker(settings(rabbit, "metrics")) as site:
        site.declare_site("site-a")
        site.publish_job(job(1, priority=0))
        site.publish_job(job(2, priority=1))
        site.publish_job(job(3, priority=1))
    families = {f.name: f for f in BrokerCollector(
        lambda: broker_stats(config(rabbit.port))).collect()}  # type: ignore[arg-type]
    assert families["dicomnode_broker_up"].samples[0].value == 1
    waiting = {s.labels["queue"]: s.value for s in families[
        "dicomnode_broker_queue_messages"].samples}
    assert waiting == {"metrics.jobs.0": 1, "metrics.jobs.1": 2, "metrics.results.site-a": 0,
                       "metrics.dead.site-a": 0}
    down = list(BrokerCollector(lambda: broker_stats(config(free_port()))).collect())  # type: ignore[arg-type]
    assert [(f.name, f.samples[0].value) for f in down] == [("dicomnode_broker_up", 0)]


def test_a_job_longer_than_consumer_timeout_goes_to_another_worker_and_counts_once(
    tmp_path: Path,
) -> None:
    """RabbitMQ's consumer_timeout applies to a worker's unacknowledged job (basic.get): the
    broker closes its channel and gives the job to another worker. The slow worker cannot
    answer on the closed channel (it raises and reconnects in the role loop), so the site sees
    one outcome. Why docs/multi-host.md says to set consumer_timeout above the longest job."""
    import time

    from dicomnode.queue.messages import decode_outcome
    from dicomnode.queue.rabbitmq import BrokerError
    from dicomnode.queue.remote import BrokerWorker, Processed
    from dicomnode.queue.transfer import InstanceServer
    from dicomnode.records import StudyJob

    data = b"DICM" * 1000
    stored = stored_instance(tmp_path, data)
    digest = stored.sha256
    token = "consumer-timeout-test-token"
    rabbit = RabbitMQ(tmp_path / "rabbitmq", consumer_timeout_ms=1000, channel_tick_ms=500)
    server = InstanceServer("127.0.0.1", 0, lambda uid: stored, token).start()
    rabbit.start()
    try:
        s = BrokerSettings(url=rabbit.url, prefix="timeout")
        ref = InstanceRef("1.2.3.4", stored.sop_class_uid, "1.2.3.9", stored.transfer_syntax_uid,
                          len(data), digest, f"http://127.0.0.1:{server.port}/instances/1.2.3.4")
        with Broker(s) as site:
            site.declare_site("site-a")
            site.publish_job(JobMessage("site-a", 9, 1, "1.2.3", 1, 1, (ref,), ()))

        def slow(job: StudyJob, folder: Path) -> Processed:
            time.sleep(4)  # well past consumer_timeout and a few channel ticks
            return Processed((), None)

        def fast(job: StudyJob, folder: Path) -> Processed:
            return Processed((), None)

        with Broker(s) as first, Broker(s) as second:
            with pytest.raises(BrokerError):
                BrokerWorker(first, "slow", token, slow, scratch=tmp_path).run_once()
            taken = second.get_job()
            assert taken is not None and taken.deliveries == 2
            second.give_back(taken.delivery_tag)
            assert BrokerWorker(second, "fast", token, fast, scratch=tmp_path).run_once()
        with Broker(s) as site:
            outcomes: list[tuple[str, int]] = []

            def answered(properties: object, body: bytes) -> None:
                outcome = decode_outcome(body)
                outcomes.append((outcome.worker, outcome.deliveries))

            site.drain(s.results_queue("site-a"), answered)
            assert outcomes == [("fast", 3)]  # the answer says how often the broker delivered
    finally:
        server.stop()
        rabbit.stop()


def test_result_intake_records_one_outcome_and_drops_what_it_cannot_use(
    rabbit: RabbitMQ, tmp_path: Path
) -> None:
    """The site's intake against a real broker and the real SQLite queue: a result file whose
    bytes do not match its SHA-256, or are not DICOM, is dropped (never redelivered forever);
    an outcome naming a dropped file leaves the job to be published again; a good answer
    completes the job with one delivery; the same answer again is a counted duplicate."""
    import hashlib

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from dicomnode.queue.remote import BROKER_OWNER, ResultIntake
    from dicomnode.records import Destination, JobState

    def result_bytes(uid: str) -> bytes:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID, ds.SOPInstanceUID = "1.2.3", uid
        path = tmp_path / f"{uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path.read_bytes()

    def header(uid: str, data: bytes) -> ResultFileMessage:
        return ResultFileMessage("site-a", 1, "sr", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.9", uid,
                                 hashlib.sha256(data).hexdigest())

    s = settings(rabbit, "intake")
    pacs = Destination("PACS", "127.0.0.1", 104)
    with StateDB(tmp_path / "state.sqlite") as db, Broker(s) as site, Broker(s) as worker:
        queue = site_queue(db, tmp_path, max_attempts=3)
        job_ = queue.lease(BROKER_OWNER)
        assert job_ is not None and job_.job_id == 1
        site.declare_site("site-a")
        intake = ResultIntake("site-a", queue, site, tmp_path / "results", [pacs])
        good = result_bytes("1.2.9.1")
        worker.publish_result_file(header("1.2.9.1", good), good[:-1] + bytes([good[-1] ^ 0xFF]))
        worker.publish_result_file(header("1.2.9.2", b"not DICOM"), b"not DICOM")
        incomplete = OutcomeMessage("site-a", 1, 1, "1.2.3", 1, "results",
                                    (header("1.2.9.1", good),), worker="w")
        worker.publish_outcome(incomplete)
        assert intake.drain() == 3
        assert queue.job_state(1)[0] is JobState.LEASED  # waits to be published again
        assert db.recent_studies()[0].broker_deliveries is None and db.redelivered_jobs() == 0
        worker.publish_result_file(header("1.2.9.1", good), good)
        answer = dataclasses.replace(incomplete, deliveries=2)  # after a worker died with it
        worker.publish_outcome(answer)
        worker.publish_outcome(answer)  # the same job answered twice (run twice)
        assert intake.drain() == 3
        assert queue.job_state(1)[0] is JobState.RESULTS_WRITTEN
        assert intake.counts.duplicates == 1 and intake.counts.files == 1
        # the broker's redelivery is recorded once, for status
        assert intake.counts.redelivered == 1 and db.redelivered_jobs() == 1
        assert db.recent_studies()[0].broker_deliveries == 2
        assert (tmp_path / "results" / "1.2.3" / "job-1" / "1.2.9.1.dcm").read_bytes() == good
        assert [d.destination for d in db.recent_deliveries()] == [pacs]
        assert site.drain(s.results_queue("site-a"), lambda p, b: None) == 0


def test_a_job_the_pool_gives_up_on_fails_at_its_site_with_the_reason_and_can_be_retried(
    rabbit: RabbitMQ, tmp_path: Path
) -> None:
    """Dispatcher, broker and intake together: a job given back at every delivery is
    dead-lettered at the delivery limit; the site marks it failed with the broker's reason;
    `dicomnode retry` (JobQueue.retry) queues it again and it is published as a new attempt."""
    from dicomnode.queue.remote import JobDispatcher, ResultIntake
    from dicomnode.records import JobState

    s = settings(rabbit, "giveup", delivery_limit=2)
    with StateDB(tmp_path / "state.sqlite") as db, Broker(s) as site, Broker(s) as worker:
        queue = site_queue(db, tmp_path, max_attempts=3)
        site.declare_site("site-a")
        dispatcher = JobDispatcher("site-a", queue, site, "http://site-a:8080")
        intake = ResultIntake("site-a", queue, site, tmp_path / "results", [])
        assert dispatcher.dispatch_ready() == 1
        deliveries = []
        while (taken := worker.get_job()) is not None:
            deliveries.append(taken.deliveries)
            worker.give_back(taken.delivery_tag)
        assert deliveries == [1, 2, 3]  # RabbitMQ 3.10: dead-lettered after limit + 1
        assert intake.drain() == 1 and intake.counts.dead == 1
        state, reason = queue.job_state(1)
        assert state is JobState.FAILED
        assert reason is not None and "delivered the maximum number of times" in reason
        assert queue.retry() == 1
        assert dispatcher.dispatch_ready() == 1
        again = worker.get_job()
        assert again is not None and (again.message.job_id, again.message.attempt) == (1, 1)
        assert again.deliveries == 1
        worker.ack(again.delivery_tag)
