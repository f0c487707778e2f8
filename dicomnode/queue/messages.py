"""What crosses the broker between a site and the worker pool: small frozen records as JSON.

A **job** goes from a site (its listener host) to any worker: the study, its version, the
instances (UIDs, size, SHA-256, and the URL the worker fetches each from the site's instance
server) and the result objects of the previous version (for the predecessor SR and the
withdrawal of superseded results). A **result file** goes back from the worker to the site's
results queue, one message per file (its bytes in the body), then one **outcome** that closes
the job: the files it wrote (results) or the reason it could not (failure). No patient data is
in any header or JSON: UIDs, sizes, hashes, states and reasons only (the DICOM bytes in file
messages are patient data, which is why the broker connection between hosts uses TLS).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

FORMAT = 1
"""Version of the message format (a field of every message; a reader refuses others)."""


class MessageError(ValueError):
    """A message that is not a well-formed message of this format."""


@dataclass(frozen=True)
class InstanceRef:
    """One stored instance of a job's study, and where the worker fetches it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    size: int
    sha256: str
    url: str


@dataclass(frozen=True)
class ResultRef:
    """A result object the site recorded for an earlier version of the study."""

    kind: str
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class JobMessage:
    """One study job for the worker pool. ``job_id`` is the site's; ``(site, job_id, attempt)``
    is unique (a job the site publishes again after its dispatch timeout has a new attempt)."""

    site: str
    job_id: int
    attempt: int
    study_instance_uid: str
    version: int
    priority: int
    instances: tuple[InstanceRef, ...]
    predecessors: tuple[ResultRef, ...]
    format: int = FORMAT

    @property
    def key(self) -> str:
        return f"{self.site}/{self.job_id}"


@dataclass(frozen=True)
class ResultFileMessage:
    """Header of one result file (its bytes are the message body)."""

    site: str
    job_id: int
    kind: str
    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sha256: str
    format: int = FORMAT


Outcome = Literal["results", "failed"]


@dataclass(frozen=True)
class OutcomeMessage:
    """The end of a job: its result files (sent before it, on the same channel) and the note, or
    the reason it failed. ``retryable`` failures are not sent as outcomes (the worker gives the
    job back to the broker); a failed outcome is final (e.g. no header of the study readable)."""

    site: str
    job_id: int
    attempt: int
    study_instance_uid: str
    version: int
    outcome: Outcome
    files: tuple[ResultFileMessage, ...] = ()
    note: str | None = None
    reason: str | None = None
    worker: str = ""
    deliveries: int = 1
    """How often the broker had delivered the job to the pool when this answer was made (its
    quorum queue's delivery count + 1)."""
    format: int = FORMAT


def encode(message: JobMessage | ResultFileMessage | OutcomeMessage) -> bytes:
    """JSON bytes of a message (tuples become lists)."""
    return json.dumps(asdict(message), sort_keys=True).encode("utf-8")


def _build(cls: type[Any], data: object, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise MessageError(f"{where}: not a JSON object")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MessageError(f"{where}: unknown keys {unknown}")
    if data.get("format", FORMAT) != FORMAT:
        raise MessageError(f"{where}: format {data.get('format')!r}, this node reads {FORMAT}")
    values = dict(data)
    for key, item_cls in _NESTED.get(cls, {}).items():
        if key in values:
            if not isinstance(values[key], list):
                raise MessageError(f"{where}: {key} must be a list")
            values[key] = tuple(_build(item_cls, v, f"{where}.{key}") for v in values[key])
    try:
        return cls(**values)
    except TypeError as exc:
        raise MessageError(f"{where}: {exc}") from None


_NESTED: dict[type, dict[str, type]] = {
    JobMessage: {"instances": InstanceRef, "predecessors": ResultRef},
    OutcomeMessage: {"files": ResultFileMessage},
}


def decode_job(body: bytes) -> JobMessage:
    return _decode(JobMessage, body)


def decode_result_file(header: bytes) -> ResultFileMessage:
    return _decode(ResultFileMessage, header)


def decode_outcome(body: bytes) -> OutcomeMessage:
    return _decode(OutcomeMessage, body)


def _decode(cls: type[Any], body: bytes) -> Any:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{cls.__name__}: not JSON ({exc})") from None
    return _build(cls, data, cls.__name__)
