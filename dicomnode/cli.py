"""The ``dicomnode`` command: run the node's roles and look after its state.

``listen``, ``work`` and ``serve`` run until SIGTERM or SIGINT (see :mod:`dicomnode.service`),
logging JSON lines to stdout. ``status`` and ``retry`` work on the state database of a node
(running or not); ``echo`` checks a DICOM peer. Exit status: 0 success, 1 failure (a peer that
does not answer, a service that stopped on an error, nothing to retry), 2 bad usage or
configuration (the message says which key is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode import metrics
from dicomnode.config import Config, ConfigError, QueueBackend, load_config, validate_ae_title
from dicomnode.health import Health, RoleFacts, node_components, observe, read_facts
from dicomnode.httpd import https_context
from dicomnode.logging import configure_logging, get_logger
from dicomnode.queue.sqlite import open_queue
from dicomnode.records import Delivery, DeliveryState, QueueDepth, StudyStatus
from dicomnode.state import StateDB
from dicomnode.storage import StateLayout, check_uid

PROG = "dicomnode"


class UsageError(ValueError):
    """Bad command-line input or configuration: reported in one line, exit status 2."""


log = get_logger(__name__)


class CommandFailed(RuntimeError):
    """The command ran but did not succeed: reported in one line, exit status 1."""


def _version() -> str:
    try:
        return version("fracture-dicomnode")
    except PackageNotFoundError:
        return "unknown"


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _check_weights(config: Config) -> None:
    """Refuse to start a worker without an ensemble (before spending time on anything)."""
    manifest = config.inference.weights / "manifest.toml"
    if not manifest.is_file():
        raise UsageError(
            f"inference.weights: no manifest.toml in {config.inference.weights} "
            "(the folder of a trained or exported ensemble)"
        )


def _open_state(config: Config) -> StateDB:
    """The state database of an existing node (not created: status must not create state)."""
    path = StateLayout(config.node.state_dir).db_path
    if not path.is_file():
        raise CommandFailed(f"no state database at {path} (has the node run with this config?)")
    return StateDB(path)


# -- the long-running roles ----------------------------------------------------------------


def _start_role(args: argparse.Namespace, *, needs_weights: bool) -> Config:
    """Read the config, set up logging and keep everything the role writes private.

    The umask makes the state database, instances and results readable by the service's user
    only (as ``UMask=0077`` in the systemd units does); a config readable by everyone is
    reported (it names the TLS key, the peers and the allow-list).
    """
    config = _config(args)
    if needs_weights:
        _check_weights(config)
    try:
        https_context(config.http)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    configure_logging(config.node.log_level)
    os.umask(0o077)
    if config.source is not None and config.source.stat().st_mode & 0o004:
        log.warning(
            "config_readable_by_everyone",
            path=str(config.source),
            hint="chmod 0640 (owner root, group of the service user)",
        )
    if config.http.enabled:  # before any metric is counted, and before children start
        folder = StateLayout(config.node.state_dir).metrics_dir / args.command
        try:
            metrics.prepare_multiprocess(folder)
        except OSError as exc:
            raise CommandFailed(f"cannot prepare the metrics folder {folder}: {exc}") from None
    return config


def cmd_listen(args: argparse.Namespace) -> int:
    from dicomnode.service import run_listen

    return run_listen(_start_role(args, needs_weights=False))


def cmd_work(args: argparse.Namespace) -> int:
    from dicomnode.service import run_work

    return run_work(_start_role(args, needs_weights=True))


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.service import run_serve

    config = _config(args)
    site = config.queue.backend is QueueBackend.RABBITMQ  # a site: inference runs elsewhere
    if site:
        from dicomnode.queue.roles import site_checks

        try:
            site_checks(config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    return run_serve(_start_role(args, needs_weights=not site))


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    """What ``dicomnode status`` shows: UIDs, states, counts and reasons, no patient data.

    ``health``: the readiness checks ``/readyz`` answers with, over every part of the node
    (listener, worker, sender), from the facts the running roles report."""

    state_dir: Path
    generated_at: float
    depth: QueueDepth
    studies: tuple[StudyStatus, ...]
    deliveries: tuple[Delivery, ...]
    health: Health | None = None
    roles: tuple[RoleFacts, ...] = ()
    broker: tuple[BrokerQueue, ...] = ()
    """With ``queue.backend = "rabbitmq"``: the broker's queues this host uses."""
    broker_error: str | None = None
    redelivered_jobs: int = 0
    """Jobs the broker delivered to the worker pool more than once before their answer."""


@dataclass(frozen=True)
class BrokerQueue:
    """One broker queue as ``status`` shows it: messages ready and consumers."""

    name: str
    messages: int
    consumers: int


def broker_status(config: Config) -> tuple[tuple[BrokerQueue, ...], str | None]:
    """The broker's queues (rabbitmq backend), or why they could not be read."""
    if config.queue.backend is not QueueBackend.RABBITMQ:
        return (), None
    from dicomnode.queue.roles import pool_stats

    try:
        stats = pool_stats(config)
    except Exception as exc:  # unreachable, refused, a queue not declared yet: shown, not fatal
        return (), f"{type(exc).__name__}: {exc}"
    return tuple(BrokerQueue(q.name, q.messages, q.consumers) for q in stats), None


def collect_status(config: Config, limit: int, now: float | None = None) -> StatusReport:
    """Read the queue depth, recent studies and deliveries from the state database, and judge
    readiness as ``/readyz`` does (:func:`dicomnode.health.observe`)."""
    now = time.time() if now is None else now
    broker, broker_error = broker_status(config)
    with _open_state(config) as db:
        seen = observe(
            config,
            db,
            read_facts(config.node.state_dir, now),
            node_components(config),
            now=now,
        )
        return StatusReport(
            state_dir=config.node.state_dir,
            generated_at=now,
            depth=db.queue_depth(),
            studies=db.recent_studies(limit),
            deliveries=db.recent_deliveries(limit),
            health=seen.health,
            roles=seen.facts,
            broker=broker,
            broker_error=broker_error,
            redelivered_jobs=db.redelivered_jobs(),
        )


def iso_time(epoch: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def wait_seconds(at: float | None, now: float) -> float | None:
    """Seconds from ``now`` until a next attempt due ``at`` (0 when overdue; None: none due)."""
    return None if at is None else round(max(0.0, at - now), 1)


def next_attempt_text(at: float | None, now: float) -> str:
    """A next attempt for the text status: ISO time and the wait, or ``-`` when none is due."""
    return "-" if at is None else f"{iso_time(at)} (in {max(0.0, at - now):.0f} s)"


def status_json(report: StatusReport) -> dict[str, Any]:
    """The status as JSON-ready data; times as ISO 8601 UTC, plus the wait until the next
    attempt of each pending delivery and of each queued job backing off after a failure."""
    now = report.generated_at
    deliveries = []
    for d in report.deliveries:
        item = _jsonable(asdict(d))
        item["destination"] = d.destination.key
        item["files"] = len(d.files)
        item["next_attempt_at"] = iso_time(d.next_attempt_at)
        pending = d.state is DeliveryState.PENDING
        item["next_attempt_in_seconds"] = wait_seconds(d.next_attempt_at if pending else None, now)
        deliveries.append(item)
    studies = []
    for s in report.studies:
        item = _jsonable(asdict(s))
        item["last_received_at"] = iso_time(s.last_received_at)
        at = s.next_attempt_at
        item["next_attempt_at"] = None if at is None else iso_time(at)
        item["next_attempt_in_seconds"] = wait_seconds(at, now)
        studies.append(item)
    data: dict[str, Any] = {
        "state_dir": str(report.state_dir),
        "generated_at": iso_time(report.generated_at),
        "jobs": {k: v for k, v in asdict(report.depth).items() if not k.startswith("deliveries_")},
        "deliveries_pending": report.depth.deliveries_pending,
        "deliveries_failed": report.depth.deliveries_failed,
        "studies": studies,
        "deliveries": deliveries,
    }
    if report.broker or report.broker_error:
        data["broker"] = {
            "queues": [asdict(q) for q in report.broker],
            "error": report.broker_error,
            "redelivered_jobs": report.redelivered_jobs,
        }
    if report.health is not None:
        data.update(report.health.as_json())
        data["roles"] = [
            {**asdict(f), "reported_at": iso_time(f.reported_at)} for f in report.roles
        ]
    return data


def health_text(found: Health, roles: Sequence[RoleFacts]) -> list[str]:
    """The readiness checks as text lines (what ``/readyz`` says, check by check)."""
    running = ", ".join(f"{f.role} (pid {f.pid})" for f in roles) or "none"
    lines = [f"readiness: {'ready' if found.ready else 'NOT READY'}    running: {running}"]
    lines += _table(
        ("CHECK", "STATE", "DETAIL"),
        [(c.name, "ok" if c.ok else "failing", c.detail) for c in found.checks],
    )
    return lines


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = []
    for row in (headers, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def broker_text(report: StatusReport) -> list[str]:
    """The broker's queues as text lines (none without the rabbitmq backend)."""
    redelivered = (
        f"  jobs redelivered by the broker (a worker died or gave one back): "
        f"{report.redelivered_jobs}"
    )
    if report.broker_error:
        return [f"broker: unreachable ({report.broker_error})", redelivered]
    if not report.broker:
        return []
    return [
        "broker:",
        *(f"  {q.name}: {q.messages} waiting, {q.consumers} consumers" for q in report.broker),
        redelivered,
    ]


def study_remark(study: StudyStatus) -> str:
    """The LAST ERROR / NOTE column: the error, else the note, and the broker's redeliveries."""
    parts = [study.last_error or study.note or ""]
    if study.broker_deliveries is not None and study.broker_deliveries > 1:
        parts.append(f"delivered {study.broker_deliveries} times by the broker")
    return "; ".join(p for p in parts if p) or "-"


def status_text(report: StatusReport) -> str:
    """The status as a human-readable text block."""
    d = report.depth
    lines = [
        f"state: {report.state_dir}    at {iso_time(report.generated_at)}",
        f"jobs: {d.queued} queued, {d.leased} leased, {d.results_written} results written, "
        f"{d.delivered} delivered, {d.failed} failed",
        f"deliveries: {d.deliveries_pending} pending, {d.deliveries_failed} failed",
        *broker_text(report),
        "",
        "recent studies (newest first):",
    ]
    if report.studies:
        lines += _table(
            (
                "STUDY INSTANCE UID",
                "STATE",
                "VERSION",
                "INSTANCES",
                "LAST RECEIVED",
                "NEXT ATTEMPT",
                "LAST ERROR / NOTE",
            ),
            [
                (
                    s.study_instance_uid,
                    s.state.value,
                    str(s.version),
                    str(s.instance_count),
                    iso_time(s.last_received_at),
                    next_attempt_text(s.next_attempt_at, report.generated_at),
                    study_remark(s),
                )
                for s in report.studies
            ],
        )
    else:
        lines.append("  (none)")
    lines += ["", "deliveries (pending first):"]
    if report.deliveries:
        rows = []
        for x in report.deliveries:
            pending = x.state is DeliveryState.PENDING
            next_attempt = next_attempt_text(
                x.next_attempt_at if pending else None, report.generated_at
            )
            rows.append(
                (
                    str(x.delivery_id),
                    x.study_instance_uid,
                    x.destination.key,
                    x.state.value,
                    str(x.attempts),
                    next_attempt,
                    x.last_error or "-",
                )
            )
        lines += _table(
            (
                "ID",
                "STUDY INSTANCE UID",
                "DESTINATION",
                "STATE",
                "ATTEMPTS",
                "NEXT ATTEMPT",
                "LAST ERROR",
            ),
            rows,
        )
    else:
        lines.append("  (none)")
    if report.health is not None:
        lines += ["", *health_text(report.health, report.roles)]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    report = collect_status(config, args.limit)
    if args.json:
        print(json.dumps(status_json(report), indent=2))
    else:
        print(status_text(report))
    return 0


# -- retry and echo --------------------------------------------------------------------------


def cmd_retry(args: argparse.Namespace) -> int:
    config = _config(args)
    study = None
    if args.study_uid is not None:
        try:
            study = check_uid(args.study_uid, "STUDY_UID")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    with _open_state(config) as db:
        count = open_queue(db, config).retry(study)
    what = "failed jobs" if study is None else f"failed jobs of study {study}"
    if count == 0:
        raise CommandFailed(f"no {what} to retry")
    print(f"re-queued {count} {what}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    try:
        called = validate_ae_title(args.aet)
        calling = validate_ae_title(args.calling_aet)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 0 < args.port < 65536:
        raise UsageError(f"PORT must be in 1..65535, got {args.port}")
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.connection_timeout = args.timeout
    where = f"{called}@{args.host}:{args.port}"
    try:
        assoc = ae.associate(args.host, args.port, ae_title=called)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted, refused or timed out"
            raise CommandFailed(f"C-ECHO to {where} as {calling}: association {why}")
        try:
            response = assoc.send_c_echo()
        finally:
            assoc.release()
    finally:
        ae.shutdown()
    code = int(response.Status) if "Status" in response else None
    if code != 0x0000:
        shown = "no response" if code is None else f"status 0x{code:04X}"
        raise CommandFailed(f"C-ECHO to {where} as {calling}: {shown}")
    print(f"C-ECHO to {where} as {calling}: success")
    return 0


# -- check-config ----------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    from dicomnode.checkconfig import check_config  # reads the manifest (imports torch)

    try:
        lines = check_config(args.file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    print("\n".join(lines))
    return 0


# -- export-training -------------------------------------------------------------------------


def cmd_export_training(args: argparse.Namespace) -> int:
    from dicomnode.training_export import ExportError, export_training

    workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    try:
        summary = export_training(args.dicom_dir, args.labels, args.out, workers)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    except (RuntimeError, OSError) as exc:
        raise CommandFailed(f"export-training: {exc}") from None
    print("\n".join(summary.lines()))
    if not summary.exported:
        raise CommandFailed("export-training: no labelled instance could be exported")
    return 0


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fracture-detection DICOM node: receive radiographs, run the ensemble, "
        "send back SR and Secondary Capture.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument(
            "--config", required=True, type=Path, metavar="FILE", help="the node's TOML config"
        )
        return command

    with_config("listen", "run the listener (C-ECHO, C-STORE) and study assembly").set_defaults(
        func=cmd_listen
    )
    with_config("work", "run the worker (inference, results) and the sender").set_defaults(
        func=cmd_work
    )
    with_config("serve", "run listener, worker and sender together (one machine)").set_defaults(
        func=cmd_serve
    )
    status = with_config("status", "show queue depth, recent studies and deliveries")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument("--limit", type=int, default=20, help="studies/deliveries shown (20)")
    status.set_defaults(func=cmd_status)
    retry = with_config("retry", "re-queue failed jobs (of one study, or all with --failed)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("study_uid", nargs="?", metavar="STUDY_UID", help="Study Instance UID")
    which.add_argument("--failed", action="store_true", help="every failed job")
    retry.set_defaults(func=cmd_retry)
    echo = sub.add_parser(
        "echo", help="C-ECHO a DICOM peer", description="C-ECHO a DICOM peer (verification)"
    )
    echo.add_argument("host", metavar="HOST")
    echo.add_argument("port", metavar="PORT", type=int)
    echo.add_argument("--aet", required=True, metavar="AE", help="the peer's (called) AE title")
    echo.add_argument(
        "--calling-aet", default="DICOMNODE", metavar="X", help="our AE title (DICOMNODE)"
    )
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds per step (10)")
    echo.set_defaults(func=cmd_echo)
    check = sub.add_parser(
        "check-config",
        help="validate a config and show what the node would do",
        description="Validate a config file (every key, the weights' manifest, the TLS and "
        "HTTPS files) and print what the node would do with it. Exit status 0 when valid, 2 "
        "with the offending key otherwise.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the node's TOML config")
    check.set_defaults(func=cmd_check_config)
    export = sub.add_parser(
        "export-training",
        help="turn DICOM files + a labels CSV into a training folder",
        description="Decode the labelled DICOM instances under DICOM_DIR with the node's own "
        "chain and write the training folder that python -m inference train/calibrate/evaluate "
        "read (images/, labels.csv, boxes.json). CSV format: dicomnode/training_export.py.",
    )
    export.add_argument("dicom_dir", type=Path, metavar="DICOM_DIR", help="folder of DICOM files")
    export.add_argument(
        "--labels", required=True, type=Path, metavar="CSV", help="labels keyed by SOP Instance UID"
    )
    export.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="training folder (new or empty)"
    )
    export.add_argument(
        "--workers", type=int, metavar="N", help="decoding processes (default: CPU count)"
    )
    export.set_defaults(func=cmd_export_training)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dicomnode`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("status", "retry", "echo", "export-training", "check-config"):
        configure_logging("warning", stream=sys.stderr)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
