"""The HTTP endpoint end to end: a real Prometheus scraping a running ``dicomnode serve``, and
``/readyz`` following the destination and the worker.

Peers, all started here on 127.0.0.1 and free ports and stopped by PID: the node
(``python -m dicomnode serve`` with two receiving processes and a tiny random ensemble), DCMTK
``storescu`` as the modality, DCMTK ``storescp`` as the PACS, and Prometheus (Debian package
``prometheus``) with its own config file and storage folder, scraping every second.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.demo import StoreScpPacs, dx_from_image, free_port
from tests.test_node_e2e import (
    NODE_AE,
    NodeProcess,
    fracatlas,
    node,
    positive_weights,
    save,
    send,
    settled,
    status_json,
    wait_for,
)

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow, pytest.mark.timeout(240)]

PROMETHEUS = Path("/usr/bin/prometheus")
STORESCU = "/usr/bin/storescu"
REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
OPERATIONS = REPO / "docs" / "operations.md"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return positive_weights(tmp_path_factory.mktemp("weights") / "ensemble")


def node_config(
    folder: Path, weights: Path, pacs: StoreScpPacs, *, lease: float = 30, stable: float = 0.5
) -> Path:
    """``serve`` with two receiving processes, HTTP on any free port, results to ``pacs``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    path.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nport = {free_port()}\nstate_dir = "state"\n'
        "receive_processes = 2\n\n"
        f"[study]\nstable_seconds = {stable}\n\n"
        f'[inference]\nweights = "{weights}"\ndevice = "cpu"\nprecision = "fp32"\n\n'
        f"[queue]\nlease_seconds = {lease}\n\n"
        "[delivery]\nretry_initial_seconds = 0.4\nretry_max_seconds = 1\n\n"
        "[http]\nport = 0\nwork_port = 0\n\n"
        f'[[destinations]]\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\n'
        f"port = {pacs.dicom_port}\n"
    )
    path.chmod(0o600)
    return path


def logged_port(running: NodeProcess, event: str, **fields: object) -> int:
    found = running.event(event, **fields)
    assert found is not None, event
    return int(found["port"])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def answers(url: str) -> bool:
    """``url`` answers 200 (False while nothing listens yet)."""
    try:
        return get(url)[0] == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    return status, json.loads(body)


def failing(body: dict[str, Any]) -> list[str]:
    return [check["name"] for check in body["checks"] if not check["ok"]]


def study(folder: Path, views: int) -> tuple[str, list[Path]]:
    """A study of ``views`` hand radiographs (FracAtlas), one file each."""
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for i in range(views):
        ds = dx_from_image(
            fracatlas("IMG0000019.jpg"),
            body_part="HAND",
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
        )
        files.append(save(ds, folder / f"{study_uid}-{i}.dcm"))
    return study_uid, files


def receivers_of(running: NodeProcess, path: Path) -> list[int]:
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return [
        int(e["receiver"])
        for e in running.events()
        if e["event"] == "instance_received" and e.get("sop_instance_uid") == uid
    ]


def send_while_stopped(dicom_port: int, path: Path, stopped_pid: int) -> None:
    """Send ``path`` while ``stopped_pid`` is SIGSTOPped: only another receiving process can
    accept the connection. The process is continued once the connection is accepted, so it
    cannot hold a lock the receiving process needs for longer than that."""
    os.kill(stopped_pid, signal.SIGSTOP)
    try:
        process = subprocess.Popen(
            [
                STORESCU,
                "-aec",
                NODE_AE,
                "-aet",
                "MODALITY",
                "127.0.0.1",
                str(dicom_port),
                str(path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        time.sleep(1.0)  # accepted by then (accept needs no lock)
    finally:
        os.kill(stopped_pid, signal.SIGCONT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, out


@contextmanager
def prometheus(folder: Path, target_port: int) -> Iterator[int]:
    """A Prometheus scraping ``127.0.0.1:target_port/metrics`` every second; yields its port."""
    folder.mkdir(parents=True)
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: dicomnode\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    port = free_port()
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            "Prometheus to be ready",
            lambda: process.poll() is not None or answers(f"http://127.0.0.1:{port}/-/ready"),
            timeout=60,
        )
        assert process.poll() is None, (folder / "prometheus.log").read_text()
        yield port
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(port: int, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant query through Prometheus' HTTP API."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    status, body = get(url)
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", data
    return list(data["data"]["result"])


def value_of(port: int, promql: str) -> float | None:
    result = query(port, promql)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def scraped_names(exposition: str) -> set[str]:
    """The sample names of a Prometheus text exposition."""
    names = set()
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_metrics() -> set[str]:
    """The ``dicomnode_*`` names in the expressions of the Grafana dashboard."""
    found: set[str] = set()

    def walk(item: object) -> None:
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    found.update(re.findall(r"\bdicomnode_[a-z0-9_]+", value))
                walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(json.loads(DASHBOARD.read_text()))
    return found


# -- tests ----------------------------------------------------------------------------------------


def test_prometheus_scrapes_what_every_process_of_serve_counted(
    weights: Path, tmp_path: Path
) -> None:
    study_uid, files = study(tmp_path / "study", 2)
    with StoreScpPacs(tmp_path / "pacs") as pacs:
        # the study is queued once, with both views (sent a few seconds apart)
        config = node_config(tmp_path / "node", weights, pacs, stable=5)
        with node("serve", config, tmp_path / "node.log") as running:
            http_port = logged_port(running, "http_started")
            dicom_port = logged_port(running, "listener_started", receiver=0)
            with prometheus(tmp_path / "prometheus", http_port) as prom:
                assert wait_for("the first scrape", lambda: value_of(prom, "up") == 1.0, 30)
                # one view accepted by the receiver child (the listener is stopped meanwhile)
                send_while_stopped(dicom_port, files[0], running.process.pid)
                assert receivers_of(running, files[0]) == [1]
                send(dicom_port, files[1])
                wait_for("the study to be delivered", lambda: settled(config, study_uid), 120)

                expected = {
                    'sum(dicomnode_instances_received_total{status="0x0000"})': 2.0,
                    "sum(dicomnode_associations_accepted_total)": 2.0,
                    'dicomnode_jobs{state="delivered"}': 1.0,
                    'sum(dicomnode_job_stage_duration_seconds_count{stage="analyse"})': 1.0,
                    'sum(dicomnode_views_total{result="analysed"})': 2.0,
                    'sum(dicomnode_delivery_attempts_total{outcome="delivered"})': 1.0,
                    'count(dicomnode_model_info{device="cpu",precision="fp32"})': 1.0,
                    "dicomnode_ready": 1.0,
                    'dicomnode_deliveries{state="delivered"}': 1.0,
                }

                def scraped() -> bool:
                    return all(value_of(prom, q) == v for q, v in expected.items())

                try:
                    wait_for("the counts at Prometheus", scraped, 30)
                except AssertionError:
                    seen = {q: value_of(prom, q) for q in expected}
                    raise AssertionError(f"Prometheus has {seen}, expected {expected}") from None
                received = value_of(prom, "sum(dicomnode_received_bytes_total)")
                assert received is not None and received > 0.9 * sum(
                    f.stat().st_size for f in files
                )
                processes = {
                    r["metric"]["process"]
                    for r in query(prom, "dicomnode_process_start_time_seconds")
                }
                assert processes == {"serve", "receiver_1", "worker"}

            status, body = get(f"http://127.0.0.1:{http_port}/metrics")
            assert status == 200
            names = scraped_names(body.decode())
    # every metric of the Grafana dashboard is scraped, and every family is documented
    missing = sorted(dashboard_metrics() - names)
    assert not missing, f"the dashboard uses metrics the node does not expose: {missing}"
    documented = OPERATIONS.read_text()
    families = {re.sub(r"_(bucket|count|sum|total|info)$", "", n) for n in names}
    undocumented = sorted(
        f for f in families if f.startswith("dicomnode_") and f"`{f}" not in documented
    )
    assert not undocumented, f"not in docs/operations.md: {undocumented}"


def test_readyz_follows_the_destination_and_the_worker(weights: Path, tmp_path: Path) -> None:
    study_uid, files = study(tmp_path / "study", 1)
    pacs = StoreScpPacs(tmp_path / "pacs")  # its port is chosen; it starts later
    config = node_config(tmp_path / "node", weights, pacs, lease=3)
    worker_pid = None
    try:
        with node("serve", config, tmp_path / "node.log") as running:
            http_port = logged_port(running, "http_started")
            dicom_port = logged_port(running, "listener_started", receiver=0)
            status, body = readyz(http_port)
            assert status == 200, body
            destination = f"destination:{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"
            checks = {c["name"]: c for c in body["checks"]}
            assert list(checks) == [
                "dicom_listener",
                "worker_ready",
                "worker_heartbeat",
                "disk",
                destination,
            ]
            assert checks[destination]["detail"] == "nothing sent yet"
            assert get(f"http://127.0.0.1:{http_port}/healthz")[0] == 200

            # the destination is down: its last delivery failed, the node is not ready
            send(dicom_port, *files)
            wait_for("/readyz 503", lambda: readyz(http_port)[0] == 503, 120)
            status, body = readyz(http_port)
            assert failing(body) == [destination], body
            # dicomnode status judges the same facts, by the same function
            shown = status_json(config)
            assert shown["ready"] is False
            assert [c["name"] for c in shown["checks"] if not c["ok"]] == [destination]
            assert [r["role"] for r in shown["roles"]] == ["serve"]

            pacs.start()  # back: the retry delivers, the node is ready again
            wait_for("/readyz 200", lambda: readyz(http_port)[0] == 200, 60)
            assert settled(config, study_uid) is not None

            # the worker hangs (stopped): not ready until its successor has loaded the weights
            started = running.event("worker_process_started")
            assert started is not None
            worker_pid = int(started["pid"])
            os.kill(worker_pid, signal.SIGSTOP)
            wait_for("/readyz 503", lambda: readyz(http_port)[0] == 503, 30)
            status, body = readyz(http_port)
            assert set(failing(body)) <= {"worker_heartbeat", "worker_ready"}, body
            assert failing(body), body
            wait_for(
                "the worker to be replaced",
                lambda: running.event("worker_process_started", restarts=1),
                60,
            )
            wait_for("/readyz 200 again", lambda: readyz(http_port)[0] == 200, 90)
            # status reads the facts the node writes every second: at most that much later
            wait_for("status to say ready", lambda: status_json(config)["ready"], 30)
    finally:
        if worker_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker_pid, signal.SIGCONT)
        pacs.stop()


def test_split_roles_serve_their_own_endpoints_and_status_joins_them(
    weights: Path, tmp_path: Path
) -> None:
    with StoreScpPacs(tmp_path / "pacs") as pacs:
        config = node_config(tmp_path / "node", weights, pacs)
        with (
            node("listen", config, tmp_path / "listen.log") as listen,
            node("work", config, tmp_path / "work.log") as work,
        ):
            listen_port = logged_port(listen, "http_started")
            work_port = logged_port(work, "http_started")
            assert listen_port != work_port
            status, body = readyz(listen_port)
            assert status == 200 and [c["name"] for c in body["checks"]] == [
                "dicom_listener",
                "disk",
            ]
            status, body = readyz(work_port)
            destination = f"destination:{pacs.ae_title}@127.0.0.1:{pacs.dicom_port}"
            assert status == 200 and [c["name"] for c in body["checks"]] == [
                "worker_ready",
                "worker_heartbeat",
                "disk",
                destination,
            ]
            listened = scraped_names(get(f"http://127.0.0.1:{listen_port}/metrics")[1].decode())
            worked = scraped_names(get(f"http://127.0.0.1:{work_port}/metrics")[1].decode())
            assert "dicomnode_associations_open" in listened
            assert "dicomnode_model_info" not in listened
            assert {"dicomnode_model_info", "dicomnode_job_stage_duration_seconds_count"} <= worked

            # dicomnode status judges every part from both roles' reports
            def ready() -> dict[str, Any] | None:
                shown = status_json(config)
                return shown if shown["ready"] else None

            shown = wait_for("status to say ready", ready, 30)
            assert sorted(r["role"] for r in shown["roles"]) == ["listen", "work"]
        shown = status_json(config)
        assert shown["ready"] is False
        assert {c["name"] for c in shown["checks"] if not c["ok"]} == {
            "dicom_listener",
            "worker_ready",
            "worker_heartbeat",
        }
