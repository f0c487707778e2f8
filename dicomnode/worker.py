"""The worker role: lease a study job, decode its views, run the ensemble, write the results.

One job is one study (``StudyJob``): every stored instance of it is decoded (``load_view``); an
instance that cannot become one grey-level image is skipped with its reason, and a study of
which no view decodes fails with the reasons, without affecting any other study. The anatomical
region of each view comes from its header (Body Part Examined, then Series Description, Protocol
Name, Study Description). All decodable views of the study go through the ensemble in one
batch; the result objects (SR, Secondary Capture, GSPS as ``[outputs]`` asks) are written under
``results/<StudyUID>/job-<id>/`` and handed to the queue, which creates one delivery per
destination. A re-run of a study (a late or corrected instance) writes a new SR naming the
previous one as predecessor; result UIDs follow each source image's SOP Instance UID and bytes
(``View.sha256``, the SHA-256 of the stored file as decoded: the listener does not hash), see
:mod:`dicomnode.uids`.

The lease is renewed in the background while a job runs, so a slow study on a slow machine is
not taken over by another worker; a worker that dies simply lets its lease expire and the job
returns to the queue. Logs carry UIDs, states and reasons only, never patient data.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DigitalXRayImageStorageForPresentation

from dicomnode import metrics
from dicomnode.config import Config, OutOfScope
from dicomnode.logging import get_logger
from dicomnode.pixels import (
    PixelDataError,
    View,
    drop_unreadable,
    load_view,
    region_hints,
    to_uint8,
)
from dicomnode.queue.protocol import JobQueue, LeaseLostError
from dicomnode.queue.sqlite import open_queue
from dicomnode.records import (
    IDLE_POLL_SECONDS,
    EventLike,
    JobState,
    ResultFile,
    StoredInstance,
    StudyJob,
)
from dicomnode.scope import Scope
from dicomnode.storage import StateLayout, file_sha256, installation_uid
from dicomnode.uids import ResultKind, SourceIdentity, derive_uid
from dicomnode.writers import (
    ImageFinding,
    NodeIdentity,
    NotAnalysedImage,
    PreviousReport,
    ResultObjects,
    Withdrawn,
    write_results,
)
from inference.ensemble import Ensemble
from inference.memory import chunk_bounds
from inference.records import AlgorithmInfo, Box, Decision, ImageResult, Thresholds
from inference.regions import RegionMatch, match_other_anatomy, resolve_region

log = get_logger(__name__)

PACKAGE = "fracture-dicomnode"
WARM_UP_SIDE = 64
"""Side in pixels of the synthetic view :func:`warm_up_writers` writes results for."""


class NoDecodableViewsError(ValueError):
    """No instance of the study could be decoded and analysed; the message lists why."""


@dataclass(frozen=True)
class SkippedView:
    """An instance of a study that was not analysed, and why (no patient data in ``reason``)."""

    sop_instance_uid: str
    reason: str


@dataclass(frozen=True)
class DecodedStudy:
    """The decodable views of a study (in instance order) and the instances skipped."""

    views: tuple[View, ...]
    skipped: tuple[SkippedView, ...]


@dataclass(frozen=True)
class AnalysedChunk:
    """One chunk of a study's instances, decoded and analysed; the views it keeps hold only
    their 8-bit display pixels (what the result writers draw)."""

    findings: tuple[ImageFinding, ...]
    outside: tuple[NotAnalysedImage, ...]
    """Views outside the intended use."""
    unsuitable: tuple[NotAnalysedImage, ...]
    """Views inference refused (too small, blank)."""
    refused: tuple[SkippedView, ...]
    """The same, as the status note and the log name them."""
    undecoded: tuple[SkippedView, ...]
    """Instances that did not decode."""
    seconds: StepSeconds


@dataclass(frozen=True)
class StudyOutcome:
    """What processing one job produced: the result files written and the views skipped."""

    job_id: int
    study_instance_uid: str
    version: int
    results: tuple[ResultFile, ...]
    skipped: tuple[SkippedView, ...]
    analysed: int
    predecessor_sr: str | None
    seconds: StepSeconds
    """Wall time of each step (logged with the results)."""


@dataclass(frozen=True)
class StepSeconds:
    """Wall time of the steps of one job: decoding the views, the ensemble (pre-processing,
    members, post-processing) and writing the result objects."""

    decode: float
    analyse: float
    write: float

    def fields(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in asdict(self).items()}


def node_identity(config: Config) -> NodeIdentity:
    """This node as equipment in its result objects (``[identity]``): the installation's Device
    Observer UID (made once in the state directory), station name (default: the AE title),
    serial number (default: derived from the device UID), model and package version."""
    try:
        software = version(PACKAGE)
    except PackageNotFoundError:
        software = "unknown"
    identity = config.identity
    layout = StateLayout(config.node.state_dir).create()
    device_uid = installation_uid(layout, identity.uid_root)
    return NodeIdentity(
        software_version=software,
        model_name=identity.manufacturer_model_name,
        station_name=identity.station_name or config.node.ae_title,
        device_serial_number=identity.device_serial_number or serial_from_uid(device_uid),
        device_uid=device_uid,
        institution_name=identity.institution_name or None,
        uid_prefix=identity.uid_root,
    )


def serial_from_uid(uid: str) -> str:
    """A short serial number that follows an installation's device UID (its last 12 digits)."""
    digits = uid.replace(".", "")
    return digits[-12:]


def decode_reason(exc: Exception) -> str:
    """An admin-readable reason for an instance that did not decode, without patient data.

    :class:`PixelDataError` messages are built from file names (SOP Instance UIDs), transfer
    syntaxes and decoder messages; anything else is unexpected and reported by its type only,
    since a library's message may quote header values.
    """
    if isinstance(exc, PixelDataError):
        return str(exc)
    return f"unexpected {type(exc).__name__} while decoding (see the traceback in the log)"


def decode_study(instances: Sequence[StoredInstance]) -> DecodedStudy:
    """Decode every instance; those that cannot be analysed are skipped with their reason."""
    views: list[View] = []
    skipped: list[SkippedView] = []
    for instance in instances:
        try:
            view = load_view(instance.path)
        except Exception as exc:
            if not isinstance(exc, PixelDataError):
                log.error(
                    "view_decode_error",
                    sop_instance_uid=instance.sop_instance_uid,
                    error_type=type(exc).__name__,
                    traceback="".join(traceback.format_tb(exc.__traceback__)),
                )
            skipped.append(SkippedView(instance.sop_instance_uid, decode_reason(exc)))
            continue
        if instance.sha256 and view.sha256 != instance.sha256:
            # Where the job carries a hash (a pool's job; a row written by copy_durably): a
            # corrected re-send replaced the file after the job was leased; the results follow
            # the bytes decoded (view.sha256), and the study runs again for the change.
            log.warning(
                "instance_replaced_during_job",
                sop_instance_uid=instance.sop_instance_uid,
                leased_sha256=instance.sha256,
                decoded_sha256=view.sha256,
            )
        views.append(view)
    return DecodedStudy(tuple(views), tuple(skipped))


def resolve_view_region(view: View) -> RegionMatch:
    """The region of one view: Body Part Examined, then Series Description, Protocol Name and
    Study Description (the most specific text first: a study may hold views of several parts)."""
    hints = region_hints(view.header)
    study, series, protocol = hints.descriptions
    return resolve_region(body_part=hints.body_part or None, descriptions=[series, protocol, study])


def view_anatomy(view: View) -> tuple[RegionMatch, str | None]:
    """The view's region and, where none is found, the non-musculoskeletal anatomy its header
    names (chest, abdomen, head, breast), if any."""
    match = resolve_view_region(view)
    if match.region is not None:
        return match, None
    hints = region_hints(view.header)
    study, series, protocol = hints.descriptions
    other = match_other_anatomy(
        body_part=hints.body_part or None, descriptions=[series, protocol, study]
    )
    return match, other


def split_scope(scope: Scope, views: Sequence[View]) -> tuple[list[View], list[NotAnalysedImage]]:
    """The views inside the intended use, and the others with the reason they get no
    decision (their pixels kept for the capture that says so)."""
    inside: list[View] = []
    outside: list[NotAnalysedImage] = []
    for view in views:
        reason = scope.reason(view.header, *view_anatomy(view))
        if reason is None:
            inside.append(view)
        else:
            pixels = to_uint8(view.pixels)  # all a capture needs
            outside.append(NotAnalysedImage(view.header, view.source, reason, pixels))
    return inside, outside


UNSUITABLE = "unsuitable for automated analysis (too small or blank)"
UNDECODABLE = "the image data could not be decoded"


def unsuitable(view: View) -> NotAnalysedImage:
    """A view inference refused, as the radiologist is told of it."""
    return NotAnalysedImage(view.header, view.source, UNSUITABLE, to_uint8(view.pixels))


def unreadable(
    instances: Sequence[StoredInstance], skipped: Sequence[SkippedView]
) -> list[NotAnalysedImage]:
    """The instances whose pixels did not decode, described by their headers (an instance
    whose header cannot be read either is left to the status note and the log)."""
    by_uid = {instance.sop_instance_uid: instance for instance in instances}
    images = []
    for skip in skipped:
        instance = by_uid[skip.sop_instance_uid]
        try:
            header = pydicom.dcmread(instance.path, stop_before_pixels=True)
        except Exception:  # the reason is already logged and in the note
            continue
        drop_unreadable(header)  # as for a decoded view: the writers read this header
        source = SourceIdentity(
            instance.sop_instance_uid, instance.sha256 or file_sha256(instance.path)
        )
        images.append(NotAnalysedImage(header, source, UNDECODABLE))
    return images


def withdrawn(job: StudyJob) -> list[Withdrawn]:
    """The previous version's result objects (rejection notes aside): the candidates for
    withdrawal once this version's results are known."""
    return [
        Withdrawn(r.sop_class_uid, r.sop_instance_uid, r.series_instance_uid, r.path)
        for r in job.predecessors
        if r.kind != ResultKind.REJECTION_NOTE
    ]


def analyse_views(
    analyser: Ensemble, views: Sequence[View]
) -> tuple[list[ImageFinding], list[SkippedView]]:
    """Run the ensemble once on the views (it chunks them) and pair each result with its view.

    ``inference`` refuses images it cannot analyse with a ValueError (too small, constant...).
    Then each view is analysed alone, so that the refused ones are skipped with the reason
    (``inference`` never sees header data, so its messages carry none) and the others still
    get results. Returns the findings and the refused views.
    """
    matches = [resolve_view_region(view) for view in views]
    regions = [None if m.region is None else m.region.key for m in matches]
    try:
        results = analyser.analyse([view.pixels for view in views], regions)[0]
    except ValueError:
        return _analyse_one_by_one(analyser, views, matches)
    return [
        _finding(view, result, match)
        for view, result, match in zip(views, results, matches, strict=True)
    ], []


def _finding(view: View, result: ImageResult, match: RegionMatch) -> ImageFinding:
    if match.region is None:
        return ImageFinding(view, result)
    return ImageFinding(
        view, result, match.region.finding_site, region_name=match.region.display.lower()
    )


def _analyse_one_by_one(
    analyser: Ensemble, views: Sequence[View], matches: Sequence[RegionMatch]
) -> tuple[list[ImageFinding], list[SkippedView]]:
    findings: list[ImageFinding] = []
    refused: list[SkippedView] = []
    for view, match in zip(views, matches, strict=True):
        region = None if match.region is None else match.region.key
        try:
            (result,), _ = analyser.analyse([view.pixels], [region])
        except ValueError as exc:
            refused.append(
                SkippedView(view.sop_instance_uid, f"inference refused the image: {exc}")
            )
            continue
        findings.append(_finding(view, result, match))
    return findings, refused


def previous_report(job: StudyJob) -> PreviousReport | None:
    """The SR of the newest earlier version of the study, if one was written."""
    reports = [r for r in job.predecessors if r.kind == ResultKind.SR]
    if not reports:
        return None
    sr = reports[0]
    return PreviousReport(
        study_instance_uid=job.study_instance_uid,
        series_instance_uid=sr.series_instance_uid,
        sop_instance_uid=sr.sop_instance_uid,
        sop_class_uid=sr.sop_class_uid,
    )


def result_files(objects: ResultObjects) -> tuple[ResultFile, ...]:
    """The state database's records of the written result objects."""
    return tuple(
        ResultFile(
            kind=obj.kind.value,
            sop_class_uid=obj.sop_class_uid,
            series_instance_uid=obj.series_instance_uid,
            sop_instance_uid=obj.sop_instance_uid,
            path=obj.path,
        )
        for obj in objects.all
    )


def skipped_note(skipped: Sequence[SkippedView], analysed: int) -> str | None:
    """What ``status`` shows for a job that analysed some views and skipped others."""
    if not skipped:
        return None
    return f"{len(skipped)} of {len(skipped) + analysed} views skipped: {skipped_summary(skipped)}"


def skipped_summary(skipped: Sequence[SkippedView]) -> str:
    """One line naming every skipped instance and its reason."""
    return "; ".join(f"{s.sop_instance_uid}: {s.reason}" for s in skipped)


def failure_reason(exc: BaseException) -> str:
    """The reason recorded for a job that raised: the exception type and, for our own
    ``ValueError`` subclasses whose messages carry no header values, the message. (A library's
    message may quote header values such as a patient's name, so it stays out of the state.)"""
    if isinstance(exc, NoDecodableViewsError | PixelDataError):
        return str(exc)
    return f"{type(exc).__name__} while processing the study (see the traceback in the log)"


@contextmanager
def lease_kept(queue: JobQueue, job: StudyJob, interval: float) -> Iterator[threading.Event]:
    """Renew ``job``'s lease every ``interval`` seconds in a background thread while the block
    runs. The yielded event is set if the lease was lost (the block's outcome is then void)."""
    done, lost = threading.Event(), threading.Event()

    def renew() -> None:
        while not done.wait(interval):
            try:
                queue.renew(job)
            except LeaseLostError:
                lost.set()
                return
            except sqlite3.Error as exc:  # busy database: try again at the next interval
                log.warning("lease_renew_failed", job_id=job.job_id, error=type(exc).__name__)

    thread = threading.Thread(target=renew, name=f"lease-{job.job_id}", daemon=True)
    thread.start()
    try:
        yield lost
    finally:
        done.set()
        thread.join()


class StudyProcessor:
    """Analyses one study job with ``analyser`` (an :class:`Ensemble`) and writes its result
    objects; records nothing. The local :class:`Worker` and the broker worker of several hosts
    (:func:`dicomnode.queue.roles.run_broker_worker`) both process studies with it."""

    def __init__(
        self,
        config: Config,
        analyser: Ensemble,
        *,
        node: NodeIdentity | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        outputs = config.outputs
        if not (outputs.sr or outputs.sc or outputs.gsps):
            raise ValueError("outputs: at least one of sr, sc and gsps must be true")
        self.config = config
        self.analyser = analyser
        self.layout = StateLayout(config.node.state_dir)
        self.node = node or node_identity(config)
        self.heartbeat = heartbeat
        self.scope = Scope.resolve(config.scope, analyser.manifest.thresholds)

    def _beat(self) -> None:
        """Tell the service this worker is alive (between jobs and between a job's steps)."""
        if self.heartbeat is not None:
            self.heartbeat()

    def results_dir(self, job: StudyJob) -> Path:
        """Where one job's result files go: its own folder, so versions never overwrite."""
        return self.layout.results_dir / job.study_instance_uid / f"job-{job.job_id}"

    def process(self, job: StudyJob, folder: Path | None = None) -> StudyOutcome:
        """Decode, analyse and write the results of one job into ``folder`` (default:
        :meth:`results_dir`); nothing is recorded here.

        Every image gets an answer: analysed images a decision; the others (out of scope, not
        decodable, refused by inference) a "not analysed" entry with the reason. Raises
        :class:`NoDecodableViewsError` only when not even the header of any instance can be read.
        """
        chunks = []
        size = self.analyser.batch_size(len(job.instances))
        for start, stop in chunk_bounds(len(job.instances), size):
            chunks.append(self.analyse_chunk(job.instances[start:stop]))
            self._beat()
        t2 = time.perf_counter()
        findings = [f for chunk in chunks for f in chunk.findings]
        outside = [n for chunk in chunks for n in chunk.outside]
        undecoded = [s for chunk in chunks for s in chunk.undecoded]
        refused = [s for chunk in chunks for s in chunk.refused]
        not_analysed = [
            *outside,
            *(n for chunk in chunks for n in chunk.unsuitable),
            *unreadable(job.instances, undecoded),
        ]
        skipped = (
            *undecoded,
            *refused,
            *(SkippedView(n.sop_instance_uid, n.reason) for n in outside),
        )
        for skip in skipped:
            log.warning(
                "view_skipped",
                job_id=job.job_id,
                study_instance_uid=job.study_instance_uid,
                sop_instance_uid=skip.sop_instance_uid,
                reason=skip.reason,
            )
        if not findings and not not_analysed:
            raise NoDecodableViewsError(
                f"no instance of the study could be analysed: {skipped_summary(skipped)}"
            )
        previous = previous_report(job) if self.config.outputs.sr else None
        if not findings and len(outside) == len(not_analysed) and self.ignores_out_of_scope:
            objects = None  # out of scope, and the site wants nothing sent for such studies
        else:
            objects = write_results(
                findings,
                self.analyser.algorithm,
                self.node,
                self.results_dir(job) if folder is None else folder,
                previous=previous,
                report=self.config.outputs.sr,
                secondary_captures=self.config.outputs.sc,
                presentation_states=self.config.outputs.gsps,
                not_analysed=not_analysed,
                version=job.version,
                withdraw=withdrawn(job) if self.config.outputs.withdraw_superseded else (),
            )
        seconds = StepSeconds(
            sum(chunk.seconds.decode for chunk in chunks),
            sum(chunk.seconds.analyse for chunk in chunks),
            time.perf_counter() - t2,
        )
        return StudyOutcome(
            job_id=job.job_id,
            study_instance_uid=job.study_instance_uid,
            version=job.version,
            results=() if objects is None else result_files(objects),
            skipped=skipped,
            analysed=len(findings),
            predecessor_sr=None
            if previous is None or objects is None
            else previous.sop_instance_uid,
            seconds=seconds,
        )

    def analyse_chunk(self, instances: Sequence[StoredInstance]) -> AnalysedChunk:
        """Decode and analyse some of a study's instances (at most one chunk of the ensemble's
        ``max_batch``: only they are decoded in full precision at once), then keep only each
        view's 8-bit display pixels: a study's memory grows by a quarter of its decoded size,
        not by all of it."""
        t0 = time.perf_counter()
        decoded = decode_study(instances)
        t1 = time.perf_counter()
        analysable, outside = split_scope(self.scope, decoded.views)
        findings, refused = analyse_views(self.analyser, analysable) if analysable else ([], [])
        by_uid = {view.sop_instance_uid: view for view in analysable}
        return AnalysedChunk(
            findings=tuple(replace(f, view=f.view.compact()) for f in findings),
            outside=tuple(outside),
            unsuitable=tuple(unsuitable(by_uid[skip.sop_instance_uid]) for skip in refused),
            refused=tuple(refused),
            undecoded=decoded.skipped,
            seconds=StepSeconds(t1 - t0, time.perf_counter() - t1, 0.0),
        )

    @property
    def ignores_out_of_scope(self) -> bool:
        return self.scope.out_of_scope is OutOfScope.IGNORE


class Worker(StudyProcessor):
    """Processes study jobs from ``queue`` with ``analyser`` (an :class:`Ensemble`)."""

    def __init__(
        self,
        config: Config,
        analyser: Ensemble,
        queue: JobQueue,
        *,
        owner: str | None = None,
        node: NodeIdentity | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config, analyser, node=node, heartbeat=heartbeat)
        self.queue = queue
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.renew_interval = config.queue.lease_seconds / 3

    def handle(self, job: StudyJob) -> JobState | None:
        """Process a leased job and record its outcome; returns the job's new state, or None
        when the lease was lost meanwhile (another worker owns the job now)."""
        bound = log.bind(
            job_id=job.job_id, study_instance_uid=job.study_instance_uid, version=job.version
        )
        bound.info("job_leased", attempt=job.attempt, instances=len(job.instances))
        with lease_kept(self.queue, job, self.renew_interval) as lost:
            try:
                outcome = self.process(job)
            except Exception as exc:
                return self._fail(job, exc, lost.is_set())
        # nothing written (a study outside the intended use, out_of_scope = "ignore"): done
        destinations = self.config.destinations if outcome.results else ()
        try:
            note = skipped_note(outcome.skipped, outcome.analysed)
            self.queue.complete(job, outcome.results, destinations, note=note)
        except LeaseLostError:
            bound.warning("job_lease_lost", stage="complete")
            return None
        state = JobState.RESULTS_WRITTEN if destinations else JobState.DELIVERED
        bound.info(
            "job_results_written",
            state=str(state),
            analysed=outcome.analysed,
            skipped=len(outcome.skipped),
            results=[f"{r.kind}:{r.sop_instance_uid}" for r in outcome.results],
            predecessor_sr=outcome.predecessor_sr,
            destinations=[d.key for d in destinations],
            seconds=outcome.seconds.fields(),
        )
        metrics.job_processed(
            str(state), asdict(outcome.seconds), outcome.analysed, len(outcome.skipped)
        )
        return state

    def _fail(self, job: StudyJob, exc: Exception, lost: bool) -> JobState | None:
        """Record a failed attempt: retried (up to ``max_attempts``) unless no view decodes."""
        reason = failure_reason(exc)
        retryable = not isinstance(exc, NoDecodableViewsError)
        logger = log.bind(job_id=job.job_id, study_instance_uid=job.study_instance_uid)
        if retryable:
            logger.error(
                "job_error",
                error_type=type(exc).__name__,
                traceback="".join(traceback.format_tb(exc.__traceback__)),
            )
        if lost:
            logger.warning("job_lease_lost", stage="process")
            return None
        try:
            state = self.queue.fail(job, reason, retryable=retryable)
        except LeaseLostError:
            logger.warning("job_lease_lost", stage="fail")
            return None
        logger.warning("job_failed", state=str(state), reason=reason, attempt=job.attempt)
        metrics.job_processed(str(state))
        return state

    def run_once(self) -> bool:
        """Lease and handle one job; False when none was ready."""
        job = self.queue.lease(self.owner)
        if job is None:
            return False
        self.handle(job)
        return True

    def run(self, stop: EventLike) -> None:
        """Handle jobs until ``stop`` is set (the current job is finished first)."""
        poll = min(IDLE_POLL_SECONDS, self.config.study.stable_seconds / 4)
        while not stop.is_set():
            self._beat()
            try:
                busy = self.run_once()
            except sqlite3.Error as exc:
                log.error("worker_queue_error", error=f"{type(exc).__name__}: {exc}")
                busy = False
            if not busy:
                stop.wait(poll)


def warm_up_view(side: int = WARM_UP_SIDE) -> View:
    """A synthetic DX view (a grey ramp, no patient) for :func:`warm_up_writers`: the header
    holds what the writers read of a source."""
    header = Dataset()
    header.SpecificCharacterSet = "ISO_IR 192"
    header.SOPClassUID = DigitalXRayImageStorageForPresentation
    header.SOPInstanceUID, header.StudyInstanceUID, header.SeriesInstanceUID = (
        str(derive_uid("warm-up", part)) for part in ("instance", "study", "series")
    )
    header.Modality, header.BodyPartExamined = "DX", "HAND"
    header.PatientName, header.PatientID = "Warm-up^Synthetic", "WARM-UP"
    for keyword in (
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "PatientOrientation",
    ):
        setattr(header, keyword, None)
    header.SamplesPerPixel, header.PhotometricInterpretation = 1, "MONOCHROME2"
    header.Rows = header.Columns = side
    header.BitsAllocated = header.BitsStored = 8
    header.HighBit, header.PixelRepresentation = 7, 0
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
    pixels = np.add.outer(ramp, ramp) / 2
    return View(pixels=pixels, header=header, sha256=hashlib.sha256(pixels.tobytes()).hexdigest())


def warm_up_writers(node: NodeIdentity, algorithm: AlgorithmInfo) -> float:
    """Write one synthetic result set (SR, SC, GSPS) into a temporary folder, delete it, and
    return the seconds it took.

    highdicom reads its tables of the standard on first use (about half a second), which the
    first study after a start would otherwise pay; the pass also shows at start, before any
    job is taken, that the writers work here (an error stops the worker like bad weights)."""
    t0 = time.perf_counter()
    side = float(WARM_UP_SIDE)
    result = ImageResult(
        score=0.9,
        decision=Decision.FRACTURE,
        boxes=(Box(side / 4, side / 4, side / 2, side / 2, 0.9),),
        region="hand",
        group="hand",
        group_fallback=False,
        thresholds=Thresholds(sensitivity=0.3, high_specificity=0.6, binarize=0.5),
    )
    with tempfile.TemporaryDirectory(prefix="dicomnode-warm-up-") as folder:
        findings = [ImageFinding(warm_up_view(), result)]
        write_results(findings, algorithm, node, Path(folder) / "results", presentation_states=True)
    return time.perf_counter() - t0


def load_ensemble(config: Config) -> Ensemble:
    """The ensemble of ``[inference]``: weights, device, speed and ``max_batch`` (the most views
    of a study analysed at once; None: sized from the free memory for each study)."""
    return Ensemble.load(
        config.inference.weights,
        device=str(config.inference.device),
        precision=config.inference.precision,
        channels_last=config.inference.channels_last,
        max_batch=config.inference.max_batch,
    )


def run_worker(
    config: Config,
    stop: EventLike,
    ready: Callable[[], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> None:
    """Load the ensemble, then handle jobs until ``stop`` is set.

    ``ready`` is called once the weights are loaded, the writers warmed up
    (:func:`warm_up_writers`) and the queue is open.
    """
    ensemble = load_ensemble(config)
    warm_up_seconds = warm_up_writers(node_identity(config), ensemble.algorithm)
    with StateLayout(config.node.state_dir).open_db() as db:
        worker = Worker(config, ensemble, open_queue(db, config), heartbeat=heartbeat)
        algorithm = ensemble.algorithm
        log.info(
            "worker_started",
            owner=worker.owner,
            algorithm=algorithm.name,
            algorithm_version=algorithm.version,
            device=str(ensemble.device),
            speed=ensemble.speed.describe(),
            max_batch=ensemble.max_batch or "auto",
            trained=ensemble.manifest.trained,
            writers_warm_up_seconds=round(warm_up_seconds, 3),
        )
        metrics.model_loaded(
            algorithm.name, algorithm.version, str(ensemble.device), ensemble.speed.precision
        )
        if ready is not None:
            ready()
        worker.run(stop)
        log.info("worker_stopped", owner=worker.owner)
