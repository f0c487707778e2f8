"""Readiness checks, the facts files, the scrape-time metrics, multi-process counting, the HTTP
server, ``dicomnode check-config`` and the readiness part of ``dicomnode status``.

Real things throughout: a real state database, real spawned processes writing multi-process
metric files, a real HTTP(S) server on a free loopback port (certificates made with the
``openssl`` CLI), the shipped ensemble's manifest.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.cli import collect_status, main, status_json, status_text
from dicomnode.config import Config, ConfigError, HttpConfig, parse_config
from dicomnode.health import (
    ROLE_COMPONENTS,
    Check,
    Health,
    Observation,
    RoleFacts,
    evaluate,
    read_facts,
    remove_facts,
    write_facts,
)
from dicomnode.httpd import HttpEndpoint, https_context
from dicomnode.metrics import NodeCollector
from dicomnode.records import DeliveryState, QueueDepth
from dicomnode.state import DestinationSummary, StateDB
from dicomnode.storage import StateLayout
from tests.conftest import REPO

PACS, ARCHIVE = "PACS@10.0.0.1:104", "ARCHIVE@10.0.0.2:11112"
NOW = 1_800_000_000.0


def make_config(tmp_path: Path, **node: object) -> Config:
    raw = {
        "node": {"state_dir": str(tmp_path / "state"), **node},
        "queue": {"lease_seconds": 60},
        "destinations": [
            {"ae_title": "PACS", "host": "10.0.0.1", "port": 104},
            {"ae_title": "ARCHIVE", "host": "10.0.0.2", "port": 11112},
        ],
    }
    return parse_config(raw, tmp_path)


def serve_facts(**changes: Any) -> RoleFacts:
    values: dict[str, Any] = {
        "role": "serve",
        "pid": 4711,
        "reported_at": NOW,
        "dicom_port": 11112,
        "listener_age": 0.5,
        "worker_ready": True,
        "worker_age": 1.0,
    }
    return RoleFacts(**{**values, **changes})


def summary(
    destination: str, last: DeliveryState | None, error: str | None = None
) -> DestinationSummary:
    return DestinationSummary(
        destination=destination,
        pending=int(last is DeliveryState.PENDING),
        delivered=int(last is DeliveryState.DELIVERED),
        failed=int(last is DeliveryState.FAILED),
        retrying_attempts=2 if last is DeliveryState.PENDING else 0,
        last_state=last,
        last_at=None if last is None else NOW - 30,
        last_error=error,
    )


def states(found: Health) -> dict[str, bool]:
    return {check.name: check.ok for check in found.checks}


# -- the readiness checks ----------------------------------------------------------------------


def test_a_healthy_serve_is_ready_and_every_check_says_why(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    found = evaluate(config, [serve_facts()], 10**12, [], NOW)
    assert found.ready
    assert states(found) == {
        "dicom_listener": True,
        "worker_ready": True,
        "worker_heartbeat": True,
        "disk": True,
        f"destination:{PACS}": True,
        f"destination:{ARCHIVE}": True,
    }
    details = {c.name: c.detail for c in found.checks}
    assert (
        details["dicom_listener"] == "listening as FRACTURE_AI on 127.0.0.1:11112 (serve, pid 4711)"
    )
    assert details[f"destination:{PACS}"] == "nothing sent yet"  # counts as ready
    assert found.as_json()["ready"] is True
    assert [c["state"] for c in found.as_json()["checks"]] == ["ok"] * 6


@pytest.mark.parametrize(
    ("facts", "free", "failing"),
    [
        ([], 10**12, ["dicom_listener", "worker_ready", "worker_heartbeat"]),
        ([serve_facts(dicom_port=None)], 10**12, ["dicom_listener"]),
        ([serve_facts(listener_age=61.0)], 10**12, ["dicom_listener"]),
        ([serve_facts(worker_ready=False)], 10**12, ["worker_ready"]),
        ([serve_facts(worker_age=60.0)], 10**12, ["worker_heartbeat"]),
        ([serve_facts()], 256 * 2**20 - 1, ["disk"]),
    ],
)
def test_each_missing_fact_fails_its_check(
    tmp_path: Path, facts: list[RoleFacts], free: int, failing: list[str]
) -> None:
    found = evaluate(make_config(tmp_path), facts, free, [], NOW)
    assert not found.ready
    assert [c.name for c in found.failing()] == failing


def test_a_destination_fails_until_its_last_attempt_delivers(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    down = summary(PACS, DeliveryState.PENDING, "cannot connect to PACS@10.0.0.1:104")
    found = evaluate(config, [serve_facts()], 10**12, [down, summary(ARCHIVE, None)], NOW)
    (check,) = found.failing()
    assert check.name == f"destination:{PACS}"
    assert "will be retried" in check.detail and "cannot connect" in check.detail
    gone = summary(PACS, DeliveryState.FAILED, "SOP class refused")
    assert (
        "failed (attempt at"
        in evaluate(config, [serve_facts()], 10**12, [gone], NOW).failing()[0].detail
    )
    back = summary(PACS, DeliveryState.DELIVERED)
    assert evaluate(config, [serve_facts()], 10**12, [back], NOW).ready


def test_each_role_checks_what_it_runs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    listen = RoleFacts("listen", 1, NOW, dicom_port=11112, listener_age=0.1)
    work = RoleFacts("work", 2, NOW, worker_ready=True, worker_age=0.1)
    only_listen = evaluate(config, [listen], 10**12, [], NOW, ROLE_COMPONENTS["listen"])
    assert list(states(only_listen)) == ["dicom_listener", "disk"] and only_listen.ready
    only_work = evaluate(config, [work], 10**12, [], NOW, ROLE_COMPONENTS["work"])
    assert list(states(only_work))[:3] == ["worker_ready", "worker_heartbeat", "disk"]
    assert only_work.ready
    # status judges every part from both roles' reports (a split deployment)
    assert evaluate(config, [listen, work], 10**12, [], NOW).ready
    assert not evaluate(config, [work], 10**12, [], NOW).ready
    broken = evaluate(config, [serve_facts()], 10**12, [], NOW, database_error="locked")
    assert [c.name for c in broken.failing()] == ["state_database"]
    assert not any(c.name.startswith("destination:") for c in broken.checks)


def test_facts_files_count_only_while_fresh_and_their_process_lives(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    now = time.time()
    mine = RoleFacts("serve", os.getpid(), now, dicom_port=11112, listener_age=0.2)
    write_facts(state, mine)
    assert read_facts(state, now + 1) == (mine,)
    assert read_facts(state, now + 11) == ()  # stale: the role stopped writing
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    write_facts(state, RoleFacts("work", int(dead.stdout), now, worker_age=0.1))
    (state / "health" / "listen.json").write_text("{not json")
    assert read_facts(state, now + 1) == (mine,)  # a dead process's report, and garbage, skipped
    assert mine.aged(now + 2).listener_age == pytest.approx(2.2)
    remove_facts(state, "serve")
    assert read_facts(state, now + 1) == ()


# -- the state database and the scrape-time metrics ----------------------------------------------


def populated_db(tmp_path: Path) -> StateDB:
    """Deliveries to PACS: one delivered, one retried twice and pending, one claimed but not yet
    attempted; to ARCHIVE: one delivered after three attempts."""
    db = StateLayout(tmp_path / "state").open_db()
    with db.transaction() as conn:
        conn.execute("INSERT INTO studies VALUES ('1.2.3', 0, 0, 1, 1)")
        for job in (1, 2, 3):
            conn.execute(
                "INSERT INTO jobs (job_id, study_uid, version, state, created_at, updated_at) "
                "VALUES (?, '1.2.3', ?, 'results_written', 0, 0)",
                (job, job),
            )
        rows = [
            (1, "PACS", "10.0.0.1", 104, "delivered", 1, None, 100.0),
            (2, "PACS", "10.0.0.1", 104, "pending", 2, "cannot connect", 200.0),
            (3, "PACS", "10.0.0.1", 104, "pending", 0, None, 300.0),
            (1, "ARCHIVE", "10.0.0.2", 11112, "delivered", 3, None, 50.0),
        ]
        conn.executemany(
            "INSERT INTO deliveries (job_id, dest_ae, dest_host, dest_port, state, attempts, "
            "next_attempt_at, last_error, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, "
            "0, ?)",
            rows,
        )
    return db


def test_destination_summaries_count_states_backoff_and_the_last_attempt(tmp_path: Path) -> None:
    with populated_db(tmp_path) as db:
        found = {s.destination: s for s in db.destination_summaries()}
    assert found[PACS] == DestinationSummary(
        destination=PACS,
        pending=2,
        delivered=1,
        failed=0,
        retrying_attempts=2,
        last_state=DeliveryState.PENDING,  # the claimed one was not attempted: not the last
        last_at=200.0,
        last_error="cannot connect",
    )
    assert found[PACS].last_failed
    assert found[ARCHIVE].last_state is DeliveryState.DELIVERED and not found[ARCHIVE].last_failed


def scrape(collector: NodeCollector) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return values


def test_scrape_time_metrics_come_from_one_observation(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with populated_db(tmp_path) as db:
        destinations = db.destination_summaries()
    depth = QueueDepth(2, 1, 3, 4, 5, 2, 0)
    found = evaluate(config, [serve_facts()], 10**12, destinations, NOW)
    seen = Observation(NOW, depth, destinations, 10**12, 10**11, (serve_facts(),), found)
    values = scrape(NodeCollector(config, lambda: seen))
    assert values["dicomnode_jobs"] == {
        (("state", s),): float(n)
        for s, n in (
            ("queued", 2),
            ("leased", 1),
            ("results_written", 3),
            ("delivered", 4),
            ("failed", 5),
        )
    }
    assert values["dicomnode_deliveries"][(("destination", PACS), ("state", "pending"))] == 2
    assert values["dicomnode_deliveries"][(("destination", ARCHIVE), ("state", "delivered"))] == 1
    backoff = values["dicomnode_delivery_backoff_seconds"]
    assert backoff[(("destination", PACS),)] == config.delivery.backoff(2) == 60.0
    assert backoff[(("destination", ARCHIVE),)] == 0.0
    assert values["dicomnode_disk_free_bytes"] == {
        (("volume", "state"),): 1e12,
        (("volume", "spool"),): 1e11,
    }
    assert values["dicomnode_disk_min_free_bytes"][()] == 256 * 2**20
    assert values["dicomnode_ready"][()] == 0.0
    assert values["dicomnode_health_check"][(("check", f"destination:{PACS}"),)] == 0.0
    assert values["dicomnode_health_check"][(("check", "dicom_listener"),)] == 1.0
    assert values["dicomnode_worker_heartbeat_age_seconds"][()] == 1.0
    assert list(values["dicomnode_build_info"]) == [(("version", "0.1.0"),)]


MULTIPROCESS_SCRIPT = """
import json, multiprocessing, sys
from pathlib import Path
from dicomnode import metrics

def child():
    metrics.process_started("receiver_1", ["listener"])
    metrics.instance_answered(0x0000, "new", 1000)
    metrics.associations_open(3)

if __name__ == "__main__":
    metrics.prepare_multiprocess(Path(sys.argv[1]))
    from prometheus_client import generate_latest
    metrics.process_started("serve", ["listener"])
    metrics.instance_answered(0xA700, "not_stored", 500)
    process = multiprocessing.get_context("spawn").Process(target=child)
    process.start()
    process.join()
    scrapes = [generate_latest(metrics.build_registry()).decode()]
    metrics.process_died(process.pid)
    scrapes.append(generate_latest(metrics.build_registry()).decode())
    print(json.dumps(scrapes))
"""


def test_a_dead_childs_counts_stay_and_its_gauges_go(tmp_path: Path) -> None:
    script = tmp_path / "multiprocess_metrics.py"
    script.write_text(MULTIPROCESS_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "metrics")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr
    before, after = json.loads(run.stdout)

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    for text in (before, after):  # the child's counts are summed in, before and after it died
        found = samples(text)
        assert (
            found[
                ("dicomnode_instances_received_total", (("outcome", "new"), ("status", "0x0000")))
            ]
            == 1
        )
        key = (
            "dicomnode_instances_received_total",
            (("outcome", "not_stored"), ("status", "0xA700")),
        )
        assert found[key] == 1
        assert found[("dicomnode_received_bytes_total", ())] == 1500
    assert samples(before)[("dicomnode_associations_open", ())] == 3  # not yet marked dead
    assert samples(after)[("dicomnode_associations_open", ())] == 0
    starts = [k for k in samples(after) if k[0] == "dicomnode_process_start_time_seconds"]
    assert starts == [("dicomnode_process_start_time_seconds", (("process", "serve"),))]
    assert any(k[0] == "process_start_time_seconds" for k in samples(after))  # the scraper's own


# -- the HTTP server -----------------------------------------------------------------------------


class Endpoints:
    """Fixed answers, to test the server alone."""

    def __init__(self) -> None:
        self.ready = False

    def metrics(self) -> tuple[bytes, str]:
        return b"fake_metric 1.0\n", "text/plain; version=0.0.4; charset=utf-8"

    def liveness(self) -> dict[str, Any]:
        return {"alive": True}

    def readiness(self) -> Health:
        return Health((Check("x", True, "fine"), Check("y", self.ready, "what was found")))


def fetch(
    url: str, context: ssl.SSLContext | None = None, method: str = "GET"
) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


@pytest.fixture()
def endpoint() -> Iterator[tuple[HttpEndpoint, Endpoints]]:
    answers = Endpoints()
    running = HttpEndpoint(HttpConfig(port=0), 0, answers).start()
    try:
        yield running, answers
    finally:
        running.stop()


def test_the_server_answers_each_path(endpoint: tuple[HttpEndpoint, Endpoints]) -> None:
    running, answers = endpoint
    base = f"http://127.0.0.1:{running.port}"
    assert fetch(base + "/metrics") == (
        200,
        "text/plain; version=0.0.4; charset=utf-8",
        b"fake_metric 1.0\n",
    )
    status, kind, body = fetch(base + "/healthz")
    assert (status, kind, json.loads(body)) == (200, "application/json", {"alive": True})
    status, _, body = fetch(base + "/readyz")
    assert status == 503
    assert json.loads(body) == {
        "ready": False,
        "checks": [
            {"name": "x", "ok": True, "state": "ok", "detail": "fine"},
            {"name": "y", "ok": False, "state": "failing", "detail": "what was found"},
        ],
    }
    answers.ready = True
    assert fetch(base + "/readyz?verbose=1")[0] == 200
    assert fetch(base + "/readyz", method="HEAD")[::2] == (200, b"")
    status, _, body = fetch(base + "/elsewhere")
    assert status == 404 and json.loads(body)["paths"] == ["/metrics", "/healthz", "/readyz"]
    assert fetch(base + "/metrics", method="POST")[0] == 501


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
    )
    key.chmod(0o600)
    return cert, key


def test_https_only_and_a_stalled_client_blocks_no_one(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "http")
    http = HttpConfig(port=0, certificate=cert, private_key=key)
    running = HttpEndpoint(http, 0, Endpoints()).start()
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        url = f"https://127.0.0.1:{running.port}/healthz"
        with socket.create_connection(("127.0.0.1", running.port)):  # connects, says nothing
            started = time.monotonic()
            assert fetch(url, trust)[0] == 200
            assert time.monotonic() - started < 5
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            fetch(f"http://127.0.0.1:{running.port}/healthz")  # plain HTTP is not served
    finally:
        running.stop()


def test_https_files_that_do_not_belong_together_name_the_key(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    with pytest.raises(ConfigError, match=r"http\.certificate: cannot use .* with key"):
        https_context(HttpConfig(certificate=cert, private_key=other_key))
    assert https_context(HttpConfig()) is None


# -- check-config and status ---------------------------------------------------------------------


def write_config(tmp_path: Path, weights: Path, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nstate_dir = "state"\nport = 11112\n[inference]\nweights = "{weights}"\n'
        f'[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.1"\nport = 104\n{extra}'
    )
    return path


def test_check_config_says_what_the_node_would_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = '[[allowed_callers]]\nae_title = "MODALITY"\nhost = "10.0.0.9"\n[http]\nport = 0\n'
    config = write_config(tmp_path, REPO / "ensemble_weights", extra)
    assert main(["check-config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{config}: valid"
    shown = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines[1:]}
    assert shown["AE title"] == "FRACTURE_AI"
    assert shown["DICOM"].startswith("127.0.0.1:11112;")
    assert shown["TLS"] == "plain DICOM (node.tls = false)"
    assert shown["callers"] == "MODALITY from 10.0.0.9"
    assert shown["destinations"] == "PACS@10.0.0.1:104 (plain)"
    assert shown["outputs"] == "SR, Secondary Capture; withdraw superseded results: yes"
    # "calibrated" resolved from the shipped manifest: the calibrated groups' regions only
    assert "regions ankle, clavicle, femur, foot, forearm, hand, hip" in shown["scope"]
    assert "elbow" not in shown["scope"]
    assert shown["model"].startswith("gpu-crossfit 0.2.0 ")
    assert shown["identity"].startswith("UID root 1.2.826.0.1.3680043.8.498.;")
    assert "(will be created)" in shown["state"]
    assert shown["http"].startswith("http://127.0.0.1:<any free port> (serve, listen), ")
    assert shown["queue"].startswith("sqlite in ") and shown["queue"].endswith("(one machine)")


@pytest.mark.parametrize(
    ("extra", "weights", "message"),
    [
        ("[http]\nport = 70000\n", "ensemble_weights", "http.port: must be an integer in 0..65535"),
        ("", "nowhere", "inference.weights: no manifest.toml in"),
        ("[node2]\n", "ensemble_weights", "config: unknown key(s) node2"),
    ],
)
def test_check_config_errors_are_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, weights: str, message: str
) -> None:
    config = write_config(tmp_path, REPO / weights, extra)
    assert main(["check-config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"dicomnode: error: {message}")


def test_status_shows_the_readiness_checks(tmp_path: Path) -> None:
    config = make_config(tmp_path, min_free_bytes=0)
    StateLayout(config.node.state_dir).open_db().close()
    now = time.time()
    write_facts(config.node.state_dir, serve_facts(pid=os.getpid(), reported_at=now))
    report = collect_status(config, 20, now=now + 1)
    assert report.health is not None and report.health.ready
    data = status_json(report)
    assert data["ready"] is True and [r["role"] for r in data["roles"]] == ["serve"]
    assert [c["name"] for c in data["checks"]][:4] == [
        "dicom_listener",
        "worker_ready",
        "worker_heartbeat",
        "disk",
    ]
    text = status_text(report)
    assert f"readiness: ready    running: serve (pid {os.getpid()})" in text
    assert text.count("(none)") == 2  # the studies and deliveries sections are unchanged

    remove_facts(config.node.state_dir, "serve")  # the node stopped
    report = collect_status(config, 20)
    assert report.health is not None and not report.health.ready
    failing = {c.name: c.detail for c in report.health.failing()}
    assert failing["dicom_listener"] == "no listener running (dicomnode serve or listen)"
    assert "readiness: NOT READY    running: none" in status_text(report)


def test_counting_never_breaks_the_work_it_counts() -> None:
    from dicomnode.metrics import _never_raises

    calls = []

    @_never_raises
    def broken(value: int) -> None:
        calls.append(value)
        raise OSError("no space left on device")

    broken(1)
    broken(2)  # logged once, never raised
    assert calls == [1, 2]
