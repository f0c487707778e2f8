"""Several hosts on one machine (issue 14): a site's listener, two GPU-pool workers, the broker
and the PACS each in its own network namespace (``tests/netns.py``), so every byte between the
roles crosses a network: jobs and results through a real RabbitMQ, pixels over the site's
instance server (HTTP), results to a real Orthanc by DICOM from the site. The modality (DCMTK
``storescu``) sends from the test machine's address on the same network.

Faults while studies stream in: one worker is SIGKILLed in the middle of a job (its job must be
redelivered by the broker to the other worker), and the broker is stopped and started again
(the site and the workers must reconnect; confirmed messages survive in its quorum queues).
Then: every instance the listener acknowledged was analysed, every study has exactly one
current result at the PACS (one SR, one SC per instance, nothing withdrawn), the site's queue
and every broker queue are empty. Counts go to ``tests/faults/results/multihost.json``.

Needs root (network namespaces; CI runs as root), iproute2, rabbitmq-server, Orthanc and DCMTK.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomnode.demo import ORTHANC, OrthancPacs, Patient, free_port
from dicomnode.queue.rabbitmq import Broker, BrokerSettings
from dicomnode.records import JobState
from dicomnode.state import StateDB
from tests import netns
from tests.brokers import PASSWORD, SERVER, USER, RabbitMQ
from tests.faults.conftest import record_counts, save, small_dx
from tests.test_node_e2e import NODE_AE, STORESCU, leaked_patient_data, positive_weights

pytestmark = [
    pytest.mark.skipif(not netns.available(), reason="needs root and iproute2 (namespaces)"),
    pytest.mark.skipif(not netns.usable(), reason="network namespaces cannot be created here"),
    pytest.mark.skipif(not SERVER.is_file(), reason="rabbitmq-server is not installed"),
    pytest.mark.skipif(not ORTHANC.is_file(), reason="Orthanc is not installed"),
    pytest.mark.slow,
    pytest.mark.dicom_peers,
    pytest.mark.timeout(900),
]

SITE = "site-a"
PREFIX = "mh"
TOKEN = "multihost-instance-token-0123456789"
STUDIES = 6
VIEWS_PER_STUDY = 2
SR_CLASSES = {ComprehensiveSRStorage, EnhancedSRStorage, "1.2.840.10008.5.1.4.1.1.88.34"}


class NamespacedOrthanc(OrthancPacs):
    """Orthanc in a host's namespace; its REST API answers on the host's address (the test
    network is private to this test)."""

    def __init__(self, workdir: Path, host: netns.Host, allowed: list[tuple[str, str]]) -> None:
        super().__init__(workdir, ae_title="ORTHANC", allowed=allowed)
        self.host = host

    def configuration(self) -> dict[str, Any]:
        return {**super().configuration(), "RemoteAccessAllowed": True}

    def url(self, path: str) -> str:
        return f"http://{self.host.address}:{self.http_port}{path}"

    def start(self, timeout: float = 60.0) -> NamespacedOrthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.configuration(), indent=2))
        with self.log_path.open("wb") as log:
            self.process = self.host.popen([str(ORTHANC), str(config)], log=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_tail()
            try:
                self.rest("/system")
                return self
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"Orthanc did not answer: {self.log_tail()}")


@dataclass
class Role:
    """One ``dicomnode`` process in a namespace, with its JSON log."""

    name: str
    host: netns.Host
    command: str
    config: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Role:
        with self.log_path.open("ab") as log:
            self.process = self.host.popen(
                [sys.executable, "-m", "dicomnode", self.command, "--config", str(self.config)],
                log=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(errors="replace").splitlines()
        found = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in found if name is None or e.get("event") == name]

    def ready_count(self) -> int:
        return len(self.events("service_ready"))

    def wait_ready(self, count: int = 1, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ready_count() < count:
            assert self.process is not None and self.process.poll() is None, self.tail()
            assert time.monotonic() < deadline, f"{self.name} not ready: {self.tail()}"
            time.sleep(0.2)

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-25:])


def broker_table(rabbit: RabbitMQ, credentials: Path, token: Path, extra: str = "") -> str:
    return (
        f'[queue]\nbackend = "rabbitmq"\nurl = "amqp://{rabbit.bind}:{rabbit.port}/%2F"\n'
        f'credentials_file = "{credentials}"\nprefix = "{PREFIX}"\nsite = "{SITE}"\n'
        f"delivery_limit = 5\ndispatch_seconds = 900\nheartbeat_seconds = 10\n{extra}\n"
        f'[queue.instances]\ntoken_file = "{token}"\n'
    )


def site_config(folder: Path, site: netns.Host, pacs: NamespacedOrthanc, broker: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = (
        f'[node]\nae_title = "{NODE_AE}"\nbind = "{site.address}"\nport = 11112\n'
        f'state_dir = "state"\nreceive_processes = 1\n\n'
        "[study]\nstable_seconds = 2\n\n[http]\nenabled = false\n\n"
        "[delivery]\nretry_initial_seconds = 0.5\nretry_max_seconds = 2\n\n"
        f'[[destinations]]\nae_title = "ORTHANC"\nhost = "{pacs.host.address}"\n'
        f"port = {pacs.dicom_port}\n\n{broker}"
        f'bind = "{site.address}"\nport = {port}\nurl = "http://{site.address}:{port}"\n'
    )
    path = folder / "node.toml"
    path.write_text(text)
    return path


def worker_config(folder: Path, weights: Path, broker: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (
        '[node]\nstate_dir = "state"\n\n[http]\nenabled = false\n\n'
        f'[inference]\nweights = "{weights}"\ndevice = "cpu"\n\n{broker}'
    )
    path = folder / "node.toml"
    path.write_text(text)
    return path


def study_files(folder: Path, index: int) -> tuple[str, list[Path]]:
    study = generate_uid()
    series = generate_uid()
    files = []
    for view in range(VIEWS_PER_STUDY):
        ds = small_dx(index * VIEWS_PER_STUDY + view, study_uid=study, series_uid=series)
        files.append(save(ds, folder / f"study-{index}" / f"{view}.dcm"))
    return study, files


def storescu(site: netns.Host, files: list[Path]) -> subprocess.CompletedProcess[str]:
    command = [STORESCU, "-aec", NODE_AE, "-aet", "MODALITY", site.address, "11112"]
    return subprocess.run(
        [*command, *map(str, files)], capture_output=True, text=True, timeout=120
    )


def jobs_taken(worker: Role) -> set[str]:
    return {str(e["job"]) for e in worker.events("job_taken")}


def jobs_answered(worker: Role) -> set[str]:
    return {str(e["job"]) for e in worker.events("job_answered")}


def kill_mid_job(worker: Role, timeout: float = 240.0) -> str | None:
    """SIGKILL ``worker`` while it runs a job (taken, not yet answered): that job's key, or None
    when the job was answered in the moment before the kill (the caller tries again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = jobs_taken(worker) - jobs_answered(worker)
        if running:
            worker.kill()
            unanswered = running - jobs_answered(worker)
            return sorted(unanswered)[0] if unanswered else None
        assert worker.process is not None and worker.process.poll() is None, worker.tail()
        time.sleep(0.02)
    raise AssertionError(f"{worker.name} took no job: {worker.tail()}")


def site_jobs(state_db: Path) -> list[tuple[str, int, str, str | None]]:
    with StateDB(state_db) as db:
        rows = db.query("SELECT study_uid, version, state, note FROM jobs ORDER BY job_id")
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def acknowledged_instances(state_db: Path) -> dict[str, int]:
    with StateDB(state_db) as db:
        rows = db.query("SELECT study_uid, COUNT(*) FROM instances GROUP BY study_uid")
    return {r[0]: r[1] for r in rows}


@contextmanager
def stopping(*roles: Role) -> Iterator[None]:
    try:
        yield
    finally:
        for role in roles:
            role.stop()


def test_studies_flow_through_the_pool_while_a_worker_dies_and_the_broker_restarts(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    weights = positive_weights(tmp_path_factory.mktemp("mh-weights") / "ensemble")
    credentials, token = tmp_path / "broker.credentials", tmp_path / "instances.token"
    credentials.write_text(f"{USER}:{PASSWORD}\n")
    token.write_text(TOKEN + "\n")
    for secret in (credentials, token):
        secret.chmod(0o600)
    t_start = time.monotonic()
    with ExitStack() as stack:
        net = stack.enter_context(netns.Network())
        broker_host, pacs_host = net.host("broker"), net.host("pacs")
        site_host, w1_host, w2_host = net.host("site"), net.host("w1"), net.host("w2")
        rabbit = RabbitMQ(tmp_path / "rabbitmq", bind=broker_host.address)
        rabbit.start(prefix=broker_host.prefix())
        stack.callback(rabbit.stop)
        pacs = NamespacedOrthanc(tmp_path / "orthanc", pacs_host, [(NODE_AE, site_host.address)])
        pacs.start()
        stack.callback(pacs.stop)
        broker = broker_table(rabbit, credentials, token)
        site = Role("site", site_host, "serve",
                    site_config(tmp_path / "site", site_host, pacs, broker),
                    tmp_path / "site.log")
        w1 = Role("w1", w1_host, "work", worker_config(tmp_path / "w1", weights, broker),
                  tmp_path / "w1.log")
        w2 = Role("w2", w2_host, "work", worker_config(tmp_path / "w2", weights, broker),
                  tmp_path / "w2.log")
        stack.enter_context(stopping(site, w1, w2))
        site.start()
        w1.start()
        w2.start()
        site.wait_ready()
        w1.wait_ready()
        w2.wait_ready()
        t_ready = time.monotonic()

        studies: dict[str, int] = {}
        refused: list[str] = []

        def send() -> None:
            study, files = study_files(tmp_path / "studies", len(studies) + len(refused))
            run = storescu(site_host, files)
            if run.returncode == 0:
                studies[study] = len(files)
            else:
                refused.append(run.stdout + run.stderr)

        # Phase 1: studies stream in; one worker is killed in the middle of a job (again on a
        # new study if the kill came just after the job was answered).
        for _ in range(3):
            send()
        killed_job, restarts = None, 0
        while killed_job is None:
            killed_job = kill_mid_job(w1)
            w1.start()  # the killed worker comes back (systemd would restart it)
            restarts += 1
            if killed_job is None:
                assert restarts < 4, "never caught a worker in the middle of a job"
                w1.wait_ready(count=restarts + 1)
                send()
        # Phase 2: the broker restarts while more studies arrive at the site.
        send()
        rabbit.stop()
        send()  # the listener keeps receiving while the broker is down
        time.sleep(3)
        rabbit.start(prefix=broker_host.prefix())
        while len(studies) + len(refused) < STUDIES:
            send()
        assert refused == [] and len(studies) >= STUDIES

        state_db = tmp_path / "site" / "state" / "state.sqlite"

        def finished() -> bool:
            jobs = site_jobs(state_db)
            done = {s for s, _, state, _ in jobs if state == JobState.DELIVERED}
            return done >= set(studies) and all(
                state in (JobState.DELIVERED, JobState.FAILED) for _, _, state, _ in jobs
            )

        deadline = time.monotonic() + 420
        while not finished():
            assert time.monotonic() < deadline, (
                f"not finished: {site_jobs(state_db)}\n--- site\n{site.tail()}\n--- w2\n"
                f"{w2.tail()}"
            )
            assert site.process is not None and site.process.poll() is None, site.tail()
            time.sleep(0.5)
        t_done = time.monotonic()

        # Every acknowledged instance was recorded, and analysed (no view left out).
        acknowledged = acknowledged_instances(state_db)
        assert acknowledged == studies
        jobs = site_jobs(state_db)
        assert [j for j in jobs if j[2] != JobState.DELIVERED] == []
        assert all(note is None for _, _, _, note in jobs), jobs
        # Exactly one current result per study at the PACS: one SR, one SC per instance.
        at_pacs: dict[str, dict[str, int]] = {}
        for study, count in studies.items():
            objects = pacs.received(study)
            classes = [o.sop_class_uid for o in objects]
            srs = sum(1 for c in classes if c in SR_CLASSES)
            scs = sum(1 for c in classes if c == SecondaryCaptureImageStorage)
            at_pacs[study] = {"objects": len(objects), "sr": srs, "sc": scs}
            assert srs == 1, (study, classes)
            assert scs == count, (study, classes)
            assert len(objects) == srs + scs, (study, classes)  # nothing withdrawn or extra
        # Nothing stuck in the broker: job levels, the site's results and dead letters empty.
        settings = BrokerSettings(url=rabbit.url, prefix=PREFIX)
        with Broker(settings) as admin:
            names = [settings.jobs_queue(0), settings.jobs_queue(1),
                     settings.results_queue(SITE), settings.dead_queue(SITE)]
            depths = {s.name: s.messages for s in admin.stats(names)}
        assert set(depths.values()) == {0}, depths
        # dicomnode status at the site shows the broker's queues (all empty now).
        shown = site_host.exec(sys.executable, "-m", "dicomnode", "status", "--json",
                               "--config", str(site.config))
        status = json.loads(shown.stdout)
        broker_status = status["broker"]
        # a site runs no worker: ready on its listener, disk and destination alone
        assert status["ready"], status["checks"]
        assert not any(c["name"].startswith("worker") for c in status["checks"])
        assert broker_status["error"] is None
        assert {q["name"]: q["messages"] for q in broker_status["queues"]} == depths
        # ... and the jobs the broker had to deliver again (the killed worker's at least)
        assert broker_status["redelivered_jobs"] >= 1, broker_status
        # The killed worker's job was delivered again (to the other worker, or to the killed one
        # once it was back), and answered.
        takes = [e for w in (w1, w2) for e in w.events("job_taken") if e["job"] == killed_job]
        assert max(int(e["deliveries"]) for e in takes) >= 2, takes
        assert killed_job in jobs_answered(w1) | jobs_answered(w2)
        # Both the site and the workers met the broker's absence and came back.
        assert site.events("broker_unavailable")
        # No patient data in any role's log.
        for role in (site, w1, w2):
            assert leaked_patient_data(role.log_path.read_text(errors="replace"), Patient()) == []
        redeliveries = sum(
            1 for w in (w1, w2) for e in w.events("job_taken") if int(e["deliveries"]) > 1
        )
        counts = record_counts(
            "multihost",
            {
                "studies": len(studies),
                "instances_acknowledged": sum(acknowledged.values()),
                "jobs": len(jobs),
                "jobs_delivered": sum(1 for j in jobs if j[2] == JobState.DELIVERED),
                "objects_at_pacs": sum(v["objects"] for v in at_pacs.values()),
                "killed_job": killed_job,
                "worker_kills": restarts,
                "redeliveries": redeliveries,
                "redelivered_jobs_in_status": broker_status["redelivered_jobs"],
                "jobs_answered_w1": len(jobs_answered(w1)),
                "jobs_answered_w2": len(jobs_answered(w2)),
                "duplicate_outcomes": len(site.events("job_outcome_duplicate")),
                "site_broker_reconnects": len(site.events("broker_unavailable")),
                "worker_broker_reconnects": len(w2.events("broker_unavailable")),
                "broker_queue_depths": depths,
                "seconds_to_ready": round(t_ready - t_start, 1),
                "seconds_streaming_to_done": round(t_done - t_ready, 1),
            },
        )
        assert counts["jobs_delivered"] == len(studies)
