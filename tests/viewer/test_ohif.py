"""The node's results in a real radiologist's web viewer: OHIF v3 over Orthanc's DICOMweb.

One study is built as a PACS would hold it: a FracAtlas radiograph (DX) stored into Orthanc
(Debian ``orthanc`` with its ``orthanc-dicomweb`` plugin), and the node's results for it, made by
``dicomnode serve`` (shipped weights, GSPS on) whose destination is that Orthanc: the
Comprehensive 3D SR, the Secondary Capture and the GSPS. The built OHIF viewer (npm package
``@ohif/app``, its ``dist/``, installed by ``scripts/install_viewer_test.sh``) is served from
127.0.0.1 by ``webserver.py``, which also forwards ``/dicom-web`` to the Orthanc (one origin, no
CORS). ``drive.mjs`` opens the study in headless Chromium (playwright-core) and records what the
page shows; the tests below judge it, on the DOM and on the screenshots (written to
``tests/viewer/artifacts/``, paths printed).

The node's SR opens in OHIF's SR viewport over the DX: the whole-image assessment (a frame
along the image border labelled "Probability: <score> 1" and the finding site) and each box
(labelled "Certainty of Finding: <peak> 1"), drawn where the SR puts them.

Known limits of OHIF 3.13.2 (see README.md here), each checked precisely and reported as an
expected failure only when exactly that limit is what is seen:
- the GSPS is listed but not displayable ("SOP Class UID is not supported");
- SR measurements are never hydrated into tracked measurements (OHIF's SR adapters only read the
  measurements OHIF writes itself).

Skipped only when the viewer packages are not installed (tests/viewer/node_modules).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

from dicomnode.demo import (
    OrthancPacs,
    Patient,
    dx_from_image,
    free_port,
    running_node,
    stop_process,
    storescu,
)
from inference.imageio import read_grayscale
from tests.conftest import REPO

VIEWER = Path(__file__).resolve().parent
NODE_MODULES = VIEWER / "node_modules"
ARTIFACTS = VIEWER / "artifacts"
OHIF_SPEC = json.loads((VIEWER / "package.json").read_text())["ohifViewer"]
OHIF_DIST = VIEWER / OHIF_SPEC["into"] / OHIF_SPEC["version"] / "dist"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
CHROMIUM = Path("/usr/bin/chromium")
SAMPLE = REPO / "samples" / "fracatlas" / "IMG0002303.jpg"  # a shoulder the shipped model flags
NODE_AE = "FRACTURE_AI"
PATIENT = Patient(
    name="Viewertest^Ohif",
    patient_id="OHIF-E2E-0001",
    birth_date="19700101",
    sex="O",
    accession_number="OHIFACC1",
)
INSTALLED = (NODE_MODULES / "playwright-core" / "package.json").is_file() and (
    OHIF_DIST / "index.html"
).is_file()

pytestmark = [
    pytest.mark.dicom_peers,
    pytest.mark.slow,
    pytest.mark.timeout(400),
    pytest.mark.skipif(
        not INSTALLED,
        reason="viewer packages not installed (tests/viewer/node_modules with playwright-core and "
        f"the OHIF build {OHIF_DIST.relative_to(REPO)}): run scripts/install_viewer_test.sh",
    ),
]


# -- the PACS and the study --------------------------------------------------------------------


class DicomWebOrthanc(OrthancPacs):
    """The demo's throwaway Orthanc with the Debian DICOMweb plugin loaded and enabled."""

    def configuration(self) -> dict[str, Any]:
        config = super().configuration()
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Ssl": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        }
        return config


@dataclass(frozen=True)
class Study:
    """The study as the PACS holds it: the radiograph and the node's results."""

    pacs: DicomWebOrthanc
    uid: str
    dx: Dataset
    sr: Dataset
    sc: Dataset
    gsps: Dataset


def node_config(folder: Path, port: int, pacs: DicomWebOrthanc) -> Path:
    path = folder / "node.toml"
    path.write_text(
        f'[node]\nae_title = "{NODE_AE}"\nbind = "127.0.0.1"\nport = {port}\n'
        f"state_dir = {json.dumps(str(folder / 'state'))}\n\n"
        "[study]\nstable_seconds = 0.5\n\n"
        f'[inference]\nweights = {json.dumps(str(REPO / "ensemble_weights"))}\ndevice = "cpu"\n\n'
        "[outputs]\ngsps = true\n\n"
        "[delivery]\nretry_initial_seconds = 0.5\nretry_max_seconds = 2\n\n"
        f'[[destinations]]\nae_title = "{pacs.ae_title}"\nhost = "127.0.0.1"\n'
        f"port = {pacs.dicom_port}\n"
    )
    return path


def measurement_groups(sr: Dataset) -> list[Dataset]:
    return [
        group
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER" and "ContentSequence" in item
        for group in item.ContentSequence
        if group.ValueType == "CONTAINER"
    ]


def region_of(group: Dataset) -> Dataset | None:
    """The group's image region (SCOORD), if it has one."""
    return next((c for c in group.get("ContentSequence", []) if c.ValueType == "SCOORD"), None)


@dataclass(frozen=True)
class SrBox:
    """One box of the SR: its polyline (image pixels), its measurement as OHIF labels one
    ("<concept>: <value to 2 decimals> <unit code>") and its finding site."""

    points: np.ndarray  # [n, 2] column, row
    measurement: str
    finding_site: str
    image_uid: str


def sr_boxes(sr: Dataset) -> list[SrBox]:
    boxes = []
    for group in measurement_groups(sr):
        region = region_of(group)
        if region is None:
            continue
        items = group.ContentSequence
        number = next(c for c in items if c.ValueType == "NUM")
        value = number.MeasuredValueSequence[0]
        unit = value.MeasurementUnitsCodeSequence[0].CodeValue
        concept = number.ConceptNameCodeSequence[0].CodeMeaning
        site = next(
            c for c in items if c.ConceptNameCodeSequence[0].CodeValue == "363698007"
        ).ConceptCodeSequence[0]
        boxes.append(
            SrBox(
                points=np.asarray(region.GraphicData, dtype=float).reshape(-1, 2),
                measurement=f"{concept}: {float(value.NumericValue):.2f} {unit}",
                finding_site=str(site.CodeMeaning),
                image_uid=str(
                    region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                ),
            )
        )
    return boxes


def store_rest(pacs: DicomWebOrthanc, ds: Dataset) -> None:
    """Store ``ds`` into Orthanc through its REST API (DCMTK's storescu proposes no 3D SR)."""
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    request = urllib.request.Request(
        pacs.url("/instances"), data=data.getvalue(), headers={"Content-Type": "application/dicom"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.loads(answer.read())["Status"] == "Success"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """Orthanc (DICOMweb on) holding the DX and the node's SR, SC and GSPS for it."""
    assert DICOMWEB_PLUGIN.is_file(), "Orthanc's DICOMweb plugin is missing: install_viewer_test.sh"
    work = tmp_path_factory.mktemp("ohif")
    pacs = DicomWebOrthanc(work / "orthanc")
    pacs.start()
    try:
        image = read_grayscale(SAMPLE)
        dx = dx_from_image(image, body_part="SHOULDER", patient=PATIENT)
        dx_path = work / "dx.dcm"
        dx.save_as(dx_path, enforce_file_format=True)
        storescu(pacs.dicom_port, [dx_path], pacs.ae_title)  # the modality also sends to the PACS
        port = free_port()
        config = node_config(work, port, pacs)
        wanted = {
            Comprehensive3DSRStorage,
            SecondaryCaptureImageStorage,
            GrayscaleSoftcopyPresentationStateStorage,
        }
        with running_node(config, work / "node.log", time.monotonic() + 150):
            storescu(port, [dx_path], NODE_AE)
            deadline = time.monotonic() + 150
            while True:
                held = {o.sop_class_uid: o for o in pacs.received(dx.StudyInstanceUID)}
                if wanted <= held.keys():
                    break
                assert time.monotonic() < deadline, (
                    f"the node's results did not reach Orthanc: {sorted(held)}\n"
                    + (work / "node.log").read_text()[-3000:]
                )
                time.sleep(0.5)
        sr = held[Comprehensive3DSRStorage].dataset()
        assert len(sr_boxes(sr)) > 1, f"the shipped model drew no box on {SAMPLE.name}"
        yield Study(
            pacs=pacs,
            uid=str(dx.StudyInstanceUID),
            dx=dx,
            sr=sr,
            sc=held[SecondaryCaptureImageStorage].dataset(),
            gsps=held[GrayscaleSoftcopyPresentationStateStorage].dataset(),
        )
    finally:
        pacs.stop()


# -- the viewer --------------------------------------------------------------------------------


def app_config(base: str) -> str:
    """OHIF's window.config: one DICOMweb data source, the Orthanc behind ``base``."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc (test)",
            "name": "orthanc",
            "wadoUriRoot": f"{base}/wado",
            "qidoRoot": f"{base}/dicom-web",
            "wadoRoot": f"{base}/dicom-web",
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "orthanc",
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config, indent=2)};\n"


@pytest.fixture(scope="module")
def viewer(study: Study, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The built OHIF served on 127.0.0.1 with /dicom-web forwarded to the Orthanc; its URL."""
    work = tmp_path_factory.mktemp("web")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = work / "app-config.js"
    config.write_text(app_config(base))
    log = (work / "webserver.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            str(VIEWER / "webserver.py"),
            "--root",
            str(OHIF_DIST),
            "--config",
            str(config),
            "--upstream",
            study.pacs.url(""),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (work / "webserver.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/dicom-web/studies", timeout=5) as answer:
                    assert study.uid in answer.read().decode()
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "the web server did not answer"
                time.sleep(0.2)
        yield base
    finally:
        stop_process(process)
        log.close()


@pytest.fixture(scope="module")
def page(
    study: Study,
    viewer: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Run drive.mjs once over the study; its result (see drive.mjs), screenshots in ARTIFACTS."""
    node = shutil.which("node")
    assert node, "node is missing: install_viewer_test.sh"
    assert CHROMIUM.is_file(), "chromium is missing: install_viewer_test.sh"
    ARTIFACTS.mkdir(exist_ok=True)
    for old in [*ARTIFACTS.glob("*.png"), *ARTIFACTS.glob("*.json")]:
        old.unlink()
    work = tmp_path_factory.mktemp("browser")
    spec = {
        "base": viewer,
        "study": study.uid,
        "patientId": PATIENT.patient_id,
        "userDataDir": str(work / "profile"),
        "out": str(ARTIFACTS),
        "chromium": str(CHROMIUM),
        "series": {
            "dx": str(study.dx.SeriesDescription),
            "sc": str(study.sc.SeriesDescription),
            "gsps": str(study.gsps.SeriesDescription),
            "sr": str(study.sr.SeriesDescription),
        },
    }
    spec_path, result_path = work / "spec.json", ARTIFACTS / "result.json"
    spec_path.write_text(json.dumps(spec))
    run = subprocess.run(
        [node, str(VIEWER / "drive.mjs"), str(spec_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=VIEWER,
    )
    assert run.returncode == 0 and result_path.is_file(), run.stdout + run.stderr
    result: dict[str, Any] = json.loads(result_path.read_text())
    lines = ["viewer test screenshots:", *result["screenshots"], str(result_path)]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():  # shown even when output is captured
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    else:
        print("\n".join(lines))
    return result


def step(page: dict[str, Any], name: str) -> dict[str, Any]:
    """One step of the drive; fails with the step's error and screenshot when it did not run."""
    record: dict[str, Any] = page["steps"][name]
    assert "error" not in record, f"{name}: {record['error']} (see {record.get('errorScreenshot')})"
    return record


# -- judging screenshots -----------------------------------------------------------------------


def fit(width: float, height: float, rows: int, columns: int) -> tuple[float, float, float]:
    """Where a viewport of ``width`` x ``height`` shows a whole image: x, y offset and scale
    (OHIF's stack viewport fits the image, centred, preserving its aspect)."""
    scale = min(width / columns, height / rows)
    return (width - columns * scale) / 2, (height - rows * scale) / 2, scale


def displayed_correlation(screenshot: str, pixels: np.ndarray) -> float:
    """Pearson correlation between the image region of a viewport screenshot and ``pixels``."""
    shot = cv2.imread(screenshot, cv2.IMREAD_GRAYSCALE)
    assert shot is not None, screenshot
    rows, columns = pixels.shape[:2]
    x0, y0, scale = fit(shot.shape[1], shot.shape[0], rows, columns)
    margin = 3
    left, top = int(np.ceil(x0)) + margin, int(np.ceil(y0)) + margin
    right = int(np.floor(x0 + columns * scale)) - margin
    bottom = int(np.floor(y0 + rows * scale)) - margin
    crop = shot[top:bottom, left:right].astype(float)
    expected = cv2.resize(
        pixels.astype(np.float32),
        (round(columns * scale), round(rows * scale)),
        interpolation=cv2.INTER_AREA,
    )
    dx, dy = left - round(x0), top - round(y0)
    expected = expected[dy : dy + crop.shape[0], dx : dx + crop.shape[1]].astype(float)
    crop = crop[: expected.shape[0], : expected.shape[1]]
    return float(np.corrcoef(crop.ravel(), expected.ravel())[0, 1])


def grey(ds: Dataset) -> np.ndarray:
    pixels = ds.pixel_array
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if pixels.ndim == 3 else pixels


def polyline_points(points: str) -> np.ndarray:
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", points)]
    return np.asarray(numbers).reshape(-1, 2)


def coloured_along(screenshot: str, corners: np.ndarray, reach: int = 2) -> float:
    """Share of points along the rectangle ``corners`` (x0, y0, x1, y1, canvas pixels) that
    have a coloured (SR annotation: green, or yellow when selected) pixel within ``reach``
    pixels; the radiograph itself is grey."""
    shot = cv2.imread(screenshot, cv2.IMREAD_COLOR)
    assert shot is not None, screenshot
    b, g = (shot[..., i].astype(int) for i in range(2))
    green = (g > 150) & (b < 110) & (g - b > 80)
    x0, y0, x1, y1 = corners
    samples = []
    for t in np.linspace(0, 1, 200):
        samples += [(x0 + t * (x1 - x0), y0), (x0 + t * (x1 - x0), y1)]
        samples += [(x0, y0 + t * (y1 - y0)), (x1, y0 + t * (y1 - y0))]
    hits = 0
    for x, y in samples:
        xi, yi = round(x), round(y)
        window = green[max(yi - reach, 0) : yi + reach + 1, max(xi - reach, 0) : xi + reach + 1]
        hits += bool(window.any())
    return hits / len(samples)


# -- the tests ---------------------------------------------------------------------------------


def test_nothing_is_fetched_from_outside(page: dict[str, Any]) -> None:
    assert page["blocked"] == [], "the viewer tried to reach other hosts"


def test_study_list_shows_the_study(study: Study, page: dict[str, Any]) -> None:
    row = step(page, "studyList")["row"]
    assert row, "no study list row holds the patient id"
    for expected in (PATIENT.patient_id, "DX", "OT", "PR", "SR", PATIENT.accession_number):
        assert expected in row, f"{expected!r} not in the study list row {row!r}"


def test_every_object_is_listed_in_the_study_browser(study: Study, page: dict[str, Any]) -> None:
    listed = {(s["modality"], s["description"]) for s in step(page, "dx")["series"]}
    assert listed >= {
        ("DX", str(study.dx.SeriesDescription)),
        ("OT", str(study.sc.SeriesDescription)),
        ("PR", str(study.gsps.SeriesDescription)),
        ("SR", str(study.sr.SeriesDescription)),
    }, listed


def test_radiograph_is_displayed(study: Study, page: dict[str, Any]) -> None:
    record = step(page, "dx")
    assert record["state"]["overlayDescription"] == [str(study.dx.SeriesDescription)]
    correlation = displayed_correlation(record["viewportScreenshot"], grey(study.dx))
    assert correlation > 0.9, f"the DX viewport does not show the radiograph (r={correlation:.3f})"


def test_secondary_capture_is_displayed(study: Study, page: dict[str, Any]) -> None:
    """The SC (boxes and banner burned in) is what the viewport shows, pixel for pixel."""
    record = step(page, "sc")
    assert record["state"]["overlayDescription"] == [str(study.sc.SeriesDescription)]
    correlation = displayed_correlation(record["viewportScreenshot"], grey(study.sc))
    assert correlation > 0.9, f"the SC viewport does not show the SC (r={correlation:.3f})"
    other = displayed_correlation(record["viewportScreenshot"], grey(study.dx))
    assert other < correlation, "the SC viewport looks more like the DX than the SC"


def check_sr_boxes(study: Study, record: dict[str, Any], sr: Dataset) -> None:
    """The SR's boxes are drawn where they belong on the DX, labelled with their probability
    and finding site, and the viewport under them shows the DX."""
    state = record["state"]
    boxes = sr_boxes(sr)
    assert all(b.image_uid == study.dx.SOPInstanceUID for b in boxes)
    assert state["overlayDescription"] == [str(study.dx.SeriesDescription)], (
        "the SR's boxes are not shown over the DX"
    )
    assert len(state["polylines"]) == len(boxes), state["polylines"]
    x0, y0, scale = fit(
        state["box"]["width"], state["box"]["height"], study.dx.Rows, study.dx.Columns
    )
    drawn = [polyline_points(p["points"]) for p in state["polylines"]]
    drawn_rectangles = [np.concatenate([p.min(axis=0), p.max(axis=0)]) for p in drawn]
    lines = [line for text in state["svgText"] for line in text]
    for box in boxes:
        expected = box.points * scale + (x0, y0)  # image pixels to viewport (CSS) pixels
        rectangle = np.concatenate([expected.min(axis=0), expected.max(axis=0)])
        assert any(np.abs(r - rectangle).max() < 3 for r in drawn_rectangles), (
            f"no box drawn at {rectangle.round(1)}: {[r.round(1) for r in drawn_rectangles]}"
        )
        inside = np.clip(rectangle, 2, [state["box"]["width"] - 3, state["box"]["height"] - 3] * 2)
        share = coloured_along(record["viewportScreenshot"], inside)
        assert share > 0.3, f"the box outline is not visible in the screenshot ({share:.0%})"
        assert box.measurement in lines, (box.measurement, lines)
        assert any(line.endswith(f": {box.finding_site}") for line in lines), lines
    correlation = displayed_correlation(record["viewportScreenshot"], grey(study.dx))
    assert correlation > 0.85, f"the SR viewport does not show the DX (r={correlation:.3f})"


def test_node_sr_findings_are_shown_over_the_radiograph(study: Study, page: dict[str, Any]) -> None:
    """OHIF's SR viewport draws the whole-image assessment and each box (POLYLINE) at its place
    on the DX, labelled with the group's measurement and finding site."""
    check_sr_boxes(study, step(page, "sr"), study.sr)


def test_sr_measurements_are_tracked(page: dict[str, Any]) -> None:
    """Accepting OHIF's 'track measurements' prompt would hydrate the SR into editable ones."""
    step(page, "sr")
    record = step(page, "tracking")
    assert record.get("prompted"), "OHIF did not offer to track the SR's measurements"
    messages = record["consoleAfterYes"]
    if any("No spatial coordinates group found" in m for m in messages) and any(
        "Didn't find any tracked measurements" in m for m in messages
    ):
        pytest.xfail(
            "OHIF 3.13.2 does not hydrate the SR's measurements: its SR adapters (dcmjs) look for "
            "the SCOORD inside the measurement (TID 300) and for OHIF's own tool names as "
            "tracking identifiers ('No spatial coordinates group found', 'Didn't find any "
            "tracked measurements'); the boxes stay a read-only SR display"
        )
    raise AssertionError(f"tracking the SR's measurements behaved otherwise: {messages}")


def test_gsps_is_displayed(study: Study, page: dict[str, Any]) -> None:
    record = step(page, "gsps")
    assert record["rows"] == 1, "the GSPS is not listed in the study browser"
    tooltip = " ".join(record.get("tooltip") or [])
    if (
        "SOP Class UID is not supported" in tooltip
        and "could not be added to the viewport" in record["bodyText"]
        and record["state"]["overlayDescription"] == [str(study.dx.SeriesDescription)]
    ):
        pytest.xfail(
            "OHIF 3.13.2 lists the GSPS (PR) but has no handler for its SOP class: the series "
            "carries a warning 'Display Set Messages: 1. SOP Class UID is not supported.', and a "
            "double click answers 'The selected display sets could not be added to the "
            "viewport.' (console: 'Unsupported displaySet'); the GSPS boxes are never drawn"
        )
    raise AssertionError(f"the GSPS behaved otherwise than known: {record}")
