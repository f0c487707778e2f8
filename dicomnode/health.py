"""Health and readiness: the checks behind ``/readyz`` and ``dicomnode status``.

A node is *ready* when it can do its job right now: the DICOM port is bound and the listener
serves, the worker has loaded its weights and shows signs of life, the state directory has
more free space than ``node.min_free_bytes``, and the latest delivery to each destination
did not fail. :func:`evaluate` turns what is known into one :class:`Check` per fact; it is a
pure function, used by the HTTP endpoint of a running role (``dicomnode.httpd``) and by
``dicomnode status`` alike.

What only a running process knows (its port is bound, its worker is ready, when its roles last
beat) is its :class:`RoleFacts`. Each running role (``serve``, ``listen``, ``work``) writes
them every second to ``state_dir/health/<role>.json`` (:func:`write_facts`) and removes the
file when it stops, so that ``dicomnode status`` in another process, and for a split
deployment both roles together, can judge the same facts (:func:`read_facts`). A report older
than :data:`FACTS_STALE_SECONDS`, or from a process that is gone, counts as no report.

A destination that has not been sent anything yet (a new installation, or every delivery to it
removed by retention) counts as ready: there is no failure to report, and a node must become
ready before it can deliver anything. A delivery that failed and waits for its next attempt
counts as a failure until an attempt succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicomnode.config import Config, QueueBackend
from dicomnode.records import DeliveryState, QueueDepth
from dicomnode.state import DestinationSummary, StateDB
from dicomnode.storage import StateLayout

#: The parts of the node a role runs (what its checks cover).
LISTENER, WORKER, SENDER = "listener", "worker", "sender"
ROLE_COMPONENTS: dict[str, frozenset[str]] = {
    "serve": frozenset({LISTENER, WORKER, SENDER}),
    "listen": frozenset({LISTENER}),
    "work": frozenset({WORKER, SENDER}),
}
ALL_COMPONENTS = ROLE_COMPONENTS["serve"]
POOL_ROLE_COMPONENTS: dict[str, frozenset[str]] = {
    "serve": frozenset({LISTENER, SENDER}),
    "listen": frozenset({LISTENER}),
    "work": frozenset({WORKER}),
}
"""With ``queue.backend = "rabbitmq"``: a site's ``serve`` runs no worker (the pool does) and a
pool worker's ``work`` no sender (its site sends)."""


def role_components(config: Config, role: str) -> frozenset[str]:
    """The parts of the node ``role`` runs under ``config``."""
    pool = config.queue.backend is QueueBackend.RABBITMQ
    return (POOL_ROLE_COMPONENTS if pool else ROLE_COMPONENTS)[role]


def node_components(config: Config) -> frozenset[str]:
    """Every part this host runs (what ``dicomnode status`` judges)."""
    if config.queue.backend is QueueBackend.RABBITMQ:
        return POOL_ROLE_COMPONENTS["serve"]
    return ALL_COMPONENTS

FACTS_STALE_SECONDS = 10.0
"""A role's facts file older than this is ignored (the role writes it every second)."""
LISTENER_SILENT_SECONDS = 60.0
"""The listener's loop beats at least every second; silent this long, it no longer serves."""


@dataclass(frozen=True)
class RoleFacts:
    """What a running role knows about itself (no patient data).

    ``dicom_port``: the bound DICOM port once the listener and its receivers serve (None before,
    or in a role without a listener). ``listener_age`` / ``worker_age``: seconds since the
    listener's loop / the worker last showed signs of life when the facts were taken (None: the
    role runs no listener / worker). ``worker_ready``: the worker has loaded its weights."""

    role: str
    pid: int
    reported_at: float
    dicom_port: int | None = None
    listener_age: float | None = None
    worker_ready: bool = False
    worker_age: float | None = None
    http_port: int | None = None

    def aged(self, now: float) -> RoleFacts:
        """The facts as of ``now``: the ages grow by the time since the report."""
        gap = max(0.0, now - self.reported_at)
        return RoleFacts(
            role=self.role,
            pid=self.pid,
            reported_at=now,
            dicom_port=self.dicom_port,
            listener_age=None if self.listener_age is None else self.listener_age + gap,
            worker_ready=self.worker_ready,
            worker_age=None if self.worker_age is None else self.worker_age + gap,
            http_port=self.http_port,
        )


@dataclass(frozen=True)
class Check:
    """One readiness check: its name, whether it passes, and what was found, in words."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    """Every check, in a fixed order; ready when all pass."""

    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    def failing(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if not check.ok)

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "checks": [
                {
                    "name": c.name,
                    "ok": c.ok,
                    "state": "ok" if c.ok else "failing",
                    "detail": c.detail,
                }
                for c in self.checks
            ],
        }


@dataclass(frozen=True)
class Observation:
    """Everything the metrics and the readiness checks read at one moment.

    ``depth`` and ``destinations`` are None and () when the state database could not be read
    (``database_error`` says why)."""

    at: float
    depth: QueueDepth | None
    destinations: tuple[DestinationSummary, ...]
    state_free_bytes: int
    spool_free_bytes: int
    facts: tuple[RoleFacts, ...]
    health: Health
    database_error: str | None = None


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _listener_check(config: Config, facts: Sequence[RoleFacts]) -> Check:
    listeners = [f for f in facts if f.listener_age is not None]
    if not listeners:
        return Check("dicom_listener", False, "no listener running (dicomnode serve or listen)")
    f = listeners[0]
    assert f.listener_age is not None
    if f.dicom_port is None:
        return Check("dicom_listener", False, f"starting: DICOM port not bound yet ({f.role})")
    where = f"{config.node.ae_title} on {config.node.bind}:{f.dicom_port} ({f.role}, pid {f.pid})"
    if f.listener_age > LISTENER_SILENT_SECONDS:
        return Check("dicom_listener", False, f"{where}: silent for {f.listener_age:.0f} s")
    return Check("dicom_listener", True, f"listening as {where}")


def _worker_checks(config: Config, facts: Sequence[RoleFacts]) -> list[Check]:
    workers = [f for f in facts if f.worker_age is not None]
    if not workers:
        none = "no worker running (dicomnode serve or work)"
        return [Check("worker_ready", False, none), Check("worker_heartbeat", False, none)]
    f = workers[0]
    assert f.worker_age is not None
    ready = Check(
        "worker_ready",
        f.worker_ready,
        f"weights loaded ({f.role}, pid {f.pid})"
        if f.worker_ready
        else f"loading the weights or restarting ({f.role}, pid {f.pid})",
    )
    limit = config.queue.lease_seconds
    fresh = f.worker_age < limit
    beat = Check(
        "worker_heartbeat",
        fresh,
        f"last sign of life {f.worker_age:.1f} s ago"
        if fresh
        else f"silent for {f.worker_age:.0f} s (queue.lease_seconds = {limit:g})",
    )
    return [ready, beat]


def _disk_check(config: Config, free: int) -> Check:
    low = config.node.min_free_bytes
    detail = f"{free} bytes free in {config.node.state_dir} (node.min_free_bytes = {low})"
    return Check("disk", free >= low, detail)


def _destination_checks(
    config: Config, summaries: Sequence[DestinationSummary], now: float
) -> list[Check]:
    by_key = {s.destination: s for s in summaries}
    checks = []
    for destination in config.destinations:
        name = f"destination:{destination.key}"
        summary = by_key.get(destination.key)
        if summary is None or summary.last_state is None or summary.last_at is None:
            checks.append(Check(name, True, "nothing sent yet"))
        elif summary.last_state is DeliveryState.DELIVERED:
            checks.append(Check(name, True, f"last delivery delivered at {_iso(summary.last_at)}"))
        else:
            then = "will be retried" if summary.last_state is DeliveryState.PENDING else "failed"
            checks.append(
                Check(
                    name,
                    False,
                    f"last delivery {then} (attempt at {_iso(summary.last_at)}): "
                    f"{summary.last_error or 'no reason recorded'}",
                )
            )
    return checks


def evaluate(
    config: Config,
    facts: Sequence[RoleFacts],
    free_bytes: int,
    destinations: Sequence[DestinationSummary],
    now: float,
    components: frozenset[str] = ALL_COMPONENTS,
    database_error: str | None = None,
) -> Health:
    """The readiness checks of the ``components`` (:data:`ROLE_COMPONENTS`) from what is known:
    the running roles' ``facts`` (as of ``now``), the free bytes of the state directory and
    the deliveries per destination. ``dicom_listener`` for the listener; ``worker_ready`` and
    ``worker_heartbeat`` for the worker; ``disk`` always; one ``destination:<AE@host:port>`` per
    configured destination for the sender; ``state_database`` when it could not be read."""
    checks: list[Check] = []
    if LISTENER in components:
        checks.append(_listener_check(config, facts))
    if WORKER in components:
        checks.extend(_worker_checks(config, facts))
    checks.append(_disk_check(config, free_bytes))
    if database_error is not None:
        checks.append(Check("state_database", False, database_error))
    elif SENDER in components:
        checks.extend(_destination_checks(config, destinations, now))
    return Health(tuple(checks))


def free_bytes(path: Path) -> int:
    """Free bytes for unprivileged users on the file system of ``path`` (its nearest existing
    parent when it does not exist)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def observe(
    config: Config,
    db: StateDB,
    facts: Sequence[RoleFacts],
    components: frozenset[str] = ALL_COMPONENTS,
    now: float | None = None,
) -> Observation:
    """Read the state database and the disks now and evaluate the checks."""
    now = time.time() if now is None else now
    layout = StateLayout(config.node.state_dir)
    depth: QueueDepth | None = None
    destinations: tuple[DestinationSummary, ...] = ()
    error = None
    try:
        depth = db.queue_depth()
        destinations = db.destination_summaries()
    except sqlite3.Error as exc:
        error = f"cannot read {db.path}: {type(exc).__name__}: {exc}"
    state_free = free_bytes(layout.root)
    aged = tuple(f.aged(now) for f in facts)
    health = evaluate(config, aged, state_free, destinations, now, components, error)
    return Observation(
        at=now,
        depth=depth,
        destinations=destinations,
        state_free_bytes=state_free,
        spool_free_bytes=free_bytes(layout.spool_dir),
        facts=aged,
        health=health,
        database_error=error,
    )


# -- the facts files ---------------------------------------------------------------------------


def facts_path(state_dir: Path, role: str) -> Path:
    return StateLayout(state_dir).health_dir / f"{role}.json"


def write_facts(state_dir: Path, facts: RoleFacts) -> None:
    """Replace the role's facts file atomically (no fsync: it is rewritten every second)."""
    path = facts_path(state_dir, facts.role)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(json.dumps(asdict(facts)))
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def remove_facts(state_dir: Path, role: str) -> None:
    facts_path(state_dir, role).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def parse_facts(data: object) -> RoleFacts | None:
    """A :class:`RoleFacts` from a facts file's JSON; None when it is not one."""
    if not isinstance(data, dict):
        return None
    known = {f.name for f in fields(RoleFacts)}
    try:
        return RoleFacts(**{k: v for k, v in data.items() if k in known})
    except TypeError:
        return None


def read_facts(state_dir: Path, now: float | None = None) -> tuple[RoleFacts, ...]:
    """The facts of the roles running now: fresh reports from live processes, by role name."""
    now = time.time() if now is None else now
    folder = StateLayout(state_dir).health_dir
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        with contextlib.suppress(OSError, ValueError):
            facts = parse_facts(json.loads(path.read_text()))
            if (
                facts is not None
                and now - facts.reported_at <= FACTS_STALE_SECONDS
                and _alive(facts.pid)
            ):
                found.append(facts)
    return tuple(found)
