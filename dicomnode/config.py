"""The node's configuration: one TOML file read into typed, frozen dataclasses.

Every key is checked (type, range, allowed values) and unknown keys are refused, so a typo never
silently falls back to a default. Errors are :class:`ConfigError` naming the offending key, e.g.
``node.port: must be an integer in 0..65535, got 70000``. Relative paths resolve against the folder
of the config file, so a config and its weights can move together.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicomnode.records import Destination

MIB = 1024 * 1024
DEFAULT_MAX_PDU = 4 * MIB
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_RECEIVE_PROCESSES = 64
AUTO_RECEIVE_PROCESSES_CAP = 4
PRECISIONS = ("auto", "fp32", "bf16")
"""``inference.precision`` values: those of ``inference.precision.PRECISIONS`` (not imported, so
that reading a config does not load torch)."""
MAX_BATCH_LIMIT = 1024
"""Largest ``inference.max_batch``: that of ``inference.memory`` (not imported, as above)."""


class ConfigError(ValueError):
    """The configuration file is missing, not TOML, or has a bad key or value."""


class OtherSopClasses(StrEnum):
    """What the listener does with storage SOP classes other than CR and DX."""

    DISCARD = "discard"
    REJECT = "reject"


class Device(StrEnum):
    """Where inference runs."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class NodeConfig:
    """``[node]``: the listener's identity, address, state and limits."""

    ae_title: str
    bind: str
    port: int
    state_dir: Path
    other_sop_classes: OtherSopClasses
    max_pdu: int
    max_associations: int
    log_level: str
    max_instance_bytes: int = 256 * MIB
    """Largest data set accepted; a C-STORE that grows beyond it is aborted (0 = no limit)."""
    min_free_bytes: int = 256 * MIB
    """Low-water mark: C-STORE answers 0xA700 when storing would leave less free space than
    this in ``state_dir``. At or above ``max_instance_bytes`` (the defaults), an incoming data set
    always has room to be spooled, so a full disk is answered with a status, not an abort."""
    acse_timeout_seconds: float = 30.0
    """Longest wait for an association request, release or abort message."""
    dimse_timeout_seconds: float = 60.0
    """Longest wait for the next DIMSE message of an open association."""
    network_timeout_seconds: float = 60.0
    """An association with no traffic for this long is aborted."""
    tls: bool = False
    """Listen with DICOM TLS only (needs the ``[tls]`` table)."""
    receive_processes: int = 1
    """Processes accepting associations on ``port`` (the listener and its receiver children);
    ``"auto"`` in the file: :func:`auto_receive_processes`."""


@dataclass(frozen=True)
class StudyConfig:
    """``[study]``: when a study counts as complete."""

    stable_seconds: float


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: how long finished studies are kept in ``state_dir``.

    A study whose jobs and deliveries are all finished (delivered or failed) and that saw no
    activity (instance received, job run, delivery attempted) for ``keep_days`` is removed:
    its instances, results and rows. ``keep_days = 0`` keeps everything (the disk then fills
    up, and C-STORE answers 0xA700 at ``node.min_free_bytes``).
    """

    keep_days: int = 30


@dataclass(frozen=True)
class InferenceConfig:
    """``[inference]``: the ensemble to load, where and how to run it."""

    weights: Path
    device: Device
    precision: str = "auto"
    """``auto`` (bf16 on CUDA with bf16 and on CPUs with AMX, else fp32), ``fp32`` or ``bf16``."""
    channels_last: bool | None = None
    """The NHWC memory layout; None (key absent): on with bf16, off in fp32."""
    max_batch: int | None = None
    """Most views of a study run through the ensemble at once; None (``"auto"``): sized for each
    study from the device's free memory (``inference/memory.py``, ``docs/memory.md``)."""


@dataclass(frozen=True)
class OutputsConfig:
    """``[outputs]``: which result objects the worker writes."""

    sr: bool
    sc: bool
    gsps: bool
    withdraw_superseded: bool = True
    """After a re-run, withdraw the results it supersedes the IHE IOCM way: a Key Object
    Selection rejection note (Rejected for Quality Reasons) sent to the same destinations."""


DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
"""pydicom's UID root: works out of the box, but an installation should use its organisation's."""


@dataclass(frozen=True)
class IdentityConfig:
    """``[identity]``: how result objects name this installation (no patient data).

    Empty strings mean: ``station_name`` = the node's AE title; ``device_serial_number`` = a
    number derived from the installation's Device Observer UID (made once and kept in the state
    directory); ``institution_name`` = left out."""

    uid_root: str = DEFAULT_UID_ROOT
    institution_name: str = ""
    station_name: str = ""
    device_serial_number: str = ""
    manufacturer_model_name: str = "fracture-dicomnode"


class OutOfScope(StrEnum):
    """What the node sends for a study that is outside its intended use."""

    REPORT = "report"  # a short SR and SC saying "not analysed: outside the intended use (...)"
    IGNORE = "ignore"  # nothing


class UnknownRegion(StrEnum):
    """What the node does with an image whose region no header rule names."""

    ANALYSE = "analyse"  # with the pooled (global) thresholds, flagged as a fallback
    SKIP = "skip"  # not analysed: "region unknown"


CALIBRATED = "calibrated"
"""``scope.regions`` value: the regions whose calibration group the loaded model calibrated."""


@dataclass(frozen=True)
class ScopeConfig:
    """``[scope]``: which images get a fracture decision (the intended use).

    ``modalities``: Modality values analysed. ``regions``: region keys of
    ``inference/regions.py`` analysed, or ``("calibrated",)``: those whose calibration group has
    thresholds of its own in the loaded model's manifest. An image of another modality, of a known
    region outside the list, or of anatomy the node recognises as outside musculoskeletal fracture
    imaging (chest, abdomen, head) gets no fracture decision."""

    modalities: tuple[str, ...] = ("CR", "DX", "DR", "RG")
    regions: tuple[str, ...] = (CALIBRATED,)
    unknown_region: UnknownRegion = UnknownRegion.ANALYSE
    out_of_scope: OutOfScope = OutOfScope.REPORT


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off between failed attempts, the one formula of the node: after the
    ``n``-th failed attempt (1-based) wait ``min(retry_initial_seconds * 2 ** (n - 1),
    retry_max_seconds)``. Failed jobs (``[queue]``) and failed deliveries (``[delivery]``) both
    wait by it, each table with its own ``retry_*`` keys."""

    retry_initial_seconds: float
    retry_max_seconds: float

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (``attempts >= 1``)."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        exponent = min(attempts - 1, 62)
        return float(min(self.retry_initial_seconds * 2.0**exponent, self.retry_max_seconds))


class QueueBackend(StrEnum):
    """``queue.backend``: one machine (SQLite, the default) or several hosts (RabbitMQ)."""

    SQLITE = "sqlite"
    RABBITMQ = "rabbitmq"


@dataclass(frozen=True)
class PriorityRuleConfig:
    """``[[queue.priority]]``: studies with an instance from this calling AE title or station
    name go to ``level`` (0 = most urgent)."""

    level: int
    calling_ae: str | None = None
    station_name: str | None = None


@dataclass(frozen=True)
class InstanceServerConfig:
    """``[queue.instances]``: the site's instance server, from which workers on other hosts
    fetch a job's instances (HTTP, HTTPS with ``certificate`` and ``private_key``)."""

    bind: str
    port: int
    url: str
    """The base URL workers use (``https://site-a.example:8443``)."""
    token_file: Path
    certificate: Path | None = None
    private_key: Path | None = None


@dataclass(frozen=True)
class BrokerConfig:
    """``[queue]`` with ``backend = "rabbitmq"`` (``docs/multi-host.md``).

    ``dispatch_seconds``: how long the site waits for the worker pool's answer to a published
    job before it publishes the job again as a new attempt (a safety net: a dead worker's job is
    redelivered by the broker itself; keep it above the longest wait in the pool's queue plus
    the longest job). ``site``, ``instances`` and ``priority`` concern ``serve`` (the site);
    ``work`` needs the broker keys and ``instances.token_file``."""

    url: str
    credentials_file: Path | None = None
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    prefix: str = "dicomnode"
    levels: int = 2
    default_priority: int = 1
    delivery_limit: int = 5
    heartbeat_seconds: int = 30
    dispatch_seconds: float = 6 * 3600.0
    site: str | None = None
    priority: tuple[PriorityRuleConfig, ...] = ()
    instances: InstanceServerConfig | None = None
    token_file: Path | None = None
    """The instance server's shared token (``instances.token_file``), for workers too."""


@dataclass(frozen=True)
class QueueConfig(RetryPolicy):
    """``[queue]``: job leases, attempts and the back-off between attempts.

    A job attempt that fails with a retryable error (anything but "nothing decodable") is leased
    again no earlier than ``backoff(attempt)`` seconds later, so a study whose inference keeps
    crashing does not spin the worker.
    """

    lease_seconds: float
    max_attempts: int
    backend: QueueBackend = QueueBackend.SQLITE
    broker: BrokerConfig | None = None
    """``backend = "rabbitmq"``: how to reach the broker and what this host does there."""


@dataclass(frozen=True)
class DeliveryConfig(RetryPolicy):
    """``[delivery]``: timeouts and exponential back-off of result deliveries.

    Attempt ``n`` that fails transiently is retried after ``backoff(n)``; a delivery still
    failing ``give_up_after_seconds`` after it was created is marked failed.
    ``timeout_seconds`` bounds every step of a send: TCP connect, association (ACSE), each
    DIMSE reply, network idle.
    """

    give_up_after_seconds: float
    timeout_seconds: float


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: the node's certificate for DICOM TLS (BCP 195), listening and sending.

    With ``ca_certificates`` the listener requires and verifies a client certificate (mutual
    authentication) and the sender verifies the destination's certificate against it; without
    it the listener asks for no client certificate and the sender uses the system's trust store.
    """

    certificate: Path
    private_key: Path
    ca_certificates: Path | None


DEFAULT_HTTP_PORT = 9811
"""``http.port``: the metrics and health endpoint of ``serve`` and ``listen``."""
DEFAULT_HTTP_WORK_PORT = 9812
"""``http.work_port``: the endpoint of ``work`` (a split deployment runs both on one host)."""


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: the HTTP endpoint operators watch (``/metrics``, ``/healthz``, ``/readyz``).

    ``serve`` and ``listen`` serve on ``port``, ``work`` on ``work_port`` (0: any free port,
    logged as ``http_started``). With ``certificate`` and ``private_key`` (PEM, both or neither)
    the endpoint speaks HTTPS only."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    work_port: int = DEFAULT_HTTP_WORK_PORT
    certificate: Path | None = None
    private_key: Path | None = None

    def port_of(self, role: str) -> int:
        """The port of ``role`` (``serve``, ``listen`` or ``work``)."""
        return self.work_port if role == "work" else self.port


@dataclass(frozen=True)
class AllowedCaller:
    """``[[allowed_callers]]``: a calling AE title and the IP address it must come from."""

    ae_title: str
    host: str


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    node: NodeConfig
    study: StudyConfig
    inference: InferenceConfig
    outputs: OutputsConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    destinations: tuple[Destination, ...]
    allowed_callers: tuple[AllowedCaller, ...]
    source: Path | None = None
    tls: TlsConfig | None = None
    retention: RetentionConfig = RetentionConfig()
    identity: IdentityConfig = IdentityConfig()
    scope: ScopeConfig = ScopeConfig()
    http: HttpConfig = HttpConfig()


class _Table:
    """Reads typed keys out of one TOML table and refuses keys nobody asked for."""

    def __init__(self, raw: object, name: str, base_dir: Path) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{name}: must be a table, got {type(raw).__name__}")
        self._raw: Mapping[str, Any] = raw
        self._name = name
        self._base_dir = base_dir
        self._seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self._name}.{key}"

    def _get(self, key: str, default: object) -> object:
        self._seen.add(key)
        if key in self._raw:
            return self._raw[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self._key(key)}: is required")
        return default

    def string(self, key: str, default: object = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._key(key)}: must be a string, got {value!r}")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in allowed:
            raise ConfigError(f"{self._key(key)}: must be one of {allowed}, got {value!r}")
        return value

    def integer(self, key: str, default: object, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f"{self._key(key)}: must be an integer in {low}..{high}, got {value!r}"
            )
        return value

    def integer_or_auto(self, key: str, auto: int, low: int, high: int) -> int:
        """An integer in ``low..high``, or ``"auto"`` (the default) for ``auto``."""
        value = self._get(key, "auto")
        if value == "auto":
            return auto
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(
                f'{self._key(key)}: must be "auto" or an integer in {low}..{high}, got {value!r}'
            )
        return value

    def seconds(self, key: str, default: object) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{self._key(key)}: must be a number of seconds > 0, got {value!r}")
        return float(value)

    def flag(self, key: str, default: object) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)}: must be true or false, got {value!r}")
        return value

    def optional_flag(self, key: str) -> bool | None:
        """A boolean, or None when the key is absent (the program decides)."""
        if key not in self._raw:
            self._seen.add(key)
            return None
        return self.flag(key, None)

    def path(self, key: str, default: object = None) -> Path:
        value = Path(self.string(key, default)).expanduser()
        return value if value.is_absolute() else (self._base_dir / value).resolve()

    def ae_title(self, key: str, default: object = None) -> str:
        value = self.string(key, default)
        try:
            return validate_ae_title(value)
        except ValueError as exc:
            raise ConfigError(f"{self._key(key)}: {exc}") from exc

    def host(self, key: str, default: object = None, *, ip_only: bool = False) -> str:
        value = self.string(key, default)
        if ip_only:
            try:
                return str(ipaddress.ip_address(value))
            except ValueError as exc:
                raise ConfigError(
                    f"{self._key(key)}: must be an IP address, got {value!r}"
                ) from exc
        if not value or any(c.isspace() for c in value):
            raise ConfigError(f"{self._key(key)}: must be a host name or address, got {value!r}")
        return value

    def finish(self) -> None:
        """Refuse keys that no reader asked for (typos, keys from another version)."""
        unknown = sorted(set(self._raw) - self._seen)
        if unknown:
            raise ConfigError(f"{self._name}: unknown key(s) {', '.join(unknown)}")


_REQUIRED = object()


def validate_ae_title(value: str) -> str:
    """Return ``value`` if it is a usable AE title (1-16 printable ASCII characters, no ``\\``).

    Leading and trailing spaces are not significant in DICOM and are refused here, so what is
    configured is what is compared.
    """
    if not value or value.strip() != value:
        raise ValueError(f"AE title must be non-empty without leading/trailing spaces: {value!r}")
    if len(value) > 16:
        raise ValueError(f"AE title is longer than 16 characters: {value!r}")
    if not all(" " <= c <= "~" and c != "\\" for c in value):
        raise ValueError(f"AE title must be printable ASCII without backslash: {value!r}")
    return value


def _array_of_tables(raw: object, name: str) -> list[object]:
    if not isinstance(raw, list):
        raise ConfigError(f"{name}: must be an array of tables ([[{name}]]), got {raw!r}")
    return raw


def _node(t: _Table) -> NodeConfig:
    return NodeConfig(
        ae_title=t.ae_title("ae_title", "FRACTURE_AI"),
        bind=t.host("bind", "127.0.0.1", ip_only=True),
        port=t.integer("port", 11112, 0, 65535),
        state_dir=t.path("state_dir", _REQUIRED),
        other_sop_classes=OtherSopClasses(
            t.choice("other_sop_classes", "discard", tuple(OtherSopClasses))
        ),
        max_pdu=t.integer("max_pdu", DEFAULT_MAX_PDU, 0, 2**32 - 1),
        max_associations=t.integer("max_associations", 16, 1, 1024),
        log_level=t.choice("log_level", "info", LOG_LEVELS),
        max_instance_bytes=t.integer("max_instance_bytes", 256 * MIB, 0, 2**63 - 1),
        min_free_bytes=t.integer("min_free_bytes", 256 * MIB, 0, 2**63 - 1),
        acse_timeout_seconds=t.seconds("acse_timeout_seconds", 30.0),
        dimse_timeout_seconds=t.seconds("dimse_timeout_seconds", 60.0),
        network_timeout_seconds=t.seconds("network_timeout_seconds", 60.0),
        tls=t.flag("tls", False),
        receive_processes=t.integer_or_auto(
            "receive_processes", auto_receive_processes(), 1, MAX_RECEIVE_PROCESSES
        ),
    )


def auto_receive_processes() -> int:
    """``node.receive_processes = "auto"``: one per CPU this process may use, at most
    :data:`AUTO_RECEIVE_PROCESSES_CAP` (receiving is mostly waiting on the network and the disk
    beyond that; the worker needs the cores)."""
    return max(1, min(AUTO_RECEIVE_PROCESSES_CAP, len(os.sched_getaffinity(0))))


def _existing_file(t: _Table, key: str, default: object = None) -> Path:
    path = t.path(key, default)
    if not path.is_file():
        raise ConfigError(f"{t._key(key)}: no such file: {path}")
    return path


def _private_key(t: _Table, key: str = "private_key") -> Path:
    """An existing private key file that only its owner and group may access."""
    private_key = _existing_file(t, key, _REQUIRED)
    mode = private_key.stat().st_mode & 0o777
    if mode & 0o007:
        raise ConfigError(
            f"{t._key(key)}: {private_key} is accessible to everyone (mode {mode:04o}); "
            "make it readable by the service only, e.g. chmod 0640 (owner root, group dicomnode)"
        )
    return private_key


def _tls(t: _Table) -> TlsConfig:
    has_ca = "ca_certificates" in t._raw
    certificate = _existing_file(t, "certificate", _REQUIRED)
    private_key = _private_key(t)
    return TlsConfig(
        certificate=certificate,
        private_key=private_key,
        ca_certificates=_existing_file(t, "ca_certificates") if has_ca else None,
    )


def _http(t: _Table, node: NodeConfig) -> HttpConfig:
    has_cert, has_key = "certificate" in t._raw, "private_key" in t._raw
    if has_cert != has_key:
        pair = ("private_key", "certificate")
        missing, given = pair if has_cert else pair[::-1]
        raise ConfigError(f"{t._key(missing)}: is required with http.{given} (HTTPS needs both)")
    http = HttpConfig(
        enabled=t.flag("enabled", True),
        bind=t.host("bind", "127.0.0.1", ip_only=True),
        port=t.integer("port", DEFAULT_HTTP_PORT, 0, 65535),
        work_port=t.integer("work_port", DEFAULT_HTTP_WORK_PORT, 0, 65535),
        certificate=_existing_file(t, "certificate") if has_cert else None,
        private_key=_private_key(t) if has_key else None,
    )
    if http.port and http.port == http.work_port:
        raise ConfigError(f"http.work_port: must differ from http.port ({http.port})")
    if http.enabled and node.port:
        for key in ("port", "work_port"):
            if getattr(http, key) == node.port:
                raise ConfigError(f"http.{key}: {node.port} is node.port, the DICOM port")
    return http


def _destination(t: _Table) -> Destination:
    return Destination(
        ae_title=t.ae_title("ae_title", _REQUIRED),
        host=t.host("host", _REQUIRED),
        port=t.integer("port", _REQUIRED, 1, 65535),
        tls=t.flag("tls", False),
    )


def _allowed_caller(t: _Table) -> AllowedCaller:
    return AllowedCaller(
        ae_title=t.ae_title("ae_title", _REQUIRED), host=t.host("host", _REQUIRED, ip_only=True)
    )


def parse_config(data: Mapping[str, Any], base_dir: Path, source: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML; relative paths resolve against ``base_dir``."""
    root = _Table(data, "config", base_dir)

    def table(name: str) -> _Table:
        return _Table(root._get(name, {}), name, base_dir)

    node_t, study_t, inference_t = table("node"), table("study"), table("inference")
    outputs_t, queue_t, delivery_t = table("outputs"), table("queue"), table("delivery")
    retention_t = table("retention")
    retention = RetentionConfig(keep_days=retention_t.integer("keep_days", 30, 0, 36500))
    node = _node(node_t)
    study = StudyConfig(stable_seconds=study_t.seconds("stable_seconds", 10.0))
    inference = InferenceConfig(
        weights=inference_t.path("weights", "ensemble_weights"),
        device=Device(inference_t.choice("device", "auto", tuple(Device))),
        precision=inference_t.choice("precision", "auto", PRECISIONS),
        channels_last=(
            inference_t.flag("channels_last", False)
            if "channels_last" in inference_t._raw
            else None
        ),
        # "auto" reads as 0 (outside 1..limit, so never a value a file can give): None
        max_batch=inference_t.integer_or_auto("max_batch", 0, 1, MAX_BATCH_LIMIT) or None,
    )
    outputs = OutputsConfig(
        sr=outputs_t.flag("sr", True),
        sc=outputs_t.flag("sc", True),
        gsps=outputs_t.flag("gsps", False),
        withdraw_superseded=outputs_t.flag("withdraw_superseded", True),
    )
    identity_t, scope_t, http_t = table("identity"), table("scope"), table("http")
    identity = _identity(identity_t)
    scope = _scope(scope_t)
    http = _http(http_t, node)
    backend = QueueBackend(queue_t.choice("backend", "sqlite", tuple(QueueBackend)))
    queue = QueueConfig(
        lease_seconds=queue_t.seconds("lease_seconds", 600.0),
        max_attempts=queue_t.integer("max_attempts", 3, 1, 100),
        retry_initial_seconds=queue_t.seconds("retry_initial_seconds", 30.0),
        retry_max_seconds=queue_t.seconds("retry_max_seconds", 3600.0),
        backend=backend,
        broker=_broker(queue_t, base_dir) if backend is QueueBackend.RABBITMQ else None,
    )
    delivery = DeliveryConfig(
        retry_initial_seconds=delivery_t.seconds("retry_initial_seconds", 30.0),
        retry_max_seconds=delivery_t.seconds("retry_max_seconds", 3600.0),
        give_up_after_seconds=delivery_t.seconds("give_up_after_seconds", 48 * 3600.0),
        timeout_seconds=delivery_t.seconds("timeout_seconds", 60.0),
    )
    if not (outputs.sr or outputs.sc or outputs.gsps):
        raise ConfigError("outputs: at least one of sr, sc and gsps must be true")
    for name, policy in (("queue", queue), ("delivery", delivery)):
        if policy.retry_max_seconds < policy.retry_initial_seconds:
            raise ConfigError(f"{name}.retry_max_seconds: must be >= {name}.retry_initial_seconds")
    destinations = []
    for i, raw in enumerate(_array_of_tables(root._get("destinations", []), "destinations")):
        t = _Table(raw, f"destinations[{i}]", base_dir)
        destinations.append(_destination(t))
        t.finish()
    callers = []
    for i, raw in enumerate(_array_of_tables(root._get("allowed_callers", []), "allowed_callers")):
        t = _Table(raw, f"allowed_callers[{i}]", base_dir)
        callers.append(_allowed_caller(t))
        t.finish()
    tls: TlsConfig | None = None
    if "tls" in data:
        tls_t = table("tls")
        tls = _tls(tls_t)
        tls_t.finish()
    for t in (
        root,
        node_t,
        study_t,
        inference_t,
        outputs_t,
        queue_t,
        delivery_t,
        retention_t,
        identity_t,
        scope_t,
        http_t,
    ):
        t.finish()
    needs_tls = ["node.tls"] if node.tls else []
    needs_tls += [f"destinations[{i}].tls" for i, d in enumerate(destinations) if d.tls]
    if needs_tls and tls is None:
        raise ConfigError(f"{needs_tls[0]}: needs a [tls] table with certificate and private_key")
    keys = [d.key for d in destinations]
    if len(set(keys)) != len(keys):
        raise ConfigError(
            f"destinations: listed twice: {sorted(k for k in keys if keys.count(k) > 1)}"
        )
    return Config(
        node=node,
        study=study,
        inference=inference,
        outputs=outputs,
        queue=queue,
        delivery=delivery,
        destinations=tuple(destinations),
        allowed_callers=tuple(callers),
        source=source,
        tls=tls,
        retention=retention,
        identity=identity,
        scope=scope,
        http=http,
    )


_SITE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _broker(t: _Table, base_dir: Path) -> BrokerConfig:
    """The broker keys of ``[queue]`` (``backend = "rabbitmq"``)."""
    url = t.string("url", _REQUIRED)
    scheme = url.partition("://")[0]
    if scheme not in ("amqp", "amqps"):
        raise ConfigError(f"queue.url: must start with amqp:// or amqps://, got {scheme!r}")
    if "@" in url.partition("://")[2].partition("/")[0]:
        raise ConfigError("queue.url: no user or password in the URL; use queue.credentials_file")
    has_cert, has_key = "certificate" in t._raw, "private_key" in t._raw
    if has_cert != has_key:
        raise ConfigError("queue.certificate: certificate and private_key go together")
    levels = t.integer("levels", 2, 1, 10)
    site = t.string("site") if "site" in t._raw else None
    if site is not None and not _SITE_RE.fullmatch(site):
        raise ConfigError(f"queue.site: letters, digits, '-' and '_' (1-63), got {site!r}")
    prefix = t.string("prefix", "dicomnode")
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigError(f"queue.prefix: letters, digits, '.', '-', '_' (1-63), got {prefix!r}")
    rules = []
    for i, raw in enumerate(_array_of_tables(t._get("priority", []), "queue.priority")):
        r = _Table(raw, f"queue.priority[{i}]", base_dir)
        rule = PriorityRuleConfig(
            level=r.integer("level", _REQUIRED, 0, levels - 1),
            calling_ae=r.ae_title("calling_ae") if "calling_ae" in r._raw else None,
            station_name=r.string("station_name") if "station_name" in r._raw else None,
        )
        r.finish()
        if rule.calling_ae is None and rule.station_name is None:
            raise ConfigError(f"queue.priority[{i}]: needs calling_ae or station_name")
        rules.append(rule)
    instances = None
    token_file = None
    if "instances" in t._raw:
        i_t = _Table(t._get("instances", {}), "queue.instances", base_dir)
        token_file = _existing_file(i_t, "token_file", _REQUIRED)
        i_has_cert, i_has_key = "certificate" in i_t._raw, "private_key" in i_t._raw
        if i_has_cert != i_has_key:
            raise ConfigError(
                "queue.instances.certificate: certificate and private_key go together"
            )
        instance_url = i_t.string("url", "")
        if instance_url and not instance_url.startswith(("http://", "https://")):
            raise ConfigError(f"queue.instances.url: must be http(s)://..., got {instance_url!r}")
        port = i_t.integer("port", 8443, 0, 65535)
        instances = InstanceServerConfig(
            bind=i_t.host("bind", "127.0.0.1", ip_only=True),
            port=port,
            url=instance_url,
            token_file=token_file,
            certificate=_existing_file(i_t, "certificate") if i_has_cert else None,
            private_key=_private_key(i_t) if i_has_key else None,
        )
        i_t.finish()
    default_priority = t.integer("default_priority", min(1, levels - 1), 0, levels - 1)
    return BrokerConfig(
        url=url,
        credentials_file=_private_key(t, "credentials_file") if "credentials_file" in t._raw
        else None,
        ca_certificates=_existing_file(t, "ca_certificates") if "ca_certificates" in t._raw
        else None,
        certificate=_existing_file(t, "certificate") if has_cert else None,
        private_key=_private_key(t) if has_key else None,
        prefix=prefix,
        levels=levels,
        default_priority=default_priority,
        delivery_limit=t.integer("delivery_limit", 5, 1, 1000),
        heartbeat_seconds=t.integer("heartbeat_seconds", 30, 0, 3600),
        dispatch_seconds=t.seconds("dispatch_seconds", 6 * 3600.0),
        site=site,
        priority=tuple(rules),
        instances=instances,
        token_file=token_file,
    )


_UID_ROOT_RE = re.compile(r"[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.?|0(\.(0|[1-9][0-9]*))+\.?")
MAX_UID_ROOT = 40
"""Longest UID root accepted: result UIDs add about 20 digits below it (64 in all)."""


def _identity(t: _Table) -> IdentityConfig:
    root = t.string("uid_root", DEFAULT_UID_ROOT)
    if not _UID_ROOT_RE.fullmatch(root) or len(root.rstrip(".")) > MAX_UID_ROOT:
        raise ConfigError(
            f"identity.uid_root: must be a UID root of digits and dots (no leading zeros), at "
            f"most {MAX_UID_ROOT} characters, got {root!r}"
        )
    values = {
        key: t.string(key, "")
        for key in ("institution_name", "station_name", "device_serial_number")
    }
    for key, limit in (
        ("institution_name", 64),
        ("station_name", 16),
        ("device_serial_number", 64),
    ):
        if len(values[key]) > limit or "\\" in values[key]:
            raise ConfigError(f"identity.{key}: at most {limit} characters, no backslash")
    model = t.string("manufacturer_model_name", "fracture-dicomnode")
    if not model or len(model) > 64 or "\\" in model:
        raise ConfigError("identity.manufacturer_model_name: 1 to 64 characters, no backslash")
    return IdentityConfig(uid_root=root.rstrip(".") + ".", manufacturer_model_name=model, **values)


def _strings(t: _Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = t._get(key, list(default))
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{t._key(key)}: must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _scope(t: _Table) -> ScopeConfig:
    modalities = tuple(m.strip().upper() for m in _strings(t, "modalities", ScopeConfig.modalities))
    raw_regions = t._get("regions", CALIBRATED)
    regions = (raw_regions,) if isinstance(raw_regions, str) else raw_regions
    if (
        not isinstance(regions, list | tuple)
        or not regions
        or not all(isinstance(r, str) for r in regions)
    ):
        raise ConfigError(f'scope.regions: must be "{CALIBRATED}" or a list of region keys')
    if CALIBRATED in regions and len(regions) > 1:
        raise ConfigError(f'scope.regions: "{CALIBRATED}" stands alone, got {list(regions)}')
    known = _region_keys()
    unknown = sorted(set(regions) - known - {CALIBRATED})
    if unknown:
        raise ConfigError(f"scope.regions: unknown region {unknown[0]!r}; known: {sorted(known)}")
    return ScopeConfig(
        modalities=modalities,
        regions=tuple(regions),
        unknown_region=UnknownRegion(t.choice("unknown_region", "analyse", tuple(UnknownRegion))),
        out_of_scope=OutOfScope(t.choice("out_of_scope", "report", tuple(OutOfScope))),
    )


def _region_keys() -> set[str]:
    from inference.regions import REGIONS  # pure Python, no torch

    return set(REGIONS)


def load_config(path: Path | str) -> Config:
    """Read and check the TOML file at ``path``."""
    path = Path(path).expanduser().resolve()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, path.parent, source=path)
