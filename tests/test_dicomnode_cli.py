"""The ``dicomnode`` command line and the service wrapper: exit codes, messages, status output,
retry, echo against a real listener, and systemd notifications through a real unix socket."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicomnode.cli import BrokerQueue, StatusReport, collect_status, main, status_json, status_text
from dicomnode.config import Config, auto_receive_processes, load_config
from dicomnode.demo import dx_from_image, free_port
from dicomnode.pixels import load_view
from dicomnode.queue.sqlite import SqliteJobQueue
from dicomnode.records import DeliveryOutcome, QueueDepth, StudyState, StudyStatus
from dicomnode.scp import Listener, read_header
from dicomnode.storage import InstanceStore, StateLayout
from dicomnode.worker import result_files
from dicomnode.writers import ImageFinding, NodeIdentity, write_results
from inference.imageio import read_grayscale
from inference.records import AlgorithmInfo, Decision, ImageResult, Thresholds
from tests.conftest import REPO

LEG = REPO / "samples" / "fracatlas" / "IMG0000466.jpg"


def write_config(tmp_path: Path, body: str = "", weights: Path | None = None) -> Path:
    path = tmp_path / "node.toml"
    text = f'[node]\nstate_dir = "state"\nport = 0\n[study]\nstable_seconds = 0.5\n{body}'
    if weights is not None:
        text += f'[inference]\nweights = "{weights}"\ndevice = "cpu"\n'
    path.write_text(text)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *args], capture_output=True, text=True, timeout=120
    )


# -- usage and configuration errors ------------------------------------------------------------


@pytest.mark.parametrize("command", ["listen", "work", "serve", "status", "retry"])
def test_a_bad_config_is_a_one_line_error_with_status_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nstate_dir = "s"\nport = 70000\n')
    extra = ["--failed"] if command == "retry" else []
    assert main([command, "--config", str(config), *extra]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "dicomnode: error: node.port: must be an integer in 0..65535, got 70000"


def test_missing_config_and_missing_weights_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(tmp_path / "nowhere.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    config = write_config(tmp_path, weights=tmp_path / "no-weights")
    for command in ("work", "serve"):
        assert main([command, "--config", str(config)]) == 2
        assert "inference.weights: no manifest.toml in" in capsys.readouterr().err


def test_status_of_a_node_that_never_ran_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)
    assert main(["status", "--config", str(config)]) == 1
    assert "no state database" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # status never creates state


def test_retry_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    with pytest.raises(SystemExit) as both:
        main(["retry", "--config", str(config), "1.2.3", "--failed"])
    assert both.value.code == 2
    with pytest.raises(SystemExit) as neither:
        main(["retry", "--config", str(config)])
    assert neither.value.code == 2
    capsys.readouterr()
    assert main(["retry", "--config", str(config), "1.2.x"]) == 2
    assert "STUDY_UID is not a valid UID" in capsys.readouterr().err


def test_help_and_module_entry_point() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("listen", "work", "serve", "status", "retry", "echo"):
        assert command in result.stdout


# -- status and retry on a real state database -------------------------------------------------


def populated(tmp_path: Path) -> tuple[Config, dict[str, str]]:
    """A state with a study receiving, one failed (nothing decodable) and one whose delivery
    failed transiently once."""
    config = load_config(
        write_config(
            tmp_path,
            '[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
            "[delivery]\nretry_initial_seconds = 300\n",
        )
    )
    layout = StateLayout(config.node.state_dir)
    db = layout.open_db()
    queue = SqliteJobQueue.from_config(db, config)
    store = InstanceStore(layout, db)
    uids = {}
    for name in ("failed", "pending", "receiving"):
        ds = dx_from_image(read_grayscale(LEG), body_part="LEG", study_uid=generate_uid())
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        when = time.time() - (5 if name == "receiving" else 60)
        store.store(path, read_header(path), "MODALITY", now=when)
        uids[name] = str(ds.StudyInstanceUID)
        if name == "receiving":
            continue
        queue.enqueue_stable_studies()
        job = queue.lease("worker")
        assert job is not None
        if name == "failed":
            queue.fail(
                job, "no instance of the study could be analysed: 1.2.3: bad", retryable=False
            )
            continue
        result = ImageResult(
            0.1, Decision.NO_FRACTURE, (), "leg", "leg", False, Thresholds(0.3, 0.6, 0.5)
        )
        objects = write_results(
            [ImageFinding(load_view(path), result)],
            AlgorithmInfo("t", "1", "t"),
            NodeIdentity(),
            tmp_path / "out",
        )
        queue.complete(job, result_files(objects), config.destinations)
        (delivery,) = queue.claim_deliveries(60)
        queue.record_delivery_attempt(
            delivery.delivery_id, DeliveryOutcome.TRANSIENT_FAILURE, "cannot connect to PACS"
        )
    db.close()
    return config, uids


def test_status_shows_states_backoff_and_reasons_without_patient_data(tmp_path: Path) -> None:
    config, uids = populated(tmp_path)
    text = run("status", "--config", str(config.source))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1] == "jobs: 0 queued, 0 leased, 1 results written, 0 delivered, 1 failed"
    assert lines[2] == "deliveries: 1 pending, 0 failed"
    row = {state: next(line for line in lines if uid in line) for state, uid in uids.items()}
    assert " receiving " in row["receiving"]
    assert " failed " in row["failed"] and "no instance of the study" in row["failed"]
    deliveries = lines[: lines.index("deliveries (pending first):") + 4]
    pending = [line for line in deliveries if "PACS@127.0.0.1:4242" in line]
    assert len(pending) == 1 and " pending " in pending[0] and "cannot connect" in pending[0]
    # the readiness checks at the end (docs/operations.md): no node runs, the PACS is failing
    (check,) = [line for line in lines if line.startswith("destination:PACS@127.0.0.1:4242")]
    assert " failing " in check and "cannot connect to PACS" in check
    assert "(in " in pending[0]  # the back-off: when the next attempt is due
    assert "Demo^Patient" not in text.stdout and "DEMO-0001" not in text.stdout

    data = json.loads(run("status", "--config", str(config.source), "--json").stdout)
    assert data["jobs"]["failed"] == 1 and data["deliveries_pending"] == 1
    (delivery,) = data["deliveries"]
    assert delivery["state"] == "pending" and delivery["attempts"] == 1
    assert 200 < delivery["next_attempt_in_seconds"] <= 300
    assert delivery["destination"] == "PACS@127.0.0.1:4242"
    states = {s["study_instance_uid"]: s["state"] for s in data["studies"]}
    assert states == {
        uids["failed"]: "failed",
        uids["pending"]: "results_written",
        uids["receiving"]: "receiving",
    }


def test_retry_requeues_failed_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, uids = populated(tmp_path)
    source = str(config.source)
    assert main(["retry", "--config", source, uids["pending"]]) == 1
    assert "no failed jobs of study" in capsys.readouterr().err
    assert main(["retry", "--config", source, "--failed"]) == 0
    assert capsys.readouterr().out.strip() == "re-queued 1 failed jobs"
    assert main(["retry", "--config", source, "--failed"]) == 1


def test_status_shows_when_a_failing_job_is_tried_again(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "[queue]\nretry_initial_seconds = 300\n"))
    layout = StateLayout(config.node.state_dir)
    with layout.open_db() as db:
        ds = dx_from_image(read_grayscale(LEG), body_part="LEG", study_uid=generate_uid())
        path = tmp_path / "leg.dcm"
        ds.save_as(path, enforce_file_format=True)
        InstanceStore(layout, db).store(path, read_header(path), "MODALITY", now=time.time() - 60)
        queue = SqliteJobQueue.from_config(db, config)
        queue.enqueue_stable_studies()
        job = queue.lease("worker")
        assert job is not None
        failed_at = time.time()
        queue.fail(job, "RuntimeError while processing the study", retryable=True, now=failed_at)
    text = status_text(collect_status(config, 20, now=failed_at + 100))
    (row,) = [line for line in text.splitlines() if str(ds.StudyInstanceUID) in line]
    assert " queued " in row and "RuntimeError while processing" in row
    assert "(in 200 s)" in row  # the job's back-off: 300 s after the failure
    assert "NEXT ATTEMPT" in text.splitlines()[5]

    data = json.loads(run("status", "--config", str(config.source), "--json").stdout)
    (study,) = data["studies"]
    assert study["state"] == "queued" and study["last_error"].startswith("RuntimeError")
    assert 200 < study["next_attempt_in_seconds"] <= 300
    assert study["next_attempt_at"].endswith("Z")


def test_status_text_of_an_empty_node(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path))
    StateLayout(config.node.state_dir).open_db().close()

    text = status_text(collect_status(config, 20))
    assert text.count("(none)") == 2 and "jobs: 0 queued" in text


# -- echo against a real listener ----------------------------------------------------------


@pytest.fixture()
def listener(tmp_path: Path) -> Iterator[Listener]:
    body = '[[allowed_callers]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\n'
    with Listener(load_config(write_config(tmp_path, body))) as running:
        yield running


def test_echo(listener: Listener, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(listener.port)
    assert (
        main(["echo", "127.0.0.1", port, "--aet", "FRACTURE_AI", "--calling-aet", "MODALITY"]) == 0
    )
    assert "success" in capsys.readouterr().out
    assert main(["echo", "127.0.0.1", port, "--aet", "FRACTURE_AI", "--calling-aet", "OTHER"]) == 1
    assert "association rejected" in capsys.readouterr().err
    closed = str(free_port())
    assert main(["echo", "127.0.0.1", closed, "--aet", "X", "--timeout", "3"]) == 1
    assert "refused or timed out" in capsys.readouterr().err
    assert main(["echo", "127.0.0.1", port, "--aet", "NAME_LONGER_THAN_16"]) == 2
    assert "longer than 16" in capsys.readouterr().err


# -- the service: signals, readiness, watchdog ---------------------------------------------------


def test_listen_notifies_systemd_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
        process = subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "listen", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            messages = [sock.recv(4096).decode() for _ in range(4)]
            ready = [m for m in messages if m.startswith("READY=1")]
            assert len(ready) == 1 and "STATUS=listening as FRACTURE_AI on 127.0.0.1:" in ready[0]
            assert "WATCHDOG=1" in messages  # pinged at half the 1 s interval
            process.send_signal(signal.SIGTERM)
            while (message := sock.recv(4096).decode()) == "WATCHDOG=1":
                pass
            assert message == "STOPPING=1"
            output, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0
    records = [json.loads(line) for line in output.decode().splitlines()]
    events = [r["event"] for r in records]
    assert events[-1] == "service_stopped"
    after_stop = records[events.index("service_stopping") :]
    # every receiving process (the listener and its receiver children) stopped, after the stop
    stopped = sorted(r["receiver"] for r in after_stop if r["event"] == "listener_stopped")
    assert stopped == list(range(auto_receive_processes()))
    assert "shutdown_requested" in events


def test_listen_exits_1_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(f'[node]\nstate_dir = "state"\nport = {port}\n')
        result = run("listen", "--config", str(config))
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    crashed = [e for e in events if e["event"] == "role_crashed"]
    assert crashed and "Address already in use" in crashed[0]["error"]


def test_serve_stops_when_the_worker_cannot_load_its_weights(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "manifest.toml").write_text("not = [valid")
    result = run("serve", "--config", str(write_config(tmp_path, weights=weights)))
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "worker_crashed" in names and "service_failed" in names
    assert "service_ready" not in names


def test_status_shows_the_jobs_the_broker_redelivered() -> None:
    """With the worker pool, ``status`` counts the jobs the broker delivered more than once and
    names the count at each study (the site's result intake records it from each answer)."""
    study = StudyStatus(
        study_instance_uid="1.2.3",
        state=StudyState.DELIVERED,
        instance_count=2,
        last_received_at=0.0,
        version=1,
        last_error=None,
        next_attempt_at=None,
        broker_deliveries=3,
    )
    once = dataclasses.replace(study, study_instance_uid="1.2.4", broker_deliveries=1)
    report = StatusReport(
        state_dir=Path("/state"),
        generated_at=0.0,
        depth=QueueDepth(0, 0, 0, 2, 0, 0, 0),
        studies=(study, once),
        deliveries=(),
        broker=(BrokerQueue("dicomnode.jobs.0", 0, 0),),
        redelivered_jobs=1,
    )
    text = status_text(report)
    assert "jobs redelivered by the broker (a worker died or gave one back): 1" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("1.2.")}
    assert lines["1.2.3"].endswith("delivered 3 times by the broker")
    assert "broker" not in lines["1.2.4"]
    assert status_json(report)["broker"]["redelivered_jobs"] == 1
    one_machine = dataclasses.replace(report, studies=(once,), broker=(), redelivered_jobs=0)
    assert "broker" not in status_text(one_machine)
