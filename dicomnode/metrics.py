"""Prometheus metrics of the node, counted in whichever process does the work.

The node runs several processes: ``serve`` is the listener and the sender (threads of the main
process), ``node.receive_processes - 1`` receiver children that accept associations on the same
port, and the worker child; ``listen`` and ``work`` are the same parts split over two services.
A C-STORE answered by a receiver child and a job analysed by the worker child must both reach
the scrape, so the node uses ``prometheus_client``'s multi-process mode: every process of a role
writes its samples into memory-mapped files in ``state_dir/metrics/<role>/`` (the folder
:func:`prepare_multiprocess` empties at start and names in ``$PROMETHEUS_MULTIPROC_DIR``, which
the spawned children inherit), and the process serving HTTP adds them up at scrape time
(:func:`build_registry`). Counters and histograms of a child that died stay counted; a dead
child's gauges are dropped (:func:`process_died`, called by the supervisor).

``prometheus_client`` reads ``$PROMETHEUS_MULTIPROC_DIR`` once, when it is imported, so this
module imports it only when a metric is first used: :func:`prepare_multiprocess` must run before
that, and does (``dicomnode.cli`` calls it before starting a role). Without it (tests, or
``[http] enabled = false``) metrics stay in the memory of each process.

What the state database holds (jobs and deliveries by state, the back-off), free disk space and
the readiness checks are read at scrape time by :class:`NodeCollector`. Labels never carry
patient data: statuses, outcomes, states, stages, reasons and destinations (``AE@host:port``).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec

from dicomnode.config import Config
from dicomnode.health import Observation
from dicomnode.logging import get_logger
from dicomnode.records import DeliveryState, JobState

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.registry import Collector

log = get_logger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "dicomnode"

STAGES = ("decode", "analyse", "write")
"""The steps of a job whose wall time is observed (``dicomnode.worker.StepSeconds``)."""
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
REJECT_REASONS = ("caller_not_allowed", "max_associations", "called_ae_title", "tls_handshake")
"""``dicomnode_associations_rejected_total`` reasons (and ``other``)."""
DELIVERY_OUTCOMES = ("delivered", "transient_failure", "permanent_failure")


def prepare_multiprocess(folder: Path) -> Path:
    """Make this process, and every child it starts from now on, count into ``folder``
    (emptied first: counts start again with the role, as a restarted process's would).

    Raises RuntimeError when ``prometheus_client`` was imported already without it (its
    metrics would then stay in this process's memory)."""
    if "prometheus_client" in sys.modules and os.environ.get(ENV) != str(folder):
        raise RuntimeError("prometheus_client was imported before the multi-process folder was set")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(mode=0o700, parents=True)
    os.environ[ENV] = str(folder)
    return folder


def multiprocess() -> bool:
    """This process counts into a multi-process folder."""
    return bool(os.environ.get(ENV))


@dataclass(frozen=True)
class _Instruments:
    associations_open: Gauge
    associations_accepted: Counter
    associations_rejected: Counter
    instances: Counter
    received_bytes: Counter
    stage_seconds: Histogram
    jobs_finished: Counter
    views: Counter
    delivery_attempts: Counter
    deliveries_finished: Counter
    model_info: Gauge
    process_start: Gauge
    child_restarts: Counter
    pool_jobs_taken: Counter
    pool_answers: Counter
    pool_redelivered: Counter


_lock = threading.Lock()
_made: list[_Instruments] = []


def _instruments() -> _Instruments:
    """The node's metrics, made at first use (in the default registry)."""
    with _lock:
        if not _made:
            _made.append(_make())
        return _made[0]


def _make() -> _Instruments:
    from prometheus_client import Counter, Gauge, Histogram

    p = PREFIX
    return _Instruments(
        associations_open=Gauge(
            f"{p}_associations_open",
            "DICOM associations open now, all receiving processes together",
            multiprocess_mode="livesum",
        ),
        associations_accepted=Counter(f"{p}_associations_accepted", "DICOM associations accepted"),
        associations_rejected=Counter(
            f"{p}_associations_rejected",
            "DICOM associations rejected (A-ASSOCIATE-RJ, or a failed TLS handshake), by reason",
            ["reason"],
        ),
        instances=Counter(
            f"{p}_instances_received",
            "C-STORE requests answered, by the status sent and what became of the instance",
            ["status", "outcome"],
        ),
        received_bytes=Counter(
            f"{p}_received_bytes", "Bytes of the data sets of the C-STORE requests answered"
        ),
        stage_seconds=Histogram(
            f"{p}_job_stage_duration_seconds",
            "Wall time of the steps of a job: decode, analyse (the ensemble), write (results)",
            ["stage"],
            buckets=STAGE_BUCKETS,
        ),
        jobs_finished=Counter(
            f"{p}_jobs_processed",
            "Job attempts the worker finished, by the state the job went to",
            ["state"],
        ),
        views=Counter(
            f"{p}_views",
            "Images of the jobs processed: analysed, or not analysed (out of scope, refused)",
            ["result"],
        ),
        delivery_attempts=Counter(
            f"{p}_delivery_attempts",
            "Attempts to send a job's results to a destination, by outcome",
            ["destination", "outcome"],
        ),
        deliveries_finished=Counter(
            f"{p}_deliveries_finished",
            "Deliveries settled: delivered, or failed (permanently or after giving up)",
            ["destination", "state"],
        ),
        model_info=Gauge(
            f"{p}_model_info",
            "The ensemble the worker loaded (value 1)",
            ["name", "version", "device", "precision"],
            multiprocess_mode="livemax",
        ),
        process_start=Gauge(
            f"{p}_process_start_time_seconds",
            "Start time of each process of the node, seconds since the epoch",
            ["process"],
            multiprocess_mode="livemax",
        ),
        child_restarts=Counter(
            f"{p}_child_restarts",
            "Child processes (worker, receivers) restarted after they died or hung",
            ["child"],
        ),
        pool_jobs_taken=Counter(
            f"{p}_pool_jobs_taken",
            "Jobs a pool worker took from the broker: first delivery, or redelivered (a worker "
            "died or gave it back)",
            ["delivery"],
        ),
        pool_answers=Counter(
            f"{p}_pool_answers",
            "What a site took from the worker pool: results, failed, duplicate (an answer to an "
            "attempt already answered), dead_lettered (the broker gave up at the delivery limit)",
            ["kind"],
        ),
        pool_redelivered=Counter(
            f"{p}_pool_redelivered_answers",
            "Answers a site took from the worker pool for jobs the broker had delivered more than "
            "once (a worker died or gave the job back)",
        ),
    )


# -- recording (called where the work happens) -------------------------------------------------

_P = ParamSpec("_P")


def _never_raises(record: Callable[_P, None]) -> Callable[_P, None]:
    """Counting must never break the work it counts (a C-STORE handler never raises): an
    error is logged, once per kind of record, and the work goes on."""
    failed: set[str] = set()

    @functools.wraps(record)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception as exc:
            if record.__name__ not in failed:
                failed.add(record.__name__)
                log.error("metric_not_recorded", metric=record.__name__, error=repr(exc))

    return wrapper


@_never_raises
def process_started(process: str, components: Iterable[str] = ()) -> None:
    """Record this process's start and show the metrics of its ``components`` (``listener``,
    ``worker``, ``sender``) at zero before anything happens, so every series exists."""
    m = _instruments()
    m.process_start.labels(process).set(time.time())
    parts = set(components)
    if "listener" in parts:
        m.associations_open.set(0)
        m.associations_accepted.inc(0)
        for reason in REJECT_REASONS:
            m.associations_rejected.labels(reason).inc(0)
        m.instances.labels("0x0000", "new").inc(0)
        m.received_bytes.inc(0)
    if "worker" in parts:
        for stage in STAGES:
            m.stage_seconds.labels(stage)
        for state in (JobState.RESULTS_WRITTEN, JobState.DELIVERED, JobState.QUEUED, "failed"):
            m.jobs_finished.labels(str(state)).inc(0)
        for result in ("analysed", "not_analysed"):
            m.views.labels(result).inc(0)
    allocate_files()


def allocate_files() -> None:
    """Give this process's metric files their disk blocks now.

    ``prometheus_client`` creates each file sparse (64 KiB) and writes to it through ``mmap``:
    on a full disk, the first write into a page without a block would kill the process with
    SIGBUS instead of failing. With the blocks allocated at start, counting never needs new
    space (the node's series fit in the first 64 KiB)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    for path in Path(folder).glob(f"*_{os.getpid()}.db"):
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("metrics_file_not_allocated", path=str(path), error=str(exc))


@_never_raises
def destinations_known(keys: Iterable[str]) -> None:
    """Show the delivery counters of each configured destination at zero."""
    m = _instruments()
    for key in keys:
        for outcome in DELIVERY_OUTCOMES:
            m.delivery_attempts.labels(key, outcome).inc(0)
        for state in (DeliveryState.DELIVERED, DeliveryState.FAILED):
            m.deliveries_finished.labels(key, str(state)).inc(0)


@_never_raises
def associations_open(count: int) -> None:
    """This process has ``count`` associations open."""
    _instruments().associations_open.set(count)


@_never_raises
def association_accepted() -> None:
    _instruments().associations_accepted.inc()


@_never_raises
def association_rejected(reason: str) -> None:
    _instruments().associations_rejected.labels(
        reason if reason in REJECT_REASONS else "other"
    ).inc()


@_never_raises
def instance_answered(status: int, outcome: str, size: int | None) -> None:
    """One C-STORE answered with ``status``; ``size``: its data set's bytes (None: none)."""
    m = _instruments()
    m.instances.labels(f"0x{status:04X}", outcome).inc()
    if size:
        m.received_bytes.inc(size)


@_never_raises
def pool_job_taken(deliveries: int) -> None:
    """A pool worker took a job the broker delivered ``deliveries`` times (1: the first)."""
    _instruments().pool_jobs_taken.labels("first" if deliveries <= 1 else "redelivered").inc()


@_never_raises
def pool_answer(kind: str) -> None:
    """A site took an answer from the worker pool (see ``dicomnode_pool_answers_total``)."""
    _instruments().pool_answers.labels(kind).inc()


@_never_raises
def pool_redelivered() -> None:
    """A site's answer came from a job the broker had redelivered."""
    _instruments().pool_redelivered.inc()


class BrokerCollector:
    """Scrape-time gauges of the broker's queues (``queue.backend = "rabbitmq"``): each queue's
    waiting messages and consumers, and whether the broker answered. ``stats`` returns
    ``(queue, messages, consumers)`` triples or raises."""

    def __init__(self, stats: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(f"{PREFIX}_broker_up", "1 when the broker answered this scrape")
        try:
            stats = list(self._stats())
        except Exception as exc:  # unreachable or refused: shown as down, never a failed scrape
            log.warning("broker_stats_failed", error=f"{type(exc).__name__}: {exc}")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        messages = GaugeMetricFamily(
            f"{PREFIX}_broker_queue_messages",
            "Messages waiting in a broker queue (jobs by priority level, the site's results and "
            "dead letters)",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            f"{PREFIX}_broker_queue_consumers",
            "Consumers of a broker queue as the broker reports them (pool workers poll with "
            "basic.get and do not count)",
            labels=["queue"],
        )
        for name, waiting, consuming in stats:
            messages.add_metric([name], waiting)
            consumers.add_metric([name], consuming)
        yield up
        yield messages
        yield consumers


@_never_raises
def job_processed(
    state: str, stages: Mapping[str, float] | None = None, analysed: int = 0, not_analysed: int = 0
) -> None:
    """The worker finished a job attempt: the job's new state, the wall time of each stage
    (when it got that far) and how many images it analysed or not."""
    m = _instruments()
    m.jobs_finished.labels(state).inc()
    for stage, seconds in (stages or {}).items():
        m.stage_seconds.labels(stage).observe(seconds)
    if analysed:
        m.views.labels("analysed").inc(analysed)
    if not_analysed:
        m.views.labels("not_analysed").inc(not_analysed)


@_never_raises
def delivery_attempted(destination: str, outcome: str, state: str) -> None:
    """One attempt to send to ``destination`` and the delivery's state after it."""
    m = _instruments()
    m.delivery_attempts.labels(destination, outcome).inc()
    if state != DeliveryState.PENDING:
        m.deliveries_finished.labels(destination, state).inc()


@_never_raises
def model_loaded(name: str, model_version: str, device: str, precision: str) -> None:
    _instruments().model_info.labels(name, model_version, device, precision).set(1)


@_never_raises
def child_supervised(child: str) -> None:
    """Show the restarts of a kind of child at zero once it is supervised."""
    _instruments().child_restarts.labels(child).inc(0)


@_never_raises
def child_restarted(child: str) -> None:
    _instruments().child_restarts.labels(child).inc()


@_never_raises
def process_died(pid: int) -> None:
    """Drop the gauges of a child process that ended (its counters stay counted)."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)


# -- exposition ----------------------------------------------------------------------------------


class _DefaultRegistry:
    """The default registry's metrics, for a registry of a process not in multi-process mode."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        return iter(REGISTRY.collect())


def build_registry(*extra: Collector) -> CollectorRegistry:
    """The registry a scrape reads: every process's metrics (multi-process mode: summed from the
    folder, plus this process's standard ``process_*`` metrics), then ``extra`` collectors."""
    from prometheus_client import CollectorRegistry, ProcessCollector
    from prometheus_client import multiprocess as mp

    registry = CollectorRegistry()
    if multiprocess():
        mp.MultiProcessCollector(registry)
        ProcessCollector(registry=registry)
    else:
        registry.register(_DefaultRegistry())
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST


def package_version() -> str:
    try:
        return version("fracture-dicomnode")
    except PackageNotFoundError:
        return "unknown"


class NodeCollector:
    """Metrics read at scrape time: the state database (jobs by state, deliveries by
    destination and state, the current back-off), free space, and the readiness checks."""

    def __init__(self, config: Config, observe: Callable[[], Observation]) -> None:
        self.config = config
        self.observe = observe

    def collect(self) -> Iterator[Any]:
        return iter(families(self.config, self.observe()))


def families(config: Config, seen: Observation) -> list[Any]:
    """The metric families of one observation (a pure function of it)."""
    from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

    p = PREFIX
    out: list[Any] = []
    info = InfoMetricFamily(f"{p}_build", "The node's software")
    info.add_metric([], {"version": package_version()})
    out.append(info)
    if seen.depth is not None:
        jobs = GaugeMetricFamily(
            f"{p}_jobs", "Jobs in the state database by state", labels=["state"]
        )
        for job_state in JobState:
            jobs.add_metric([str(job_state)], getattr(seen.depth, job_state.value))
        out.append(jobs)
    by_key = {s.destination: s for s in seen.destinations}
    keys = sorted({d.key for d in config.destinations} | set(by_key))
    deliveries = GaugeMetricFamily(
        f"{p}_deliveries",
        "Deliveries in the state database by destination and state",
        labels=["destination", "state"],
    )
    backoff = GaugeMetricFamily(
        f"{p}_delivery_backoff_seconds",
        "Back-off the most-retried pending delivery to a destination waits out (0: none)",
        labels=["destination"],
    )
    for key in keys:
        summary = by_key.get(key)
        counts = (summary.pending, summary.delivered, summary.failed) if summary else (0, 0, 0)
        states = (DeliveryState.PENDING, DeliveryState.DELIVERED, DeliveryState.FAILED)
        for state, count in zip(states, counts, strict=True):
            deliveries.add_metric([key, str(state)], count)
        attempts = summary.retrying_attempts if summary else 0
        backoff.add_metric([key], config.delivery.backoff(attempts) if attempts else 0.0)
    if seen.database_error is None:
        out += [deliveries, backoff]
    disk = GaugeMetricFamily(
        f"{p}_disk_free_bytes",
        "Free bytes on the file system of the state directory and of the spool",
        labels=["volume"],
    )
    disk.add_metric(["state"], seen.state_free_bytes)
    disk.add_metric(["spool"], seen.spool_free_bytes)
    out.append(disk)
    out.append(
        GaugeMetricFamily(
            f"{p}_disk_min_free_bytes",
            "node.min_free_bytes: below it C-STORE answers 0xA700 and the node is not ready",
            value=config.node.min_free_bytes,
        )
    )
    out.append(
        GaugeMetricFamily(
            f"{p}_ready",
            "1 when every readiness check passes (/readyz 200)",
            value=int(seen.health.ready),
        )
    )
    checks = GaugeMetricFamily(
        f"{p}_health_check", "Each readiness check: 1 passes, 0 fails", labels=["check"]
    )
    for check in seen.health.checks:
        checks.add_metric([check.name], int(check.ok))
    out.append(checks)
    workers = [f.worker_age for f in seen.facts if f.worker_age is not None]
    if workers:
        out.append(
            GaugeMetricFamily(
                f"{p}_worker_heartbeat_age_seconds",
                "Seconds since the worker last showed signs of life",
                value=workers[0],
            )
        )
    return out
