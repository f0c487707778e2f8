"""The worker in-process: real stored instances, the real SQLite queue, a tiny random ensemble."""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode import worker as worker_module
from dicomnode.config import Config, OutputsConfig, parse_config
from dicomnode.demo import dx_from_image
from dicomnode.pixels import View
from dicomnode.queue.protocol import LeaseLostError
from dicomnode.queue.sqlite import SqliteJobQueue
from dicomnode.records import JobState, StoredInstance, StudyJob
from dicomnode.scp import read_header
from dicomnode.storage import InstanceStore, StateLayout
from dicomnode.uids import ResultKind, SourceIdentity, report_uid
from dicomnode.worker import (
    SkippedView,
    Worker,
    lease_kept,
    load_ensemble,
    resolve_view_region,
    skipped_note,
    unreadable,
)
from dicomnode.writers import ImageFinding, write_results
from inference.ensemble import Ensemble, EnsembleOutput
from inference.imageio import read_grayscale
from inference.preprocess import Preprocessed
from tests.conftest import DICOM_SAMPLES, REPO

HAND = REPO / "samples" / "fracatlas" / "IMG0000019.jpg"
LEG = REPO / "samples" / "fracatlas" / "IMG0000466.jpg"


def make_config(tmp_path: Path, weights: Path, **tables: dict[str, object]) -> Config:
    raw: dict[str, object] = {
        "node": {"state_dir": "state"},
        "study": {"stable_seconds": 0.5},
        "inference": {"weights": str(weights), "device": "cpu"},
        "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        **tables,
    }
    return parse_config(raw, tmp_path)


class Node:
    """State directory, queue, store and worker of one test."""

    def __init__(self, config: Config, ensemble: Ensemble) -> None:
        self.config = config
        self.layout = StateLayout(config.node.state_dir)
        self.db = self.layout.open_db()
        self.queue = SqliteJobQueue.from_config(self.db, config)
        self.store = InstanceStore(self.layout, self.db)
        self.worker = Worker(config, ensemble, self.queue, owner="test-worker")

    def receive(self, *files: Path) -> None:
        """Store files as the listener does (a spooled copy moved into place, not hashed),
        received long enough ago to be stable."""
        for path in files:
            spooled = self.layout.spool_dir / f"{path.name}.{time.monotonic_ns()}"
            shutil.copyfile(path, spooled)
            received = time.time() - 60
            self.store.store(spooled, read_header(path), "MODALITY", now=received, move=True)
        self.queue.enqueue_stable_studies()

    def jobs(self, study_uid: str) -> list[tuple[int, JobState, str | None, int]]:
        rows = self.db.query(
            "SELECT version, state, last_error, attempt FROM jobs WHERE study_uid = ? "
            "ORDER BY job_id",
            (study_uid,),
        )
        return [(r[0], JobState(r[1]), r[2], r[3]) for r in rows]

    def results(self, study_uid: str, version: int) -> list[tuple[str, str, Path]]:
        rows = self.db.query(
            "SELECT r.kind, r.sop_instance_uid, r.path FROM results r JOIN jobs j "
            "ON j.job_id = r.job_id WHERE j.study_uid = ? AND j.version = ? ORDER BY r.kind",
            (study_uid, version),
        )
        return [(r[0], r[1], Path(r[2])) for r in rows]


@pytest.fixture()
def ensemble(random_weights: Path) -> Ensemble:
    return Ensemble.load(random_weights, device="cpu")


@pytest.fixture()
def node(tmp_path: Path, random_weights: Path, ensemble: Ensemble) -> Node:
    return Node(make_config(tmp_path, random_weights), ensemble)


def dx(tmp_path: Path, image: Path, study_uid: str, name: str, body_part: str = "HAND") -> Path:
    ds = dx_from_image(read_grayscale(image), body_part=body_part, study_uid=study_uid)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def into_study(source: Path, study_uid: str, target: Path) -> Path:
    """A copy of a sample file moved into another study (pixel data untouched)."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target, enforce_file_format=True)
    return target


def test_a_broken_instance_is_skipped_and_the_rest_of_the_study_analysed(
    node: Node, tmp_path: Path
) -> None:
    study = generate_uid()
    good = dx(tmp_path, HAND, study, "good")
    broken = into_study(DICOM_SAMPLES / "RG2_JPLY_BROKEN.dcm", study, tmp_path / "broken.dcm")
    node.receive(good, broken)
    job = node.queue.lease("test-worker")
    assert job is not None and len(job.instances) == 2
    outcome = node.worker.process(job)
    (skipped,) = outcome.skipped
    assert skipped.sop_instance_uid == pydicom.dcmread(broken).SOPInstanceUID
    assert "cannot decode pixel data" in skipped.reason
    assert outcome.analysed == 1
    # an SC each: the result of the good image, "not analysed" for the broken one
    assert sorted(r.kind for r in outcome.results) == ["sc", "sc", "sr"]
    sr = hd.sr.srread(next(r.path for r in outcome.results if r.kind == "sr"))
    assessments = whole_image_groups(sr)
    analysed, skipped_group = assessments
    good_uid = pydicom.dcmread(good).SOPInstanceUID
    assert referenced(analysed) == good_uid
    # the broken image is listed in the SR: presence undetermined, and why
    assert referenced(skipped_group) == skipped.sop_instance_uid
    (evaluation,) = skipped_group.get_qualitative_evaluations()
    assert evaluation.value == codes.SCT.Undetermined
    assert skipped_group.tracking_identifier == "image 2 not analysed"
    assert comments(skipped_group) == ["Not analysed: the image data could not be decoded"]
    # recorded with the job, and shown by status as the study's note
    node.queue.complete(job, outcome.results, [], note=skipped_note(outcome.skipped, 1))
    (status,) = [s for s in node.db.recent_studies() if s.study_instance_uid == study]
    assert status.last_error is None and status.note is not None
    assert status.note.startswith(f"1 of 2 views skipped: {skipped.sop_instance_uid}: cannot")


def test_an_unreadable_view_is_identified_by_the_hash_of_its_file(tmp_path: Path) -> None:
    """The listener stores without hashing (sha256 ""): a view that does not decode is then
    identified in the results by the SHA-256 of its stored file, computed by the worker."""
    broken = DICOM_SAMPLES / "RG2_JPLY_BROKEN.dcm"
    header = read_header(broken)
    instance = StoredInstance(
        header.sop_instance_uid, header.sop_class_uid, header.study_instance_uid,
        header.series_instance_uid, header.transfer_syntax_uid, broken,
        broken.stat().st_size, "", "MODALITY",
    )
    (image,) = unreadable([instance], [SkippedView(header.sop_instance_uid, "cannot decode")])
    assert image.source.sha256 == hashlib.sha256(broken.read_bytes()).hexdigest()


def whole_image_groups(sr: hd.sr.Comprehensive3DSR) -> list[object]:
    """The SR's image-level groups (one per image: its region is the whole image)."""
    return [
        g for g in sr.content.get_planar_roi_measurement_groups()
        if g.tracking_identifier.endswith(("(whole image)", "not analysed"))
    ]


def referenced(group: object) -> str:
    """The SOP Instance UID a group's image region lies on."""
    return str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)  # type: ignore[attr-defined]


def comments(group: object) -> list[str]:
    """The Comment texts of an SR measurement group."""
    items = find_content_items(group[0], name=codes.DCM.Comment)  # type: ignore[index]
    return [item.TextValue for item in items]


def test_a_study_without_an_analysable_view_gets_a_not_analysed_answer(
    node: Node, tmp_path: Path
) -> None:
    """No silence: a study whose every view fails still gets an SR and an SC per image saying
    it was not analysed and why, and status shows the reasons."""
    study = generate_uid()
    broken = into_study(DICOM_SAMPLES / "RG2_JPLY_BROKEN.dcm", study, tmp_path / "broken.dcm")
    tiny = into_study(DICOM_SAMPLES / "CR_cspine_16x16_dicomdir6154.dcm", study, tmp_path / "t")
    node.receive(broken, tiny)
    assert node.worker.run_once()
    ((version, state, error, attempt),) = node.jobs(study)
    assert (version, state, error, attempt) == (1, JobState.RESULTS_WRITTEN, None, 1)
    kinds = sorted(kind for kind, _, _ in node.results(study, 1))
    assert kinds == ["sc", "sc", "sr"]
    (sr_path,) = [path for kind, _, path in node.results(study, 1) if kind == "sr"]
    sr = hd.sr.srread(sr_path)
    reasons = [c for g in whole_image_groups(sr) for c in comments(g)]
    assert sorted(reasons) == [
        "Not analysed: the image data could not be decoded",
        "Not analysed: unsuitable for automated analysis (too small or blank)",  # 16x16 px
    ]
    (summary,) = find_content_items(sr, name=codes.DCM.Impression, recursive=True)
    assert summary.TextValue.startswith("Not analysed")
    (status,) = [s for s in node.db.recent_studies() if s.study_instance_uid == study]
    assert status.note is not None and "2 of 2 views skipped" in status.note
    assert "cannot decode pixel data" in status.note and "inference refused" in status.note
    assert not node.worker.run_once()  # nothing else to do; the worker keeps going


def test_outputs_choose_the_result_kinds(
    tmp_path: Path, random_weights: Path, ensemble: Ensemble
) -> None:
    config = make_config(tmp_path, random_weights, outputs={"sr": False, "sc": True, "gsps": True})
    node = Node(config, ensemble)
    study = generate_uid()
    node.receive(dx(tmp_path, HAND, study, "a"), dx(tmp_path, LEG, study, "b", "LEG"))
    assert node.worker.run_once()
    assert node.jobs(study)[0][1] is JobState.RESULTS_WRITTEN
    kinds = [kind for kind, _, _ in node.results(study, 1)]
    assert sorted(kinds) == ["gsps", "gsps", "sc", "sc"]
    with pytest.raises(ValueError, match="outputs: at least one of sr, sc and gsps"):
        make_config(tmp_path, random_weights, outputs={"sr": False, "sc": False})
    nothing = replace(config, outputs=OutputsConfig(sr=False, sc=False, gsps=False))
    with pytest.raises(ValueError, match="at least one of sr, sc and gsps"):
        Worker(nothing, ensemble, node.queue)


def test_without_destinations_a_study_is_done_when_its_results_are_written(
    tmp_path: Path, random_weights: Path, ensemble: Ensemble
) -> None:
    node = Node(make_config(tmp_path, random_weights, destinations=[]), ensemble)
    study = generate_uid()
    node.receive(dx(tmp_path, HAND, study, "a"))
    assert node.worker.run_once()
    assert node.jobs(study)[0][1] is JobState.DELIVERED
    for _, _, path in node.results(study, 1):
        assert path.is_file() and path.parent.parent.name == study


def view(**attributes: str) -> View:
    header = Dataset()
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    pixels = read_grayscale(LEG).astype("float32") / 255
    return View(pixels=pixels, header=header, sha256=hashlib.sha256(pixels.tobytes()).hexdigest())


@pytest.mark.parametrize(
    ("attributes", "region"),
    [
        ({"BodyPartExamined": "HAND", "SeriesDescription": "XR KNEE"}, "hand"),
        ({"SeriesDescription": "XR WRIST PA", "StudyDescription": "XR KNEE"}, "wrist"),
        ({"ProtocolName": "Ankle 2 views", "StudyDescription": "XR KNEE"}, "ankle"),
        ({"BodyPartExamined": "EXTREMITY", "StudyDescription": "Shoulder"}, "shoulder"),
        ({"StudyDescription": "Chest PA"}, None),
    ],
)
def test_region_comes_from_body_part_then_series_protocol_and_study_descriptions(
    attributes: dict[str, str], region: str | None
) -> None:
    match = resolve_view_region(view(**attributes))
    assert (None if match.region is None else match.region.key) == region


def test_a_late_instance_reruns_the_study_naming_the_previous_sr(
    node: Node, tmp_path: Path
) -> None:
    study = generate_uid()
    node.receive(dx(tmp_path, HAND, study, "a"))
    assert node.worker.run_once()
    (old_sr,) = [(uid, path) for kind, uid, path in node.results(study, 1) if kind == "sr"]
    node.receive(dx(tmp_path, LEG, study, "b", "LEG"))
    assert node.worker.run_once()
    assert [(v, s) for v, s, _, _ in node.jobs(study)] == [
        (1, JobState.RESULTS_WRITTEN),
        (2, JobState.RESULTS_WRITTEN),
    ]
    (new_sr,) = [(uid, path) for kind, uid, path in node.results(study, 2) if kind == "sr"]
    assert new_sr[0] != old_sr[0] and new_sr[1].parent != old_sr[1].parent
    ds = pydicom.dcmread(new_sr[1])
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert ref[0].ReferencedSOPInstanceUID == old_sr[0]
    assert old_sr[1].is_file()  # the first version's files are kept as sent


def identity(data: bytes) -> SourceIdentity:
    """The identity of the instance stored as ``data`` (its SOP Instance UID and SHA-256)."""
    uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
    return SourceIdentity(str(uid), hashlib.sha256(data).hexdigest())


def test_a_corrected_resend_gets_new_results_and_a_new_sr_naming_the_previous(
    node: Node, tmp_path: Path
) -> None:
    study = generate_uid()
    first = dx(tmp_path, HAND, study, "a")
    other = dx(tmp_path, LEG, study, "b", "LEG")
    node.receive(first, other)
    assert node.worker.run_once()
    corrected = pydicom.dcmread(first)
    corrected.SeriesDescription = "XR Hand (corrected)"  # same SOP Instance UID, new bytes
    corrected.save_as(first, enforce_file_format=True)
    node.receive(first)
    assert node.worker.run_once()
    v1, v2 = node.results(study, 1), node.results(study, 2)
    (old,) = [uid for kind, uid, _ in v1 if kind == "sr"]
    ((new, path),) = [(u, p) for kind, u, p in v2 if kind == "sr"]
    assert new != old  # the SR UID follows the analysed images' bytes, too
    ds = pydicom.dcmread(path)
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert ref[0].ReferencedSOPInstanceUID == old
    sc = {
        version: {u for k, u, _ in node.results(study, version) if k == "sc"} for version in (1, 2)
    }
    assert len(sc[1]) == len(sc[2]) == 2
    hand = str(pydicom.dcmread(first).SOPInstanceUID)
    hand_before, hand_after = (
        {u for k, u, p in node.results(study, v) if k == "sc" and source_of(p) == hand}
        for v in (1, 2)
    )
    assert len(hand_before) == len(hand_after) == 1 and hand_before != hand_after
    # whatever the first version sent and the second does not send again is withdrawn
    ((_, kos_path),) = [(u, p) for k, u, p in node.results(study, 2) if k == "kos"]
    assert withdrawn_by(kos_path) == {old} | (sc[1] - sc[2])


def source_of(capture: Path) -> str:
    """The source image a Secondary Capture names (Source Image Sequence)."""
    return str(pydicom.dcmread(capture).SourceImageSequence[0].ReferencedSOPInstanceUID)


def withdrawn_by(path: Path) -> set[str]:
    """The SOP Instance UIDs a rejection note withdraws."""
    kos = pydicom.dcmread(path)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
    return {
        ref.ReferencedSOPInstanceUID
        for study_ref in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study_ref.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def test_a_rerun_that_analyses_the_same_images_still_writes_a_new_sr(
    node: Node, tmp_path: Path
) -> None:
    """A late instance that cannot be analysed re-runs the study with the same analysed
    images: the new SR names the previous one and is never the same UID (no self-reference)."""
    study = generate_uid()
    node.receive(dx(tmp_path, HAND, study, "a"))
    assert node.worker.run_once()
    node.receive(into_study(DICOM_SAMPLES / "RG2_JPLY_BROKEN.dcm", study, tmp_path / "b.dcm"))
    assert node.worker.run_once()
    assert [state for _, state, _, _ in node.jobs(study)] == [JobState.RESULTS_WRITTEN] * 2
    (old,) = [uid for kind, uid, _ in node.results(study, 1) if kind == "sr"]
    ((new, path),) = [(u, p) for kind, u, p in node.results(study, 2) if kind == "sr"]
    assert new != old
    ds = pydicom.dcmread(path)
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert ref[0].ReferencedSOPInstanceUID == old
    sc = {
        version: {u for k, u, _ in node.results(study, version) if k == "sc"} for version in (1, 2)
    }
    assert sc[1] < sc[2] and len(sc[2]) == 2  # same SC for the analysed image, + "not analysed"
    # the superseded SR is withdrawn by a rejection note (IHE IOCM) sent with the new results
    ((_, kos_path),) = [(u, p) for k, u, p in node.results(study, 2) if k == "kos"]
    kos = pydicom.dcmread(kos_path)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"  # Rejected for Quality Reasons
    withdrawn = {
        ref.ReferencedSOPInstanceUID
        for study_ref in kos.CurrentRequestedProcedureEvidenceSequence
        for series in study_ref.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert withdrawn == {old}


def test_results_follow_the_bytes_decoded_when_a_replacement_arrives_during_the_job(
    node: Node, tmp_path: Path
) -> None:
    study = generate_uid()
    path = dx(tmp_path, HAND, study, "a")
    node.receive(path)
    job = node.queue.lease("test-worker")
    assert job is not None
    corrected = pydicom.dcmread(path)
    corrected.SeriesDescription = "XR Hand (corrected)"
    corrected.save_as(path, enforce_file_format=True)
    node.store.store(path, read_header(path), "MODALITY")  # replaces the file being processed
    outcome = node.worker.process(job)
    (sc,) = [r for r in outcome.results if r.kind == "sc"]
    decoded = identity(path.read_bytes())
    assert decoded.sha256 != job.instances[0].sha256
    # the SR (whose UID follows the analysed images' identities) names the decoded bytes
    (sr,) = [r for r in outcome.results if r.kind == "sr"]
    assert sr.sop_instance_uid == report_uid(
        study,
        [decoded],
        node.worker.analyser.algorithm.version,
        node.worker.node.uid_prefix,
    )
    assert sc.sop_instance_uid != sr.sop_instance_uid


def leased(tmp_path: Path, random_weights: Path, ensemble: Ensemble) -> tuple[Node, StudyJob]:
    node = Node(make_config(tmp_path, random_weights, queue={"lease_seconds": 0.6}), ensemble)
    node.receive(dx(tmp_path, LEG, generate_uid(), "a", "LEG"))
    job = node.queue.lease("test-worker")
    assert job is not None
    return node, job


def test_the_lease_is_renewed_while_a_job_runs(
    tmp_path: Path, random_weights: Path, ensemble: Ensemble
) -> None:
    node, job = leased(tmp_path, random_weights, ensemble)
    with lease_kept(node.queue, job, interval=0.15) as lost:
        time.sleep(1.5)  # longer than the 0.6 s lease
    assert not lost.is_set()
    node.queue.complete(job, [], [])  # still held
    node2, job2 = leased(tmp_path / "other", random_weights, ensemble)
    time.sleep(1.0)  # the same wait without renewal loses the lease
    with pytest.raises(LeaseLostError):
        node2.queue.complete(job2, [], [])


def test_a_job_taken_over_after_its_lease_expired_is_not_recorded_twice(
    tmp_path: Path, random_weights: Path, ensemble: Ensemble
) -> None:
    node, job = leased(tmp_path, random_weights, ensemble)
    time.sleep(0.8)
    other = node.queue.lease("other-worker")  # the expired job returns to the queue
    assert other is not None and other.job_id == job.job_id and other.attempt == 2
    assert node.worker.handle(job) is None
    rows = node.db.query("SELECT state, lease_owner FROM jobs WHERE job_id = ?", (job.job_id,))
    assert (rows[0][0], rows[0][1]) == (JobState.LEASED, "other-worker")
    assert node.db.query("SELECT COUNT(*) FROM results")[0][0] == 0


def test_writers_warm_up_writes_a_whole_result_set_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run by the worker before it takes jobs: highdicom loads its tables then, not during the
    first study; the synthetic SR, SC and GSPS go to a temporary folder that is removed."""
    import tempfile

    from dicomnode import worker

    written: list[object] = []

    def spy(*args: object, **kwargs: object) -> object:
        objects = write_results(*args, **kwargs)  # type: ignore[arg-type]
        written.extend(hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(o.path))
                       if o.kind is ResultKind.SR else pydicom.dcmread(o.path).Modality
                       for o in objects.all)
        return objects

    monkeypatch.setattr(worker, "write_results", spy)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    algorithm = Ensemble.load(REPO / "ensemble_weights", device="cpu").algorithm
    config = parse_config({"node": {"state_dir": "state"}}, tmp_path)
    assert worker.warm_up_writers(worker.node_identity(config), algorithm) > 0
    assert len(written) == 3  # SR, SC, GSPS
    assert isinstance(written[0], hd.sr.Comprehensive3DSR)
    assert sorted(map(str, written[1:])) == ["OT", "PR"]
    assert list(temporary.iterdir()) == []


def test_out_of_scope_images_get_no_decision_but_an_answer(
    tmp_path: Path, random_weights: Path, ensemble: Ensemble
) -> None:
    """Scope: a chest film and an elbow (outside scope.regions) are not analysed; the wrist in
    the same study is. With out_of_scope = "ignore", a study with nothing in scope gets nothing."""
    config = make_config(tmp_path, random_weights, scope={"regions": ["wrist", "hand"]})
    node = Node(config, ensemble)
    study = generate_uid()
    node.receive(
        dx(tmp_path, HAND, study, "wrist", "WRIST"),
        dx(tmp_path, LEG, study, "chest", "CHEST"),
        dx(tmp_path, LEG, study, "elbow", "ELBOW"),
    )
    job = node.queue.lease("test-worker")
    assert job is not None
    outcome = node.worker.process(job)
    assert outcome.analysed == 1
    assert sorted(s.reason for s in outcome.skipped) == [
        "outside the intended use (chest)",
        "outside the intended use (elbow)",
    ]
    (sr_path,) = [r.path for r in outcome.results if r.kind == "sr"]
    sr = hd.sr.srread(sr_path)
    reasons = sorted(c for g in whole_image_groups(sr) for c in comments(g))
    assert reasons == [
        "Not analysed: outside the intended use (chest)",
        "Not analysed: outside the intended use (elbow)",
    ]
    assert len([r for r in outcome.results if r.kind == "sc"]) == 3  # one per image

    ignoring = Node(
        make_config(tmp_path / "ignore", random_weights,
                    scope={"regions": ["wrist"], "out_of_scope": "ignore"}),
        ensemble,
    )
    chest_only = generate_uid()
    ignoring.receive(dx(tmp_path, LEG, chest_only, "chest2", "CHEST"))
    assert ignoring.worker.run_once()
    ((_, state, error, _),) = ignoring.jobs(chest_only)
    assert (state, error) == (JobState.DELIVERED, None)  # done, nothing to send
    assert ignoring.results(chest_only, 1) == []
    (status,) = [s for s in ignoring.db.recent_studies() if s.study_instance_uid == chest_only]
    assert status.note is not None and "outside the intended use (chest)" in status.note


def test_scope_by_modality_and_unknown_region(
    tmp_path: Path, random_weights: Path, ensemble: Ensemble
) -> None:
    config = make_config(tmp_path, random_weights,
                         scope={"modalities": ["CR"], "unknown_region": "skip"})
    node = Node(config, ensemble)
    study = generate_uid()
    node.receive(dx(tmp_path, HAND, study, "a", "HAND"), dx(tmp_path, HAND, study, "b", ""))
    job = node.queue.lease("test-worker")
    assert job is not None
    outcome = node.worker.process(job)
    assert outcome.analysed == 0
    assert sorted(s.reason for s in outcome.skipped) == [
        "outside the intended use (DX images)",
        "outside the intended use (DX images)",
    ]
    scope = node.worker.scope
    header = Dataset()
    header.Modality = "CR"
    no_region = resolve_view_region(view())
    assert scope.reason(header, no_region, None) == "the body part could not be determined"
    assert scope.reason(header, no_region, "chest") == "outside the intended use (chest)"


def test_calibrated_scope_follows_the_manifest() -> None:
    from dicomnode.config import ScopeConfig
    from dicomnode.scope import Scope
    from inference.records import Thresholds

    calibrated = Thresholds(0.2, 0.4, 0.5)
    pooled_only = Scope.resolve(ScopeConfig(), {"global": calibrated})
    assert "elbow" in pooled_only.regions and "spine" in pooled_only.regions
    shipped_like = Scope.resolve(
        ScopeConfig(), {"global": calibrated, "hand": calibrated, "hip": calibrated}
    )
    assert shipped_like.regions == {"hand", "wrist", "forearm", "hip", "pelvis"}


def test_the_worker_analyses_a_study_in_chunks_of_the_configured_max_batch(
    tmp_path: Path, random_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inference.max_batch`` reaches the ensemble the worker loads, and a study's views go
    through it in chunks of that size; "auto" (the default) leaves the sizing to inference."""
    auto = make_config(tmp_path, random_weights)
    assert load_ensemble(auto).max_batch is None
    inference = {"weights": str(random_weights), "device": "cpu", "max_batch": 2}
    config = make_config(tmp_path, random_weights, inference=inference)
    ensemble = load_ensemble(config)
    assert ensemble.max_batch == 2
    chunks: list[int] = []
    run_members = ensemble.run_members

    def counted(prepared: dict[int, list[Preprocessed]]) -> list[EnsembleOutput]:
        chunks.append(len(prepared[64]))
        return run_members(prepared)

    monkeypatch.setattr(ensemble, "run_members", counted)
    node = Node(config, ensemble)
    study = generate_uid()
    node.receive(*(dx(tmp_path, HAND if i % 2 else LEG, study, f"v{i}") for i in range(5)))
    assert node.worker.run_once()
    assert chunks == [2, 2, 1]
    assert len([kind for kind, _, _ in node.results(study, 1) if kind == "sc"]) == 5


def counting(
    run_members: Callable[[dict[int, list[Preprocessed]]], list[EnsembleOutput]],
    events: list[str],
) -> Callable[[dict[int, list[Preprocessed]]], list[EnsembleOutput]]:
    """``run_members`` that notes each call in ``events``."""

    def counted(prepared: dict[int, list[Preprocessed]]) -> list[EnsembleOutput]:
        events.append("analyse")
        return run_members(prepared)

    return counted


def test_a_study_is_decoded_chunk_by_chunk_keeping_only_8_bit_pixels(
    tmp_path: Path, random_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory bounded by the chunk, not the study: the worker decodes one chunk of views,
    analyses it and keeps only each view's 8-bit display copy (what the writers draw) before it
    decodes the next; the results are those of one batch."""
    events: list[str] = []
    load = worker_module.load_view

    def loading(path: str | Path) -> View:
        events.append("decode")
        return load(path)

    written: dict[int, list[ImageFinding]] = {}
    write = worker_module.write_results

    def writing(findings: list[ImageFinding], *args: object, **kwargs: object) -> object:
        written[len(written)] = list(findings)
        return write(findings, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module, "load_view", loading)
    monkeypatch.setattr(worker_module, "write_results", writing)
    study = generate_uid()
    files = [dx(tmp_path, HAND if i % 2 else LEG, study, f"v{i}") for i in range(5)]
    for max_batch in (2, 5):
        folder = tmp_path / f"max-batch-{max_batch}"
        folder.mkdir()
        inference = {"weights": str(random_weights), "device": "cpu", "max_batch": max_batch}
        config = make_config(folder, random_weights, inference=inference)
        ensemble = load_ensemble(config)
        monkeypatch.setattr(ensemble, "run_members", counting(ensemble.run_members, events))
        node = Node(config, ensemble)
        node.receive(*files)
        assert node.worker.run_once()
    chunked, one_batch = written[0], written[1]
    assert events == [
        *("decode", "decode", "analyse", "decode", "decode", "analyse", "decode", "analyse"),
        *("decode",) * 5,
        "analyse",
    ]
    assert all(f.view.pixels.dtype == np.uint8 for f in chunked + one_batch)
    assert [f.view.pixels.shape for f in chunked] == [f.view.pixels.shape for f in one_batch]
    assert [f.result for f in chunked] == [f.result for f in one_batch]
