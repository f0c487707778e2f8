"""Scaling across hosts (issue 14): studies/s through the broker path with 1, 2 and 4 workers.

    python benchmarks/scale.py                       # noop and ensemble, 1/2/4 workers
    python benchmarks/scale.py --quick               # fewer studies
    python benchmarks/scale.py --analysers noop --workers 1,2,4,8 --studies 60
    python benchmarks/scale.py --out benchmarks/results/scale-cpu-<date>.md

Everything runs on this machine on 127.0.0.1, as real processes: a private ``rabbitmq-server``
(``tests/brokers.py``), a site (``dicomnode serve`` with ``queue.backend = "rabbitmq"``: listener,
dispatcher, result intake, instance server, sender), W workers and DCMTK ``storescp`` as the PACS.
The modality (DCMTK ``storescu``) sends every study at once, one association per study, one
after the other; a run ends when the site's state database shows every job delivered (the PACS
answered success for every result object).

Two analysers:

- ``ensemble``: ``dicomnode work`` with a tiny random-weight ensemble (the tests' three small
  members) on the CPU: the real worker, with decoding, inference and the SR/SC writers. On a
  2-core machine it cannot scale past the cores.
- ``noop``: the same broker worker (:func:`dicomnode.queue.roles.run_pool_worker`: take the job,
  fetch every instance over HTTP with its SHA-256 check, publish result files and the outcome,
  acknowledge) whose analysis is a copy of each fetched instance under a new UID: the control
  plane alone (messages, transfers, results, intake, delivery to the PACS).

Besides studies/s, the CPU seconds of the site process and of the broker (every process of its
process group) per study, from ``/proc``: what one listener host and one broker core spend per
study, from which the report states how many studies/s they carry, and how many GPU workers
that feeds at a GPU worker's measured rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import machine_facts, print_table  # noqa: E402

from dicomnode.demo import StoreScpPacs, free_port  # noqa: E402

NODE_AE = "FRACTURE_AI"
TOKEN = "scale-benchmark-instance-token-0123456789"
#: A GPU worker's rate with the paper ensemble: the worker's whole ``Ensemble.analyse``
#: (pre-processing, the 10 members, post-processing; bf16, one H200 with 16 CPU cores), 0.17
#: s per view in studies of 20 and 60 views (benchmarks/results/memory-cuda-h200-2026-12-04.md).
#: The members alone run 38.5 radiographs/s (gpu-session-h200-2026-12-04.md): the rest is the
#: pre- and post-processing on the CPU.
GPU_VIEWS_PER_SECOND = 5.9


# -- the no-op worker (a subprocess of this script) ----------------------------------------------


def noop_worker(config_path: Path) -> None:
    """``scale.py noop-worker CONFIG``: the broker worker with a copy for an analysis."""
    import pydicom
    from pydicom.uid import SecondaryCaptureImageStorage

    from dicomnode.config import load_config
    from dicomnode.logging import configure_logging
    from dicomnode.queue.remote import Processed
    from dicomnode.queue.roles import run_pool_worker
    from dicomnode.records import ResultFile, StudyJob
    from dicomnode.uids import derive_uid

    config = load_config(config_path)
    configure_logging("info")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def process(job: StudyJob, folder: Path) -> Processed:
        folder.mkdir(parents=True, exist_ok=True)
        series = str(derive_uid("noop-series", job.study_instance_uid, str(job.version)))
        results = []
        for instance in job.instances:
            ds = pydicom.dcmread(instance.path)
            uid = str(derive_uid("noop", instance.sop_instance_uid, str(job.version)))
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
            ds.SeriesInstanceUID = series
            path = folder / f"{uid}.dcm"
            ds.save_as(path, enforce_file_format=True)
            results.append(ResultFile("sc", SecondaryCaptureImageStorage, series, uid, path))
        return Processed(tuple(results), None)

    run_pool_worker(config, stop, process)


# -- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    analyser: str
    workers: int
    studies: int
    views: int
    seconds: float
    pool_seconds: float
    site_cpu: float
    broker_cpu: float
    worker_cpu: float
    instance_bytes: int
    result_bytes: int
    job_message_bytes: int

    @property
    def studies_per_second(self) -> float:
        return self.studies / self.seconds

    @property
    def pool_studies_per_second(self) -> float:
        return self.studies / self.pool_seconds


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their waited-for children (``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / tick


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def events(log_path: Path, name: str) -> list[dict[str, object]]:
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def iso_seconds(stamp: object) -> float:
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def wait_logged(log_path: Path, name: str, process: subprocess.Popen[bytes], timeout: float
                ) -> None:
    deadline = time.monotonic() + timeout
    while not (log_path.exists() and events(log_path, name)):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
            raise RuntimeError(f"{log_path.name}: no {name}: {tail}")
        time.sleep(0.2)


def make_studies(folder: Path, studies: int, views: int, side: int) -> list[list[Path]]:
    import numpy as np

    from dicomnode.demo import dx_from_image

    rng = np.random.default_rng(7)
    out = []
    for s in range(studies):
        files = []
        study, series = f"2.25.{1000 + s}{rng.integers(1 << 40)}", f"2.25.{2000 + s}"
        for v in range(views):
            ramp = np.add.outer(np.arange(side), np.arange(side)) % 256
            noise = rng.integers(0, 32, (side, side))
            pixels = ((ramp + noise) % 256).astype(np.uint8)
            ds = dx_from_image(pixels, body_part="HAND", study_uid=study,
                               series_uid=f"{series}.{rng.integers(1 << 30)}",
                               instance_number=v + 1)
            path = folder / f"s{s}-v{v}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        out.append(files)
    return out


def run_once(args: argparse.Namespace, work: Path, rabbit_url: str, rabbit_pgid: int,
             weights: Path, analyser: str, workers: int, studies: list[list[Path]]) -> RunResult:
    from dicomnode.state import StateDB

    run_dir = work / f"{analyser}-{workers}"
    run_dir.mkdir()
    credentials, token = work / "broker.credentials", work / "instances.token"
    prefix = f"bench{analyser}{workers}"
    host, port = rabbit_url.split("@")[1].split("/")[0].split(":")
    broker = (
        f'[queue]\nbackend = "rabbitmq"\nurl = "amqp://{host}:{port}/%2F"\n'
        f'credentials_file = "{credentials}"\nprefix = "{prefix}"\nsite = "bench"\n\n'
        f'[queue.instances]\ntoken_file = "{token}"\n'
    )
    pacs = StoreScpPacs(run_dir / "pacs").start()
    processes: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        site_dir = run_dir / "site"
        site_dir.mkdir()
        instance_port = free_port()
        (site_dir / "node.toml").write_text(
            f'[node]\nae_title = "{NODE_AE}"\nport = {free_port()}\nstate_dir = "state"\n'
            "receive_processes = 1\n\n[study]\nstable_seconds = 0.5\n\n[http]\nenabled = false\n\n"
            f'[[destinations]]\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\n'
            f"port = {pacs.dicom_port}\n\n{broker}"
            f'port = {instance_port}\nurl = "http://127.0.0.1:{instance_port}"\n'
        )
        site_log = run_dir / "site.log"
        with site_log.open("wb") as log:
            site = subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "serve", "--config",
                 str(site_dir / "node.toml")],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        processes.append(site)
        wait_logged(site_log, "service_ready", site, 120)
        site_port = int(events(site_log, "listener_started")[0]["port"])  # type: ignore[arg-type]
        worker_logs = []
        for w in range(workers):
            wdir = run_dir / f"worker-{w}"
            wdir.mkdir()
            (wdir / "node.toml").write_text(
                '[node]\nstate_dir = "state"\n\n[http]\nenabled = false\n\n'
                f'[inference]\nweights = "{weights}"\ndevice = "cpu"\n\n{broker}'
            )
            command = (
                [sys.executable, "-m", "dicomnode", "work", "--config", str(wdir / "node.toml")]
                if analyser == "ensemble"
                else [sys.executable, str(Path(__file__).resolve()), "noop-worker",
                      str(wdir / "node.toml")]
            )
            wlog = run_dir / f"worker-{w}.log"
            with wlog.open("wb") as log:
                processes.append(subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env={
                        **env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}))
            worker_logs.append(wlog)
        for wlog, process in zip(worker_logs, processes[1:], strict=True):
            wait_logged(wlog, "worker_started", process, 300)
        time.sleep(1.0)  # workers polling, idle
        site_cpu0 = cpu_seconds([site.pid])
        broker_cpu0 = cpu_seconds(group_pids(rabbit_pgid))
        worker_cpu0 = cpu_seconds([p.pid for p in processes[1:]])
        t0 = time.time()
        for files in studies:
            run = subprocess.run(
                ["/usr/bin/storescu", "-aec", NODE_AE, "-aet", "MODALITY", "127.0.0.1",
                 str(site_port), *map(str, files)], capture_output=True, text=True, timeout=120)
            if run.returncode != 0:
                raise RuntimeError(f"storescu: {run.stdout}{run.stderr}")
        db_path = site_dir / "state" / "state.sqlite"
        deadline = time.monotonic() + args.timeout
        while True:
            with StateDB(db_path) as db:
                rows = db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            states = {r[0]: r[1] for r in rows}
            if states.get("delivered", 0) >= len(studies):
                break
            if states.get("failed"):
                raise RuntimeError(f"jobs failed: {states}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: {states}")
            time.sleep(0.1)
        t1 = time.time()
        site_cpu = cpu_seconds([site.pid]) - site_cpu0
        broker_cpu = cpu_seconds(group_pids(rabbit_pgid)) - broker_cpu0
        worker_cpu = cpu_seconds([p.pid for p in processes[1:]]) - worker_cpu0
        taken = [iso_seconds(e["timestamp"]) for wl in worker_logs
                 for e in events(wl, "job_taken")]
        delivered = [iso_seconds(e["timestamp"]) for e in events(site_log, "delivery_delivered")]
        with StateDB(db_path) as db:
            instance_bytes = int(db.query("SELECT SUM(size) FROM instances")[0][0])
            result_paths = [Path(r[0]) for r in db.query("SELECT path FROM results")]
            job_bytes = job_message_size(db, site_dir)
        result_bytes = sum(p.stat().st_size for p in result_paths if p.is_file())
        return RunResult(
            analyser, workers, len(studies), len(studies[0]), t1 - t0,
            max(delivered) - min(taken), site_cpu, broker_cpu, worker_cpu,
            instance_bytes, result_bytes, job_bytes)
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pacs.stop()


def job_message_size(db: object, site_dir: Path) -> int:
    """Bytes of the job message of the site's first job (as the dispatcher encodes it)."""
    from dicomnode.queue.messages import encode
    from dicomnode.queue.remote import JobDispatcher
    from dicomnode.queue.sqlite import study_job
    from dicomnode.state import StateDB

    assert isinstance(db, StateDB)
    with db.transaction() as conn:
        job = study_job(conn, 1)
    dispatcher = JobDispatcher("bench", None, None, "http://127.0.0.1:8443")  # type: ignore[arg-type]
    return len(encode(dispatcher.message(job)))


# -- pixels through the broker or over HTTP ------------------------------------------------------


@dataclass
class TransferResult:
    size: int
    broker_mb_s: float
    http_mb_s: float
    broker_cpu_s_per_gb: float


def transfer_comparison(rabbit_url: str, pgid: int, work: Path, size_mb: int, rounds: int
                        ) -> TransferResult:
    """The same bytes (one radiograph-sized file) ``rounds`` times: published to a quorum queue
    and taken back (confirmed, persistent, acknowledged), and fetched from the instance server
    with its SHA-256 check. MB/s of each and the broker's CPU per GB."""
    import hashlib

    from dicomnode.queue.messages import InstanceRef
    from dicomnode.queue.rabbitmq import QUORUM, Broker, BrokerSettings
    from dicomnode.queue.transfer import InstanceServer, fetch_instances
    from dicomnode.records import StoredInstance

    data = os.urandom(size_mb * 1024 * 1024)
    path = work / "transfer.bin"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    settings = BrokerSettings(url=rabbit_url, prefix="transfer")
    queue = "transfer.bytes"
    with Broker(settings) as broker:
        broker.channel.queue_declare(queue, durable=True, arguments=QUORUM)
        cpu0, t0 = cpu_seconds(group_pids(pgid)), time.perf_counter()
        for _ in range(rounds):
            broker.publish(queue, data, {}, "application/octet-stream")
            method, _, body = broker.channel.basic_get(queue, auto_ack=False)
            assert method is not None and len(body) == len(data)
            broker.ack(method.delivery_tag)
        broker_s, broker_cpu = time.perf_counter() - t0, cpu_seconds(group_pids(pgid)) - cpu0
        broker.channel.queue_delete(queue)
    stored = StoredInstance("1.2.3", "1.2.840.10008.5.1.4.1.1.1.1", "1.2", "1.2.1",
                            "1.2.840.10008.1.2.1", path, len(data), digest, "")
    server = InstanceServer("127.0.0.1", 0, lambda uid: stored, TOKEN).start()
    try:
        ref = InstanceRef("1.2.3", stored.sop_class_uid, "1.2.1", stored.transfer_syntax_uid,
                          len(data), digest, f"http://127.0.0.1:{server.port}/instances/1.2.3")
        t0 = time.perf_counter()
        for i in range(rounds):
            fetch_instances([ref], "1.2", work / f"fetched-{i}", TOKEN)
        http_s = time.perf_counter() - t0
    finally:
        server.stop()
    total_mb = size_mb * rounds
    return TransferResult(len(data), total_mb / broker_s, total_mb / http_s,
                          broker_cpu / (total_mb / 1024))


# -- report -------------------------------------------------------------------------------------


def report(args: argparse.Namespace, results: list[RunResult], facts: dict[str, object],
           transfer: TransferResult | None = None) -> str:
    lines = [
        "# Scaling across hosts: studies/s through the broker (benchmarks/scale.py)",
        "",
        f"Command: `python benchmarks/scale.py {' '.join(sys.argv[1:])}`  ",
        f"Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}  ",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()) + "  ",
        f"Studies per run: {args.studies} of {args.views} views ({args.side}x{args.side} 8-bit "
        "DX, Explicit VR LE), sent one association per study; all roles on 127.0.0.1.",
        "",
        "| analyser | workers | studies/s (send to all delivered) | studies/s (pool: first job "
        "taken to last delivered) | site CPU s/study | broker CPU s/study | worker CPU s/study |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.analyser} | {r.workers} | {r.studies_per_second:.2f} | "
            f"{r.pool_studies_per_second:.2f} | {r.site_cpu / r.studies:.3f} | "
            f"{r.broker_cpu / r.studies:.3f} | {r.worker_cpu / r.studies:.3f} |"
        )
    r0 = results[0]
    lines += [
        "",
        f"Sizes per study: instances {r0.instance_bytes / r0.studies / 1024:.0f} KiB "
        f"(pulled over HTTP), job message {r0.job_message_bytes} bytes "
        f"({r0.job_message_bytes / r0.views:.0f} per view, through the broker), results "
        f"{r0.result_bytes / r0.studies / 1024:.0f} KiB (through the broker).",
    ]
    if transfer is not None:
        lines += [
            "",
            f"One {transfer.size / 1024 / 1024:.0f} MiB file (an uncompressed radiograph is "
            "6-8 MB: the Explicit VR samples in shared/dicom-samples are 6.2 and 7.5 MB) "
            f"{args.transfer_rounds} times: through a quorum queue (confirmed publish, get, ack) "
            f"{transfer.broker_mb_s:.0f} MB/s with {transfer.broker_cpu_s_per_gb:.1f} broker CPU "
            f"s per GB; pulled from the site's instance server over HTTP with the SHA-256 check "
            f"{transfer.http_mb_s:.0f} MB/s.",
        ]
    noop = [r for r in results if r.analyser == "noop"]
    if noop:
        site = min(r.site_cpu / r.studies for r in noop)
        broker = min(r.broker_cpu / r.studies for r in noop)
        best = max(r.studies_per_second for r in noop)
        views = r0.views
        gpu = GPU_VIEWS_PER_SECOND / views
        lines += [
            "",
            "## How many GPU workers one broker and one listener feed (on paper)",
            "",
            f"Control plane measured with the no-op analyser: best {best:.1f} studies/s on this "
            f"machine (every role sharing its cores). Per study the site spent {site:.3f} CPU s "
            f"(receive, store, dispatch, serve the pixels, take the results, send them to the "
            f"PACS) and the broker {broker:.3f} CPU s. One site core therefore carries about "
            f"{1 / site:.0f} studies/s and one broker core about {1 / broker:.0f} studies/s "
            "of this size.",
            "",
            f"A GPU worker with the paper ensemble analyses {GPU_VIEWS_PER_SECOND} radiographs/s "
            f"(H200, bf16, the worker's whole analysis measured; the members alone 38.5/s), "
            f"{gpu:.1f} studies/s of {views} views. One listener core "
            f"feeds about {1 / site / gpu:.0f} such workers, one broker core about "
            f"{1 / broker / gpu:.0f}; the broker's result traffic grows with the result size, "
            "the site's with the instance size (pixels are pulled from it once per attempt).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["noop-worker"]:
        noop_worker(Path(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--analysers", default="noop,ensemble")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="8 studies")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--transfer-mb", type=int, default=8)
    parser.add_argument("--transfer-rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.studies = 8
    from tests.brokers import PASSWORD, USER, RabbitMQ
    from tests.test_node_e2e import positive_weights

    results: list[RunResult] = []
    tmp = tempfile.mkdtemp(prefix="scale-")
    try:
        work = Path(tmp)
        (work / "broker.credentials").write_text(f"{USER}:{PASSWORD}\n")
        (work / "instances.token").write_text(TOKEN + "\n")
        for name in ("broker.credentials", "instances.token"):
            (work / name).chmod(0o600)
        weights = positive_weights(work / "weights")
        studies_dir = work / "studies"
        studies_dir.mkdir()
        studies = make_studies(studies_dir, args.studies, args.views, args.side)
        with RabbitMQ(work / "rabbitmq") as rabbit:
            assert rabbit.process is not None
            pgid = os.getpgid(rabbit.process.pid)
            transfer = transfer_comparison(rabbit.url, pgid, work, args.transfer_mb,
                                           args.transfer_rounds)
            print(f"transfer: broker {transfer.broker_mb_s:.0f} MB/s, "
                  f"http {transfer.http_mb_s:.0f} MB/s", flush=True)
            for analyser in args.analysers.split(","):
                for workers in (int(w) for w in args.workers.split(",")):
                    result = run_once(args, work, rabbit.url, pgid, weights, analyser, workers,
                                      studies)
                    results.append(result)
                    print(f"{analyser} x{workers}: {result.studies_per_second:.2f} studies/s, "
                          f"pool {result.pool_studies_per_second:.2f}", flush=True)
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    facts = machine_facts()
    print_table(
        ["analyser", "workers", "studies/s", "pool studies/s", "site CPU/study",
         "broker CPU/study"],
        [[r.analyser, r.workers, f"{r.studies_per_second:.2f}",
          f"{r.pool_studies_per_second:.2f}", f"{r.site_cpu / r.studies:.3f}",
          f"{r.broker_cpu / r.studies:.3f}"] for r in results],
    )
    text = report(args, results, facts, transfer)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
