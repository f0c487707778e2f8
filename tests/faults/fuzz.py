"""Fuzzing at scale (issue 13): mutated files and PDUs against the real listener, the worker and
the result writers, every case reproducible from ``(seed, index)``.

``python -m tests.faults.fuzz --cases 10000 --seed N`` (the release run) prints the summary as
JSON; ``tests/faults/test_fuzz.py`` runs a smaller seed-fixed run in CI. What one run does:

1. builds the base files (:mod:`tests.faults.fuzz_corpus`) and a tiny random ensemble that calls
   every image a fracture (so every analysed image has boxes for the SR, SC and GSPS);
2. starts ``python -m dicomnode listen`` on a free port of 127.0.0.1 (two receiving processes,
   short ACSE and network timeouts), stopped by PID at the end;
3. runs the stored regression cases (``fuzz_regressions.json``: one per defect found and fixed),
   then ``--cases`` cases drawn from the seed: about 70 % mutated files
   (:mod:`tests.faults.fuzz_files`), sent with pynetdicom as their bytes are (chunked send), in
   studies of about five instances; the rest mutated PDU exchanges (:mod:`tests.faults.fuzz_pdus`)
   over raw sockets, eight at a time;
4. after every batch: the listener must still run and answer C-ECHO; then the worker (in this
   process, on the listener's own state directory and queue, outputs SR + SC + GSPS) processes
   every study the listener queued, and every accepted instance must get an answer: the
   study's SR and a Secondary Capture naming it (analysed, or "not analysed" with the reason);
   every result object of every ``--validate-every``-th study (default: every study), and of
   every study holding a stored regression case, is checked with ``dciodvfy``.

Invariants (each violation is a *defect*, listed with its case in the summary): the listener
never dies and answers C-ECHO after every batch; every file case gets a C-STORE status from the
documented set (never 0xC001, never no status); every PDU case ends with the node closing the
connection within its timeouts (having answered with A-ASSOCIATE-RJ, A-ABORT, A-RELEASE-RP or a
DIMSE status, or closing after our own A-ABORT); the listener logs no internal error; the worker
never raises, never meets an unexpected exception while decoding, and answers every accepted
instance; dciodvfy reports no error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import torch
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import load_config
from dicomnode.demo import free_port
from dicomnode.logging import configure_logging
from dicomnode.queue.sqlite import SqliteJobQueue
from dicomnode.records import JobState, StudyJob
from dicomnode.scp import CR_DX_SOP_CLASSES, TRANSFER_SYNTAXES
from dicomnode.storage import StateLayout
from dicomnode.worker import StudyOutcome, Worker, failure_reason, skipped_note
from inference.ensemble import Ensemble
from tests.dciodvfy_rules import INVALID_VALUES_SUMMARY, katakana_in_iso_ir_13
from tests.faults.conftest import echo_ok
from tests.faults.fuzz_corpus import Base, build_bases
from tests.faults.fuzz_files import FileCase, build_file, draw_file_case
from tests.faults.fuzz_pdus import PduCase, Reply, draw_pdu_case, exchange, request_bytes
from tests.test_node_e2e import DCIODVFY, NODE_AE, NodeProcess, node, positive_weights

REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions.json"
#: Statuses a file case may get (README, Receiving images); 0xC001 is an internal error.
FILE_STATUSES = {"0x0000", "0x0122", "0xA700", "0xA900", "0xC000"}
#: Log events of the listener that mean something broke inside it.
LISTENER_CRASH_EVENTS = {"instance_failed", "role_crashed", "receiver_process_died",
                         "listener_housekeeping_failed", "study_housekeeping_failed",
                         "spool_cleanup_failed"}
STUDY_SIZE = 5
PDU_THREADS = 8
PDU_DEADLINE = 10.0
OTHER_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.104.1")


def derived_uid(*parts: object) -> str:
    """A UID under 2.25 derived from ``parts``: the same case always gets the same UIDs."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()
    return f"2.25.{int(digest[:30], 16)}"


# -- cases ------------------------------------------------------------------------------------


def case_uids(seed: int, index: int) -> tuple[str, str, str]:
    """Study (about five cases each, not aligned with batches, so some studies arrive in two
    batches and run twice), series and SOP Instance UID of case ``index``; about 2 % of cases
    re-use the SOP Instance UID of the case before (a corrected re-send)."""
    study = (index + 2) // STUDY_SIZE
    rng = random.Random(f"{seed}:uid:{index}")
    sop_index = index - 1 if rng.random() < 0.02 and (index + 1) // STUDY_SIZE == study else index
    return (
        derived_uid(seed, "study", study),
        derived_uid(seed, "series", study),
        derived_uid(seed, "sop", sop_index),
    )


def draw_case(
    seed: int, index: int, bases: dict[str, Base], pdu_share: float
) -> FileCase | PduCase:
    """Case ``index`` of the run with ``seed`` (the same pair always gives the same case)."""
    rng = random.Random(f"{seed}:{index}")
    name = f"{seed}:{index}"
    if rng.random() < pdu_share:
        return draw_pdu_case(rng, name)
    return draw_file_case(rng, name, bases, case_uids(seed, index))


def regression_cases() -> list[FileCase | PduCase]:
    """The stored cases of the defects found so far (run first in every run)."""
    if not REGRESSIONS.exists():
        return []
    cases: list[FileCase | PduCase] = []
    for raw in json.loads(REGRESSIONS.read_text())["cases"]:
        case = raw["case"]
        cases.append(FileCase.from_json(case) if "base" in case else PduCase.from_json(case))
    return cases


# -- the run's bookkeeping ------------------------------------------------------------------------


@dataclass
class Tally:
    """What a run counted."""

    seed: int
    file_cases: int = 0
    pdu_cases: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    operations: Counter[str] = field(default_factory=Counter)
    liveness_checks: int = 0
    liveness_failures: int = 0
    studies: int = 0
    instances_answered: int = 0
    analysed: int = 0
    not_analysed: Counter[str] = field(default_factory=Counter)
    objects_validated: int = 0
    source_uid_findings: int = 0
    dciodvfy_limit_findings: int = 0
    defects: list[dict[str, Any]] = field(default_factory=list)
    seconds: Counter[str] = field(default_factory=Counter)

    def defect(self, kind: str, cases: Sequence[str], detail: str) -> None:
        self.defects.append({"kind": kind, "cases": list(cases), "detail": detail[-2000:]})

    def count(self, kind: str) -> int:
        return sum(1 for d in self.defects if d["kind"] == kind)

    def summary(self, machine: dict[str, str]) -> dict[str, Any]:
        kinds = Counter(d["kind"] for d in self.defects)
        return {
            "seed": self.seed,
            "cases_tried": self.file_cases + self.pdu_cases,
            "file_cases": self.file_cases,
            "pdu_cases": self.pdu_cases,
            "answers": dict(sorted(self.answers.items())),
            "listener_crashes": kinds["listener_died"] + kinds["listener_error"],
            "liveness_checks": self.liveness_checks,
            "liveness_failures": self.liveness_failures,
            "bad_answers": kinds["bad_file_status"] + kinds["pdu_hung"] + kinds["pdu_no_answer"],
            "worker_crashes": kinds["worker_exception"] + kinds["decode_exception"],
            "studies": self.studies,
            "studies_without_answer": len(
                {c for d in self.defects if d["kind"] == "no_answer" for c in d["cases"][:1]}
            ),
            "instances_answered": self.instances_answered,
            "instances_analysed": self.analysed,
            "instances_not_analysed": dict(sorted(self.not_analysed.items())),
            "objects_validated": self.objects_validated,
            "dciodvfy_source_uid_findings": self.source_uid_findings,
            "dciodvfy_limit_findings": self.dciodvfy_limit_findings,
            "dciodvfy_errors": kinds["dciodvfy"],
            "defects": len(self.defects),
            "defects_by_kind": dict(sorted(kinds.items())),
            "operations": dict(sorted(self.operations.items())),
            "seconds": {k: round(v, 1) for k, v in sorted(self.seconds.items())},
            "machine": machine,
        }


@contextlib.contextmanager
def timed(tally: Tally, what: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        tally.seconds[what] += time.perf_counter() - start


# -- sending ----------------------------------------------------------------------------------


def modality_ae() -> AE:
    """A pynetdicom SCU with one presentation context per (CR/DX class, accepted syntax), so
    every file goes out with the transfer syntax its File Meta names, and two other classes."""
    ae = AE(ae_title="FUZZ_MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for sop_class in (*sorted(CR_DX_SOP_CLASSES), *OTHER_CLASSES):
        for syntax in TRANSFER_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    return ae


class FileSender:
    """Sends case files over one association, associating again whenever it ended."""

    def __init__(self, port: int, spool: Path) -> None:
        self.port = port
        self.ae = modality_ae()
        self.assoc: Association | None = None
        self.path = spool / "case.dcm"

    def send(self, data: bytes) -> str:
        """The node's answer: a status (``0xXXXX``) or how the association ended without one."""
        self.path.write_bytes(data)
        assoc = self._association()
        if assoc is None:
            return "association_refused"
        try:
            status = assoc.send_c_store(self.path)
        except (ValueError, AttributeError, EOFError, OSError, KeyError, TypeError) as exc:
            return f"unsendable:{type(exc).__name__}"  # our sender could not read the file
        if status and "Status" in status:
            return f"0x{int(status.Status):04X}"
        return "aborted" if not assoc.is_established else "no_status"

    def _association(self) -> Association | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        return self.assoc if self.assoc.is_established else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.ae.shutdown()


PDU_ANSWERS_OK = ("RJ", "ABORT", "RELEASE-RP", "status ")
TIMEOUT_CLOSE = 0.9
"""A node that closes without a word this long (seconds) after our last byte closed on its
ACSE or network timeout (1 s and 2 s in the harness): waiting for the rest of a PDU or for the
next one, PS3.8 ends so (ARTIM or network timeout, action AA-2)."""
ABORTING_OPS = ("store_then_abort", "abort_garbage")


def pdu_defect(case: PduCase, reply: Reply) -> str | None:
    """Why the node's answer to a PDU case breaks the invariants, or None."""
    if reply.ended in ("hung", "refused", "harness_error"):
        return f"pdu_{reply.ended}"
    if reply.pdus and reply.answer.startswith(PDU_ANSWERS_OK):
        return None
    if any(op["op"] in ABORTING_OPS for op in case.then) or request_bytes(case)[:1] == b"\x07":
        return None  # we aborted: the node closes without a word, as PS3.8 says
    if reply.ended == "reset" or reply.seconds >= TIMEOUT_CLOSE:
        return None  # closed while we were still sending, or on its timeout
    return "pdu_no_answer"


# -- the worker side ------------------------------------------------------------------------------


class WorkerSide:
    """The worker in this process on the listener's state directory, checking every job."""

    def __init__(self, config_path: Path, tally: Tally, names: dict[str, str], validate_every: int,
                 scratch: Path) -> None:
        config = load_config(config_path)
        self.tally = tally
        self.names = names  # SOP Instance UID → case name
        self.always_validate: set[str] = set()  # SOP Instance UIDs of the regression cases
        self.validate_every = validate_every
        self.scratch = scratch
        self.db = StateLayout(config.node.state_dir).open_db()
        self.queue = SqliteJobQueue.from_config(self.db, config)
        torch.set_num_threads(1)  # a tiny ensemble; more threads only fight the other jobs
        ensemble = Ensemble.load(config.inference.weights, device="cpu")
        self.worker = Worker(config, ensemble, self.queue, owner="fuzz-worker")
        self.jobs = 0
        self.answered: set[str] = set()  # SOP Instance UIDs named by an SC of their study

    def drain(self, timeout: float = 600.0) -> None:
        """Process jobs until the listener has queued every study and none is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.queue.lease(self.worker.owner)
            if job is not None:
                self.handle(job)
                continue
            if self.queue.next_stable_at() is None and not self._open_jobs():
                return
            time.sleep(0.05)
        self.tally.defect("worker_stuck", [], "jobs still open after the drain's timeout")

    def _open_jobs(self) -> int:
        rows = self.db.query(
            "SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", (JobState.QUEUED, JobState.LEASED)
        )
        return int(rows[0][0])

    @staticmethod
    def uids(job: StudyJob) -> set[str]:
        return {i.sop_instance_uid for i in job.instances}

    def cases_of(self, job: StudyJob) -> list[str]:
        return [self.names.get(i.sop_instance_uid, i.sop_instance_uid) for i in job.instances]

    def handle(self, job: StudyJob) -> None:
        self.jobs += 1
        self.tally.studies += 1
        with timed(self.tally, "worker"):
            try:
                outcome = self.worker.process(job)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # pyo3's PanicException is a BaseException
                self.tally.defect("worker_exception", self.cases_of(job), traceback.format_exc())
                self.queue.fail(job, failure_reason(exc), retryable=False)  # type: ignore[arg-type]
                return
            note = skipped_note(outcome.skipped, outcome.analysed)
            self.queue.complete(job, outcome.results, (), note=note)
        self.check(job, outcome)
        if self.jobs % self.validate_every == 0 or self.always_validate & self.uids(job):
            with timed(self.tally, "dciodvfy"):
                self.validate(job, outcome)

    def check(self, job: StudyJob, outcome: StudyOutcome) -> None:
        """Every instance of the job is answered: named by a Secondary Capture, in the SR."""
        self.tally.analysed += outcome.analysed
        for skip in outcome.skipped:
            reason = re.sub(r"^\S+\.dcm: ", "", skip.reason)  # the file's name (its UID)
            reason = reason.split(":")[0].split("(")[0].strip()
            self.tally.not_analysed[reason] += 1
            if skip.reason.startswith("unexpected"):
                self.tally.defect("decode_exception", [self.names.get(skip.sop_instance_uid, "?")],
                                  skip.reason)
        captured = set()
        reports = 0
        for result in outcome.results:
            header = pydicom.dcmread(result.path, stop_before_pixels=True)
            if result.kind == "sc":
                captured |= {str(r.ReferencedSOPInstanceUID) for r in header.SourceImageSequence}
            elif result.kind == "sr":
                reports += 1
        expected = {i.sop_instance_uid for i in job.instances}
        missing = expected - captured
        self.tally.instances_answered += len(expected & captured)
        self.answered |= expected & captured
        if missing or reports != 1:
            self.tally.defect("no_answer", self.cases_of(job),
                              f"{len(missing)} instances without a capture, {reports} SRs")

    def validate(self, job: StudyJob, outcome: StudyOutcome) -> None:
        sources = source_uids(job)
        for result in outcome.results:
            run = subprocess.run([DCIODVFY, str(result.path)], capture_output=True, text=True,
                                 errors="replace", timeout=120)
            self.tally.objects_validated += 1
            errors = [line for line in (run.stdout + run.stderr).splitlines()
                      if line.startswith("Error")]
            accepted = [e for e in errors if names_source_uid(e, sources)]
            self.tally.source_uid_findings += len(accepted)
            charset = character_set(result.path)
            limits = [e for e in errors if katakana_in_iso_ir_13(e, charset)]
            self.tally.dciodvfy_limit_findings += len(limits)
            accepted += limits
            errors = [e for e in errors if e not in accepted]
            if accepted and all(e == INVALID_VALUES_SUMMARY for e in errors):
                errors = []  # dciodvfy's summary line of the accepted findings alone
            if errors:
                self.tally.defect("dciodvfy", self.cases_of(job),
                                  f"{result.kind}: " + "; ".join(sorted(set(errors))[:5]))

    def close(self) -> None:
        self.db.close()


def character_set(path: Path) -> list[str]:
    """The Specific Character Set terms a written object declares."""
    value = pydicom.dcmread(path, stop_before_pixels=True,
                            specific_tags=["SpecificCharacterSet"]).get("SpecificCharacterSet")
    if value is None:
        return []
    return [str(term) for term in value] if isinstance(value, list | pydicom.multival.MultiValue) \
        else [str(value)]


def source_uids(job: StudyJob) -> set[str]:
    """The identifying UIDs of the job's instances as the listener recorded them."""
    return {
        uid
        for i in job.instances
        for uid in (i.sop_instance_uid, i.sop_class_uid, i.study_instance_uid,
                    i.series_instance_uid)
    }


def names_source_uid(error: str, sources: set[str]) -> bool:
    """Whether a dciodvfy error is only about one of the sources' own UIDs: the listener takes
    UIDs with leading zeros or an unusual root (README, Receiving images: they must not cost an
    image), and every result must reference its sources by the UIDs they have, so dciodvfy's
    complaint about them is expected and counted apart."""
    if "UID" not in error:
        return False
    quoted = re.findall(r'[<"]([0-9.]+)[>"]', error)
    return bool(quoted) and all(uid in sources for uid in quoted)


# -- the run --------------------------------------------------------------------------------------


def write_node_config(folder: Path, weights: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    path.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nport = {free_port()}\nstate_dir = "state"\n'
        "max_associations = 64\nreceive_processes = 2\nacse_timeout_seconds = 1.0\n"
        "network_timeout_seconds = 2.0\nmin_free_bytes = 0\n\n"
        "[study]\nstable_seconds = 0.2\n\n"
        f'[inference]\nweights = "{weights}"\ndevice = "cpu"\n\n'
        "[outputs]\ngsps = true\n\n"
        "[queue]\nlease_seconds = 600\n\n"
    )
    return path


def machine() -> dict[str, str]:
    cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "host": f"{platform.system()} {platform.machine()}, {cpus} CPUs",
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
    }


class FuzzRun:
    """One run: ``cases`` cases from ``seed`` (plus the regression cases) in ``workdir``."""

    def __init__(self, seed: int, cases: int, workdir: Path, *, pdu_share: float = 0.3,
                 batch: int = 100, validate_every: int = 1, regressions: bool = True,
                 only: Sequence[int] = ()) -> None:
        self.seed, self.cases, self.workdir = seed, cases, workdir
        self.pdu_share, self.batch, self.validate_every = pdu_share, batch, validate_every
        self.regressions = regressions
        self.only = tuple(only)  # replay these indices only
        self.tally = Tally(seed)
        self.names: dict[str, str] = {}
        #: SOP Instance UID → (Study Instance UID, case name) of the files answered 0x0000
        self.accepted: dict[str, tuple[str, str]] = {}
        self.defect_files = workdir / "defect-cases"

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        bases = build_bases(self.workdir / "bases")
        weights = positive_weights(self.workdir / "weights")
        config = write_node_config(self.workdir / "node", weights)
        port = load_config(config).node.port
        with (self.workdir / "worker.log").open("w") as worker_log:
            configure_logging("warning", worker_log)
            with node("listen", config, self.workdir / "listener.log") as listener:
                worker = WorkerSide(config, self.tally, self.names, self.validate_every,
                                    self.workdir)
                if self.regressions:  # every study of a stored case is checked by dciodvfy
                    worker.always_validate = {
                        c.uids[2] for c in regression_cases() if isinstance(c, FileCase)
                    }
                try:
                    self.batches(listener, port, bases, worker)
                    self.unanswered(worker)
                finally:
                    worker.close()
                self.listener_events(listener)
        self.tally.seconds["total"] = time.perf_counter() - start
        (self.workdir / "defects.json").write_text(json.dumps(self.tally.defects, indent=1))
        return self.tally.summary(machine())

    def all_cases(self, bases: dict[str, Base]) -> Iterator[FileCase | PduCase]:
        if self.regressions:
            yield from regression_cases()
        for index in self.only or range(self.cases):
            yield draw_case(self.seed, index, bases, self.pdu_share)

    def batches(self, listener: NodeProcess, port: int, bases: dict[str, Base],
                worker: WorkerSide) -> None:
        spool = self.workdir / "send"
        spool.mkdir(exist_ok=True)
        sender = FileSender(port, spool)
        batch: list[FileCase | PduCase] = []
        try:
            for case in self.all_cases(bases):
                batch.append(case)
                if len(batch) == self.batch:
                    self.one_batch(batch, listener, port, bases, sender, worker)
                    batch = []
            if batch:
                self.one_batch(batch, listener, port, bases, sender, worker)
        finally:
            sender.close()

    def one_batch(self, batch: list[FileCase | PduCase], listener: NodeProcess, port: int,
                  bases: dict[str, Base], sender: FileSender, worker: WorkerSide) -> None:
        files = [c for c in batch if isinstance(c, FileCase)]
        pdus = [c for c in batch if isinstance(c, PduCase)]
        with timed(self.tally, "send_files"):
            for case in files:
                self.send_file(case, bases, sender)
        with timed(self.tally, "send_pdus"), ThreadPoolExecutor(PDU_THREADS) as pool:
            for case, reply in zip(pdus, pool.map(lambda c: self.exchange(port, c), pdus),
                                   strict=True):
                self.tally_pdu(case, reply)
        self.check_alive(listener, port, batch)
        worker.drain()

    def unanswered(self, worker: WorkerSide) -> None:
        """Every instance the node accepted (0x0000) was answered in some job of its study: a
        stored instance that never reached a job would escape the per-job check."""
        studies: dict[str, list[str]] = {}
        for uid in sorted(set(self.accepted) - worker.answered):
            study, name = self.accepted[uid]
            studies.setdefault(study, []).append(name)
        for names in studies.values():
            self.tally.defect("no_answer", names, f"{len(names)} instances accepted with 0x0000 "
                              "never named by a Secondary Capture")

    def send_file(self, case: FileCase, bases: dict[str, Base], sender: FileSender) -> None:
        data = build_file(case, bases)
        self.names[case.uids[2]] = case.name
        answer = sender.send(data)
        self.tally.file_cases += 1
        self.tally.answers[answer] += 1
        if answer == "0x0000":
            self.accepted[case.uids[2]] = (case.uids[0], case.name)
        self.tally.operations.update(f"file:{kind}" for kind in case.kinds)
        if answer not in FILE_STATUSES:
            self.keep(case.name, data)
            self.tally.defect("bad_file_status", [case.name], f"{answer}: {case.to_json()}")

    @staticmethod
    def exchange(port: int, case: PduCase) -> Reply:
        try:
            return exchange(port, case, PDU_DEADLINE)
        except OSError as exc:
            return Reply([f"connect failed: {type(exc).__name__}"], "refused")
        except Exception:  # a harness bug: reported as a defect of its own, the run goes on
            traceback.print_exc()
            return Reply(["harness_error"], "harness_error")

    def tally_pdu(self, case: PduCase, reply: Reply) -> None:
        self.tally.pdu_cases += 1
        self.tally.answers[f"pdu:{reply.answer}"] += 1
        self.tally.operations.update(f"pdu:{kind}" for kind in case.kinds)
        problem = pdu_defect(case, reply)
        if problem is not None:
            detail = f"{reply.pdus} {reply.ended} after {reply.seconds:.2f} s: {case.to_json()}"
            self.tally.defect(problem, [case.name], detail)

    def check_alive(self, listener: NodeProcess, port: int, batch: Sequence[object]) -> None:
        self.tally.liveness_checks += 1
        names = [getattr(c, "name", "?") for c in batch]
        if listener.process.poll() is not None:
            self.tally.liveness_failures += 1
            self.tally.defect("listener_died", names[:1] + names[-1:], "the listener exited")
            raise RuntimeError("the listener died; cases of the batch: " + ", ".join(names))
        if not echo_ok(port, timeout=10):
            self.tally.liveness_failures += 1
            self.tally.defect("listener_error", names[:1] + names[-1:], "C-ECHO failed")

    def listener_events(self, listener: NodeProcess) -> None:
        for event in listener.events():
            if event.get("event") in LISTENER_CRASH_EVENTS:
                self.tally.defect("listener_error", [str(event.get("sop_instance_uid", "?"))],
                                  json.dumps(event)[-1500:])
        with listener.log_path.open(errors="replace") as handle:
            stray = [line for line in handle if line.strip() and not line.startswith("{")]
        if stray:
            self.tally.defect("listener_error", [], "".join(stray[:40]))

    def keep(self, name: str, data: bytes) -> None:
        self.defect_files.mkdir(exist_ok=True)
        (self.defect_files / f"{name.replace(':', '-')}.dcm").write_bytes(data)


def print_defects(summary: dict[str, Any], defects: list[dict[str, Any]], limit: int = 20) -> None:
    print(json.dumps(summary, indent=2, sort_keys=True))
    for defect in defects[:limit]:
        print(f"[defect] {defect['kind']} {defect['cases'][:3]}: {defect['detail'][-600:]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--pdu-share", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--validate-every", type=int, default=1,
                        help="check every N-th study's objects with dciodvfy (default: every "
                        "study; it costs about a tenth of the run)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: temporary)")
    parser.add_argument("--case", help="build one case, SEED:INDEX, into --workdir and stop")
    parser.add_argument("--replay", help="run only these case indices of --seed (comma-separated)")
    parser.add_argument("--no-regressions", action="store_true",
                        help="skip the stored regression cases")
    args = parser.parse_args(argv)
    _config.STORE_SEND_CHUNKED_DATASET = True  # send each file's bytes as they are
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        if args.case:
            return write_one_case(args.case, workdir, args.pdu_share)
        only = [int(i) for i in args.replay.split(",")] if args.replay else []
        fuzz = FuzzRun(args.seed, args.cases, workdir, pdu_share=args.pdu_share,
                       batch=args.batch, validate_every=args.validate_every,
                       regressions=not args.no_regressions, only=only)
        summary = fuzz.run()
        print_defects(summary, fuzz.tally.defects)
    return 0 if summary["defects"] == 0 else 1


def write_one_case(spec: str, workdir: Path, pdu_share: float) -> int:
    """Rebuild case ``SEED:INDEX`` (its spec as JSON, and the file or request bytes)."""
    seed, index = (int(part) for part in spec.split(":"))
    bases = build_bases(workdir / "bases")
    case = draw_case(seed, index, bases, pdu_share)
    print(json.dumps(case.to_json(), indent=2))
    if isinstance(case, FileCase):
        target = workdir / f"case-{seed}-{index}.dcm"
        target.write_bytes(build_file(case, bases))
        print(f"written {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
