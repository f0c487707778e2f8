"""Result writers on real samples: dciodvfy-clean, readable by highdicom, faithful to the result."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.pixels import View, load_view
from dicomnode.uids import (
    ResultKind,
    SourceIdentity,
    derive_uid,
    image_result_uid,
    report_uid,
    tracking_uid,
)
from dicomnode.writers import (
    ImageFinding,
    NodeIdentity,
    NotAnalysedImage,
    PreviousReport,
    ResultObjects,
    StudySummary,
    render_annotated,
    render_png,
    write_results,
)
from dicomnode.writers.common import (
    BOX_CERTAINTY,
    DECISION_CODES,
    FRACTURE,
    MAXIMUM,
    PROBABILITY,
    PROBABILITY_UNIT,
    banner_lines,
    invalid_header_attributes,
    too_long_when_encoded,
)
from dicomnode.writers.sc import banner_height, dashed_segments
from inference.records import AlgorithmInfo, Box, Decision, ImageResult, Thresholds
from inference.regions import region_by_key
from tests.dciodvfy_rules import INVALID_VALUES_SUMMARY, katakana_in_iso_ir_13

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "dicom-samples"
DCIODVFY = Path("/usr/bin/dciodvfy")
THORAX = Code("51185008", "SCT", "Thorax")
HIP = Code("24136001", "SCT", "Hip joint")
ALGORITHM = AlgorithmInfo(name="drn-ensemble", version="2024.1", operating_point="sens-92.5")
NODE = NodeIdentity(station_name="TESTNODE")
THRESHOLDS = Thresholds(sensitivity=0.3, high_specificity=0.6, binarize=0.5)
#: the one dciodvfy warning accepted: result series hold images of both sides, laterality unknown
ACCEPTED_WARNING = "attribute <Laterality>"


pytestmark = pytest.mark.dicom_peers


def _result(decision: Decision, score: float, boxes: tuple[Box, ...]) -> ImageResult:
    return ImageResult(
        score=score,
        decision=decision,
        boxes=boxes,
        region="chest",
        group="upper",
        group_fallback=False,
        thresholds=THRESHOLDS,
    )


ONE_BOX = _result(Decision.FRACTURE, 0.81, (Box(10.0, 20.0, 60.5, 80.0, 0.9),))
TWO_BOXES = _result(
    Decision.POSSIBLE_FRACTURE,
    0.42,
    (Box(10.0, 20.0, 60.0, 80.0, 0.5), Box(100.0, 50.0, 211.0, 169.0, 0.45)),
)
NO_BOX = _result(Decision.NO_FRACTURE, 0.07, ())


@pytest.fixture(scope="module")
def dx() -> View:
    return load_view(SAMPLES / "DX_highdicom_small.dcm")


def _variant(tmp_path: Path, name: str, **attributes: str) -> View:
    """A copy of the small DX sample with some attributes changed (e.g. another image)."""
    ds = pydicom.dcmread(SAMPLES / "DX_highdicom_small.dcm")
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path)
    return load_view(path)


def _dciodvfy_lines(path: Path) -> list[str]:
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True,
                         errors="replace", timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]


def _dciodvfy(path: Path, accepted: tuple[str, ...] = (ACCEPTED_WARNING,)) -> list[str]:
    """dciodvfy's messages; asserts there is no error and no warning beyond ``accepted``."""
    lines = _dciodvfy_lines(path)
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    assert errors == [], f"{path.name}: {errors}"
    assert all(any(a in line for a in accepted) for line in warnings), warnings
    return lines


def _summary(view: View, result: ImageResult) -> StudySummary:
    return StudySummary.of([ImageFinding(view, result)], [])


def _write(tmp_path: Path, findings: list[ImageFinding], **kwargs: object) -> ResultObjects:
    return write_results(
        findings, ALGORITHM, NODE, tmp_path / "out", presentation_states=True, **kwargs
    )  # type: ignore[arg-type]


@pytest.mark.parametrize("result", [ONE_BOX, TWO_BOXES, NO_BOX], ids=["one", "two", "none"])
def test_every_written_object_passes_dciodvfy(
    dx: View, result: ImageResult, tmp_path: Path
) -> None:
    written = _write(tmp_path, [ImageFinding(dx, result, THORAX)])
    assert len(written.all) == 3
    for item in written.all:
        _dciodvfy(item.path)
        ds = pydicom.dcmread(item.path)
        assert ds.SOPInstanceUID == item.sop_instance_uid and ds.SOPClassUID == item.sop_class_uid
        assert ds.StudyInstanceUID == dx.study_instance_uid
        assert ds.SeriesInstanceUID != dx.header.SeriesInstanceUID
        assert ds.PatientName == dx.header.PatientName and ds.PatientID == dx.header.PatientID
        equipment = ds.ContributingEquipmentSequence
        ours = [e for e in equipment if e.Manufacturer == NODE.manufacturer]
        assert len(ours) == 1
        purpose = ours[0].PurposeOfReferenceCodeSequence[0]
        assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")


@pytest.mark.parametrize("result", [ONE_BOX, TWO_BOXES, NO_BOX], ids=["one", "two", "none"])
def test_sr_reads_back_with_finding_evaluation_score_site_and_regions(
    dx: View, result: ImageResult, tmp_path: Path
) -> None:
    written = _write(tmp_path, [ImageFinding(dx, result, THORAX)])
    sr = hd.sr.srread(written.report.path)
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert (sr.PreliminaryFlag, sr.CompletionFlag, sr.VerificationFlag) == (
        "PRELIMINARY",
        "PARTIAL",
        "UNVERIFIED",
    )
    assert sr.content.get_image_measurement_groups() == []  # OHIF cannot open those
    group, *regions = sr.content.get_planar_roi_measurement_groups()
    # the image-level assessment: its region is the whole image
    assert group.tracking_identifier == "image 1 fracture assessment (whole image)"
    np.testing.assert_allclose(
        group.roi.value,
        [[0, 0], [dx.columns, 0], [dx.columns, dx.rows], [0, dx.rows], [0, 0]],
    )
    assert group.get_measurements(name=BOX_CERTAINTY) == []
    assert group.finding_type == FRACTURE
    assert [site.value for site in group.finding_sites] == [THORAX]
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.value == DECISION_CODES[result.decision]
    (score,) = group.get_measurements(name=PROBABILITY)
    assert score.value == pytest.approx(result.score)
    assert (score.unit.value, score.unit.scheme_designator) == ("1", "UCUM")
    image_ref = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert image_ref.ReferencedSOPInstanceUID == dx.sop_instance_uid
    assert len(regions) == len(result.boxes)
    for region, box in zip(regions, result.boxes, strict=True):
        corners = np.array(
            [
                [box.x0, box.y0],
                [box.x1, box.y0],
                [box.x1, box.y1],
                [box.x0, box.y1],
                [box.x0, box.y0],
            ]
        )
        assert region.roi.GraphicType == "POLYLINE"
        np.testing.assert_allclose(region.roi.value, corners, atol=1e-4)
        assert np.all(region.roi.value >= 0)
        assert np.all(region.roi.value[:, 0] <= dx.columns)
        assert np.all(region.roi.value[:, 1] <= dx.rows)
        source = region.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == dx.sop_instance_uid
        assert source.ReferencedSOPClassUID == dx.sop_class_uid
        assert region.get_measurements(name=PROBABILITY) == []
        (box_score,) = region.get_measurements(name=BOX_CERTAINTY)  # the map's peak
        assert box_score.value == pytest.approx(box.score)
        assert box_score.unit == PROBABILITY_UNIT and box_score.derivation == MAXIMUM

    def texts(concept: Code) -> set[str]:
        items = find_content_items(sr, name=concept, recursive=True)
        return {item.TextValue for item in items}

    assert texts(codes.DCM.AlgorithmName) == {ALGORITHM.name}
    assert texts(codes.DCM.AlgorithmVersion) == {ALGORITHM.version}
    assert f"operating point: {ALGORITHM.operating_point}" in texts(codes.DCM.AlgorithmParameters)


def test_sc_has_burned_in_boxes_and_banner(dx: View, tmp_path: Path) -> None:
    written = _write(tmp_path, [ImageFinding(dx, ONE_BOX, THORAX)])
    (sc_file,) = written.secondary_captures
    ds = pydicom.dcmread(sc_file.path)
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.BurnedInAnnotation == "YES" and ds.ImageType[0] == "DERIVED"
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8
    banner = banner_height(dx.rows, dx.columns)
    pixels = ds.pixel_array
    assert pixels.shape == (dx.rows + banner, dx.columns)
    np.testing.assert_array_equal(pixels, render_annotated(dx, ONE_BOX, _summary(dx, ONE_BOX)))
    assert pixels[:banner].max() == 255  # banner text
    box = ONE_BOX.boxes[0]
    top = pixels[banner + int(box.y0), int(box.x0) : int(np.ceil(box.x1))]
    assert np.all(top == 255)  # solid outline along the top edge
    inside = pixels[banner + 40 : banner + 60, 20:50]
    expected = render_annotated(dx, NO_BOX, _summary(dx, NO_BOX))[banner + 40 : banner + 60, 20:50]
    np.testing.assert_array_equal(inside, expected)  # the image inside the box is untouched


def test_possible_fracture_boxes_are_dashed(dx: View) -> None:
    banner = banner_height(dx.rows, dx.columns)
    dashed = render_annotated(dx, TWO_BOXES, _summary(dx, TWO_BOXES))
    box = TWO_BOXES.boxes[0]
    edge = dashed[banner + int(box.y0), int(box.x0) : int(box.x1)]
    assert (edge == 255).any() and (edge != 255).any()


def test_render_png_writes_the_sc_pixels(dx: View, tmp_path: Path) -> None:
    path = render_png(dx, TWO_BOXES, tmp_path / "overlay.png")
    np.testing.assert_array_equal(
        cv2.imread(str(path), cv2.IMREAD_GRAYSCALE),
        render_annotated(dx, TWO_BOXES, _summary(dx, TWO_BOXES)),
    )
    with pytest.raises(ValueError, match="png"):
        render_png(dx, TWO_BOXES, tmp_path / "overlay.jpg")


def test_gsps_has_polyline_boxes_in_pixel_units(dx: View, tmp_path: Path) -> None:
    written = _write(tmp_path, [ImageFinding(dx, TWO_BOXES, THORAX)])
    (pr_file,) = written.presentation_states
    ds = pydicom.dcmread(pr_file.path)
    assert ds.SOPClassUID == pydicom.uid.GrayscaleSoftcopyPresentationStateStorage
    annotation = ds.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == dx.sop_instance_uid
    objects = annotation.GraphicObjectSequence
    assert len(objects) == len(TWO_BOXES.boxes)
    for item, box in zip(objects, TWO_BOXES.boxes, strict=True):
        assert item.GraphicType == "POLYLINE" and item.GraphicAnnotationUnits == "PIXEL"
        points = np.asarray(item.GraphicData).reshape(-1, 2)
        np.testing.assert_allclose(points[[0, 2]], [[box.x0, box.y0], [box.x1, box.y1]])
        np.testing.assert_allclose(points[0], points[-1])
    texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    assert texts[:3] == list(banner_lines(TWO_BOXES, _summary(dx, TWO_BOXES)))
    assert "STUDY: FRACTURE SUSPECTED" in texts[0] and "POSSIBLE FRACTURE" in texts[1]
    assert "physician" in texts[2]
    # the source is MONOCHROME1: the presentation keeps bone bright
    assert dx.header.PhotometricInterpretation == "MONOCHROME1"
    assert ds.PresentationLUTShape == "INVERSE"


def test_cr_without_orientation_or_spacing_is_written_cleanly(tmp_path: Path) -> None:
    cr = load_view(SAMPLES / "RG2_JPLL_derived_EVRLE.dcm")
    result = _result(Decision.FRACTURE, 0.9, (Box(400, 600, 900, 1100, 0.95),))
    written = _write(tmp_path, [ImageFinding(cr, result, HIP)])
    for item in written.all:
        _dciodvfy(item.path)
    sc = pydicom.dcmread(written.secondary_captures[0].path, stop_before_pixels=True)
    assert sc.PatientOrientation == ""  # unknown at the source: left empty, not invented


def test_uids_are_deterministic_and_change_with_inputs(dx: View, tmp_path: Path) -> None:
    first = _write(tmp_path / "a", [ImageFinding(dx, ONE_BOX, THORAX)])
    again = _write(tmp_path / "b", [ImageFinding(dx, ONE_BOX, THORAX)])
    assert [w.sop_instance_uid for w in first.all] == [w.sop_instance_uid for w in again.all]
    assert [w.series_instance_uid for w in first.all] == [w.series_instance_uid for w in again.all]
    assert first.report.sop_instance_uid == report_uid(
        dx.study_instance_uid, [dx.source], ALGORITHM.version, NODE.uid_prefix
    )
    assert first.secondary_captures[0].sop_instance_uid == image_result_uid(
        ResultKind.SECONDARY_CAPTURE,
        dx.source,
        ALGORITHM.version,
        NODE.uid_prefix,
        study_summary=_summary(dx, ONE_BOX).headline(),
    )
    newer = write_results(
        [ImageFinding(dx, ONE_BOX, THORAX)],
        AlgorithmInfo(ALGORITHM.name, "2025.1", ALGORITHM.operating_point),
        NODE,
        tmp_path / "c",
    )
    assert {w.sop_instance_uid for w in newer.all}.isdisjoint(w.sop_instance_uid for w in first.all)
    # a new generation of the study (one more image): new SR; the old image's SC shows the
    # study's new summary line ("... in 1 of 2 images"), so it is new content with a new UID
    other = _variant(tmp_path, "second", SOPInstanceUID=str(derive_uid("test", "second")))
    grown = _write(
        tmp_path / "d", [ImageFinding(dx, ONE_BOX, THORAX), ImageFinding(other, NO_BOX, THORAX)]
    )
    assert grown.report.sop_instance_uid != first.report.sop_instance_uid
    assert grown.report.series_instance_uid == first.report.series_instance_uid
    assert grown.secondary_captures[0].sop_instance_uid != (
        first.secondary_captures[0].sop_instance_uid
    )
    # one more image that is not analysed leaves the summary line, and the old SC, as they were
    skipped = NotAnalysedImage(other.header, other.source, "outside the intended use (chest)")
    late = _write(tmp_path / "e", [ImageFinding(dx, ONE_BOX, THORAX)], not_analysed=[skipped])
    assert late.secondary_captures[0].sop_instance_uid == (
        first.secondary_captures[0].sop_instance_uid
    )
    assert len({w.sop_instance_uid for w in grown.all}) == len(grown.all)


def _tracking_uids(path: Path) -> set[str]:
    """Every Tracking Unique Identifier in an SR."""
    groups = hd.sr.srread(path).content.get_planar_roi_measurement_groups()

    return {group.tracking_uid for group in groups}


def test_a_corrected_image_under_the_same_uid_gets_new_result_uids(
    dx: View, tmp_path: Path
) -> None:
    """One UID never names two contents: new bytes under the same SOP Instance UID (a corrected
    re-send) give new SR, SC, GSPS and tracking UIDs; the same bytes give the same ones."""
    corrected = _variant(tmp_path, "corrected", SeriesDescription="corrected by the modality")
    assert corrected.sop_instance_uid == dx.sop_instance_uid and corrected.sha256 != dx.sha256
    same = load_view(SAMPLES / "DX_highdicom_small.dcm")
    first = _write(tmp_path / "a", [ImageFinding(dx, ONE_BOX, THORAX)])
    again = _write(tmp_path / "b", [ImageFinding(same, ONE_BOX, THORAX)])
    fixed = _write(tmp_path / "c", [ImageFinding(corrected, ONE_BOX, THORAX)])
    assert [w.sop_instance_uid for w in again.all] == [w.sop_instance_uid for w in first.all]
    assert {w.sop_instance_uid for w in fixed.all}.isdisjoint(w.sop_instance_uid for w in first.all)
    assert [w.series_instance_uid for w in fixed.all] == [w.series_instance_uid for w in first.all]
    assert fixed.presentation_states[0].sop_instance_uid == image_result_uid(
        ResultKind.PRESENTATION_STATE,
        corrected.source,
        ALGORITHM.version,
        NODE.uid_prefix,
        study_summary=_summary(corrected, ONE_BOX).headline(),
    )
    assert first.report is not None and fixed.report is not None
    old, new = _tracking_uids(first.report.path), _tracking_uids(fixed.report.path)
    assert len(new) == 2 and old.isdisjoint(new)
    assert tracking_uid(corrected.source, ALGORITHM.version, 1, NODE.uid_prefix) in new
    gsps = pydicom.dcmread(fixed.presentation_states[0].path)
    (box,) = gsps.GraphicAnnotationSequence[0].GraphicObjectSequence
    assert box.TrackingUID in new  # the GSPS box is the SR's region 1 of the same image


def test_a_view_carries_the_sha256_of_the_file_it_was_decoded_from(dx: View) -> None:
    data = (SAMPLES / "DX_highdicom_small.dcm").read_bytes()
    assert dx.sha256 == hashlib.sha256(data).hexdigest()
    assert dx.source == SourceIdentity(dx.sop_instance_uid, dx.sha256)


def test_a_replacing_report_gets_its_own_uid_naming_the_previous(dx: View, tmp_path: Path) -> None:
    """Even when the analysed images did not change (e.g. the late instance that re-ran the
    study could not be decoded), the new SR differs from the one it replaces, so it never
    names itself as predecessor; the per-image results keep their UIDs."""
    first = _write(tmp_path / "a", [ImageFinding(dx, ONE_BOX, THORAX)])
    assert first.report is not None
    previous = PreviousReport(
        dx.study_instance_uid,
        first.report.series_instance_uid,
        first.report.sop_instance_uid,
        first.report.sop_class_uid,
    )
    second = _write(tmp_path / "b", [ImageFinding(dx, ONE_BOX, THORAX)], previous=previous)
    assert second.report is not None
    assert second.report.sop_instance_uid != first.report.sop_instance_uid
    assert second.report.sop_instance_uid == report_uid(
        dx.study_instance_uid,
        [dx.source],
        ALGORITHM.version,
        NODE.uid_prefix,
        predecessor=first.report.sop_instance_uid,
    )
    ds = pydicom.dcmread(second.report.path)
    series = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous.sop_instance_uid
    assert [w.sop_instance_uid for w in second.all[1:]] == [
        w.sop_instance_uid for w in first.all[1:]
    ]


HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
SOURCES = st.lists(
    st.builds(SourceIdentity, st.from_regex(r"1\.2\.[1-9][0-9]{0,8}", fullmatch=True), HEX),
    min_size=1,
    max_size=5,
    unique_by=lambda s: s.sop_instance_uid,
)


@settings(max_examples=50, deadline=None)
@given(sources=SOURCES, data=st.data())
def test_report_uid_follows_the_set_of_sources_and_their_bytes(
    sources: list[SourceIdentity], data: st.DataObject
) -> None:
    uid = report_uid("1.2.3", sources, "v1")
    assert report_uid("1.2.3", data.draw(st.permutations(sources)), "v1") == uid
    index = data.draw(st.integers(0, len(sources) - 1))
    old = sources[index]
    changed = SourceIdentity(old.sop_instance_uid, data.draw(HEX.filter(lambda h: h != old.sha256)))
    assert report_uid("1.2.3", [*sources[:index], changed, *sources[index + 1 :]], "v1") != uid
    assert report_uid("1.2.3", sources, "v2") != uid
    assert report_uid("1.2.3", sources, "v1", predecessor=str(uid)) != uid
    with pytest.raises(ValueError, match="two different contents"):
        report_uid("1.2.3", [*sources, changed], "v1")


@pytest.mark.parametrize("sha256", ["", "ABC", "g" * 64, "A" * 64, "0" * 63])
def test_a_source_identity_needs_a_sha256_digest(sha256: str) -> None:
    with pytest.raises(ValueError, match="64 lower-case hex digits"):
        SourceIdentity("1.2.3", sha256)


def test_rewriting_replaces_the_file(dx: View, tmp_path: Path) -> None:
    _write(tmp_path, [ImageFinding(dx, ONE_BOX, THORAX)])
    _write(tmp_path, [ImageFinding(dx, ONE_BOX, THORAX)])
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_predecessor_report_is_referenced(dx: View, tmp_path: Path) -> None:
    previous = PreviousReport(
        dx.study_instance_uid,
        str(derive_uid("prev-series")),
        str(derive_uid("prev-sr")),
        pydicom.uid.Comprehensive3DSRStorage,
    )
    written = _write(tmp_path, [ImageFinding(dx, ONE_BOX, THORAX)], previous=previous)
    _dciodvfy(written.report.path)
    ds = pydicom.dcmread(written.report.path)
    study = ds.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == previous.study_instance_uid
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == previous.series_instance_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous.sop_instance_uid


@pytest.mark.parametrize(
    ("charset", "name"),
    [("ISO_IR 100", "Müller^Jörg"), ("ISO_IR 192", "山田^太郎"), ("ISO_IR 192", "Ærøskøbing^Zoë")],
)
def test_non_ascii_patient_names_round_trip(charset: str, name: str, tmp_path: Path) -> None:
    view = _variant(tmp_path, "named", SpecificCharacterSet=charset, PatientName=name)
    written = _write(tmp_path, [ImageFinding(view, ONE_BOX, THORAX)])
    for item in written.all:
        _dciodvfy(item.path)
        ds = pydicom.dcmread(item.path)
        assert ds.SpecificCharacterSet == charset
        assert str(ds.PatientName) == name
    assert str(hd.sr.srread(written.report.path).PatientName) == name


KATAKANA_ID = "ﾈｯﾀﾚ"  # half-width katakana: bytes C8 AF C0 DA in JIS X 0201


def _repertoire_errors(path: Path) -> list[str]:
    return [line for line in _dciodvfy_lines(path) if "character repertoire" in line]


def test_dciodvfy_refuses_katakana_in_iso_ir_13_only_and_the_rule_names_exactly_that(
    tmp_path: Path,
) -> None:
    """The rule the fuzz harness uses for fuzz case 20261207:1647, checked on clean files: the
    same characters are refused in ISO_IR 13 (where PS3.3 Table C.12-2 puts them in G1) and
    accepted with code extensions, so the refusal is dciodvfy's limit, not the object's."""
    _variant(tmp_path, "plain", SpecificCharacterSet="ISO_IR 13", PatientID=KATAKANA_ID)
    assert pydicom.dcmread(tmp_path / "plain.dcm").PatientID == KATAKANA_ID
    refused = _repertoire_errors(tmp_path / "plain.dcm")
    assert refused and all(katakana_in_iso_ir_13(e, ["ISO_IR 13"]) for e in refused)
    _variant(tmp_path, "extended", SpecificCharacterSet=["", "ISO 2022 IR 13"],
             PatientID=KATAKANA_ID)
    assert _repertoire_errors(tmp_path / "extended.dcm") == []
    # the rule takes nothing else: another character set, or a byte outside the katakana range
    assert not any(katakana_in_iso_ir_13(e, ["ISO_IR 100"]) for e in refused)
    assert not katakana_in_iso_ir_13(refused[0].replace("(0xc8)", "(0x80)"), ["ISO_IR 13"])


def test_results_keep_the_patient_id_bytes_of_an_iso_ir_13_source(tmp_path: Path) -> None:
    """Fuzz case 20261207:1647: results of a source in ISO_IR 13 with a katakana Patient ID
    declare ISO_IR 13 and keep the ID's bytes (the PACS matches the patient on them); dciodvfy
    finds nothing else in them."""
    view = _variant(tmp_path, "kana", SpecificCharacterSet="ISO_IR 13", PatientID=KATAKANA_ID)
    written = _write(tmp_path, [ImageFinding(view, ONE_BOX, THORAX)])
    source_bytes = _raw_patient_id(tmp_path / "kana.dcm")
    assert source_bytes == bytes.fromhex("c8afc0da")
    for item in written.all:
        assert _raw_patient_id(item.path) == source_bytes
        ds = pydicom.dcmread(item.path)
        assert ds.SpecificCharacterSet == "ISO_IR 13"
        assert ds.PatientID == KATAKANA_ID
        errors = [line for line in _dciodvfy_lines(item.path) if line.startswith("Error")]
        limits = [e for e in errors if katakana_in_iso_ir_13(e, ["ISO_IR 13"])]
        assert limits, "the katakana bytes are no longer refused: drop the rule"
        assert set(errors) - set(limits) <= {INVALID_VALUES_SUMMARY}, errors


def _raw_patient_id(path: Path) -> bytes:
    raw = pydicom.dcmread(path, stop_before_pixels=True).get_item(0x00100020)
    assert raw is not None and isinstance(raw.value, bytes)
    return raw.value.rstrip(b" ")


def test_bad_input_is_refused(dx: View, tmp_path: Path) -> None:
    outside = _result(Decision.FRACTURE, 0.9, (Box(100.0, 100.0, 300.0, 150.0, 0.9),))
    with pytest.raises(ValueError, match="outside"):
        _write(tmp_path, [ImageFinding(dx, outside, THORAX)])
    with pytest.raises(ValueError, match="no source image"):
        _write(tmp_path, [])
    other_study = _variant(
        tmp_path,
        "other",
        StudyInstanceUID=str(derive_uid("other-study")),
        SOPInstanceUID=str(derive_uid("other-image")),
    )
    with pytest.raises(ValueError, match="exactly one study"):
        _write(tmp_path, [ImageFinding(dx, ONE_BOX, THORAX), ImageFinding(other_study, NO_BOX)])


@settings(max_examples=60, deadline=None)
@given(
    length=st.floats(0.5, 500),
    dash=st.floats(0.5, 30),
    gap=st.floats(0.5, 30),
    angle=st.floats(0, 2 * np.pi),
)
def test_dashes_lie_on_the_segment_and_cover_the_dash_share(
    length: float, dash: float, gap: float, angle: float
) -> None:
    start = (5.0, 7.0)
    end = (5.0 + length * np.cos(angle), 7.0 + length * np.sin(angle))
    pieces = dashed_segments(start, end, dash, gap)
    covered = sum(float(np.hypot(b[0] - a[0], b[1] - a[1])) for a, b in pieces)
    assert covered <= length + 1e-6
    assert covered >= min(length, dash) - 1e-6
    for (a, b), (c, _) in itertools.pairwise(pieces):
        assert float(np.hypot(b[0] - a[0], b[1] - a[1])) == pytest.approx(dash)
        assert float(np.hypot(c[0] - a[0], c[1] - a[1])) == pytest.approx(dash + gap)
    for a, b in pieces:
        for point in (a, b):  # every end point is on the segment
            t = np.dot(np.subtract(point, start), np.subtract(end, start)) / length**2
            assert -1e-6 <= t <= 1 + 1e-6


def test_invalid_source_header_values_are_left_empty_not_copied(tmp_path: Path) -> None:
    # a real (anonymised) DX whose Patient's Birth Date is a hash and whose Accession Number is
    # 56 characters long: highdicom refuses such values and dciodvfy calls them errors
    view = load_view(SAMPLES / "DX_chest_966_J2KR_fixed.dcm")
    assert set(invalid_header_attributes(view.header)) == {"PatientBirthDate", "AccessionNumber"}
    original = (view.header.PatientBirthDate, view.header.AccessionNumber)
    written = _write(tmp_path, [ImageFinding(view, ONE_BOX, THORAX)])
    # source-side warnings: empty Study Date/Time, a hash as Patient's Name
    inherited = (ACCEPTED_WARNING, "Study Date", "Study Time", "Patient's Name")
    for item in written.all:
        _dciodvfy(item.path, inherited)
        ds = pydicom.dcmread(item.path)
        assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
        assert ds.PatientID == view.header.PatientID
        assert ds.StudyInstanceUID == view.study_instance_uid
    assert (view.header.PatientBirthDate, view.header.AccessionNumber) == original
    assert invalid_header_attributes(pydicom.dcmread(SAMPLES / "DX_highdicom_small.dcm")) == ()


@pytest.mark.parametrize(("date", "kept"), [("40261204", False), ("09991231", False),
                                            ("20261204", True), ("18500101", True)])
def test_a_study_date_with_a_year_dciodvfy_refuses_is_left_empty(
    date: str, kept: bool, tmp_path: Path
) -> None:
    """pydicom reads any year, dciodvfy only 1000-2999 (fuzz case 20261208:842: a Study Date of
    40261204, one flipped digit): such a date is damaged and left empty in every result."""
    ds = pydicom.dcmread(SAMPLES / "DX_highdicom_small.dcm")
    ds.StudyDate = date
    ds.save_as(tmp_path / "dated.dcm")
    view = load_view(tmp_path / "dated.dcm")
    assert ("StudyDate" in invalid_header_attributes(view.header)) is not kept
    written = _write(tmp_path, [ImageFinding(view, ONE_BOX, THORAX)])
    empty = (ACCEPTED_WARNING,) + (() if kept else ("Study Date",))  # DICOMDIR would want one
    for item in written.all:
        _dciodvfy(item.path, empty)
        assert pydicom.dcmread(item.path).StudyDate == (date if kept else "")


@pytest.mark.parametrize("spacing", ["\\", "\\0.143", "0.143\\0", "NaN\\0.143"])
def test_imager_pixel_spacing_without_two_usable_values_is_left_out_of_the_sr(
    spacing: str, tmp_path: Path
) -> None:
    """Empty values in a multi-valued DS pass the header checks; float('') once failed the
    whole SR (fuzz case 20261205:348). Without two positive numbers the spacing is not given."""
    view = _variant(tmp_path, "spacing", ImagerPixelSpacing=spacing)
    written = _write(tmp_path, [ImageFinding(view, ONE_BOX, THORAX)])
    assert written.report is not None
    sr = pydicom.dcmread(written.report.path)
    names = {item.ConceptNameCodeSequence[0].CodeMeaning for item in _all_items(sr)}
    assert "Horizontal Pixel Spacing" not in names and "Vertical Pixel Spacing" not in names
    assert "Pixel Data Rows" in names  # the rest of the image library entry is there
    for item in written.all:
        _dciodvfy(item.path)
    usable = _variant(tmp_path, "usable", ImagerPixelSpacing="0.15\\0.143")
    sr = pydicom.dcmread(_write(tmp_path, [ImageFinding(usable, ONE_BOX, THORAX)]).all[0].path)
    given = {
        name: float(item.MeasuredValueSequence[0].NumericValue)
        for item in _all_items(sr)
        if "Pixel Spacing" in (name := item.ConceptNameCodeSequence[0].CodeMeaning)
    }
    assert given == {"Horizontal Pixel Spacing": 0.143, "Vertical Pixel Spacing": 0.15}


def test_a_reason_quoting_header_bytes_is_written_as_printable_ascii(
    dx: View, tmp_path: Path
) -> None:
    """A "not analysed" reason may quote a header value: a Modality of random bytes put a TAB,
    a NUL and C1 characters into the SR's UT text values, which dciodvfy rejected (fuzz case
    20261204:878). Such characters become "?" in the SR, the summary and the banner."""
    other = _variant(tmp_path, "odd", SOPInstanceUID=str(derive_uid("test", "odd")))
    reason = "outside the intended use (\xb7\xabPY\x8eM\x00S\tN images)"
    skipped = NotAnalysedImage(other.header, other.source, reason)
    assert skipped.reason == "outside the intended use (??PY?M?S?N images)"
    written = _write(tmp_path, [ImageFinding(dx, ONE_BOX, THORAX)], not_analysed=[skipped])
    texts = [
        str(item.TextValue) for item in _all_items(pydicom.dcmread(written.all[0].path))
        if "TextValue" in item
    ]
    assert any("Not analysed: outside the intended use (??PY?M?S?N images)" in t for t in texts)
    assert all(t.isascii() and t.isprintable() for t in texts)
    for item in written.all:
        _dciodvfy(item.path)


def test_a_value_too_long_once_encoded_is_left_out_of_the_results(tmp_path: Path) -> None:
    """15 characters fit SH's 16 for pydicom, but half-width katakana through ISO 2022 IR 13
    take 23 bytes with their escape sequences, which dciodvfy rejects (fuzz case
    20261204:2922): the Accession Number is left empty in every result object."""
    ds = pydicom.dcmread(SAMPLES / "DX_highdicom_small.dcm")
    ds.SpecificCharacterSet = ["ISO 2022 IR 13", "ISO 2022 IR 87"]
    ds.AccessionNumber = "Gon\uff83\uff67alves^Zo\uff83\uff6b"
    ds.save_as(tmp_path / "long.dcm")
    view = load_view(tmp_path / "long.dcm")
    terms = list(view.header.SpecificCharacterSet)
    assert too_long_when_encoded(view.header, terms) == ("AccessionNumber",)
    assert too_long_when_encoded(view.header, ["ISO_IR 192"]) == ("AccessionNumber",)
    written = _write(tmp_path, [ImageFinding(view, ONE_BOX, THORAX)])
    for item in written.all:
        _dciodvfy(item.path)
        assert pydicom.dcmread(item.path).AccessionNumber == ""


def test_equipment_the_reports_character_set_cannot_encode_is_left_out(tmp_path: Path) -> None:
    """A study of three sources: the first in the default repertoire, the second Latin-1 and
    the third UTF-8 text in their equipment (fuzz cases 20261206:228 and :484). The SR declares
    the first source's character set, so it lists the first source's equipment only, and
    dciodvfy accepts it."""
    views = []
    sources = [
        (None, "Plain Modality Co"),
        ("ISO_IR 100", "Gon\u00e7alves^Zo\u00eb"),
        ("ISO_IR 192", "\u022f"),
    ]
    for index, (charset, manufacturer) in enumerate(sources):
        ds = pydicom.dcmread(SAMPLES / "DX_highdicom_small.dcm")
        if charset is None:
            ds.pop("SpecificCharacterSet", None)
        else:
            ds.SpecificCharacterSet = charset
        ds.Manufacturer = manufacturer
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / f"{index}.dcm")
        views.append(load_view(tmp_path / f"{index}.dcm"))
    written = _write(tmp_path, [ImageFinding(view, ONE_BOX, THORAX) for view in views])
    assert written.report is not None
    sr = pydicom.dcmread(written.report.path)
    assert "SpecificCharacterSet" not in sr
    listed = [item.Manufacturer for item in sr.ContributingEquipmentSequence]
    assert "Plain Modality Co" in listed
    assert not any(not str(name).isascii() for name in listed)
    for item in written.all:  # each capture declares its own source's character set
        _dciodvfy(item.path)


def _all_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(_all_items(item))
    return items


def test_region_codes_from_inference_are_written_as_finding_site(tmp_path: Path) -> None:
    cr = load_view(SAMPLES / "RG2_JPLL_derived_EVRLE.dcm")
    region = region_by_key("hip")
    written = _write(tmp_path, [ImageFinding(cr, NO_BOX, region.finding_site)])
    _dciodvfy(written.report.path)
    group, *_ = hd.sr.srread(written.report.path).content.get_planar_roi_measurement_groups()
    (site,) = group.finding_sites
    assert (site.value.value, site.value.scheme_designator, site.value.meaning) == (
        region.finding_site.value,
        region.finding_site.scheme_designator,
        region.finding_site.meaning,
    )
