"""Tests for inference.regions: the region table, its DICOM coding and the region matchers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from highdicom._standard_utils import get_anatomic_region_map  # Annex L table L-1
from hypothesis import given
from hypothesis import strategies as st
from pydicom.sr.codedict import codes

from inference.regions import (
    CALIBRATION_GROUPS,
    GLOBAL_GROUP,
    REGIONS,
    MatchSource,
    RegionMatch,
    group_for,
    match_body_part,
    match_description,
    normalize_description,
    region_by_key,
    resolve_region,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FRACATLAS_GROUPS = {"hand", "leg", "hip", "shoulder"}
# Accepted BodyPartExamined values that are not Annex L terms (see the module docstring).
LENIENT_BODY_PARTS = {"LEG", "RIBS"}

ALL_BODY_PARTS = [(term, key) for key, region in REGIONS.items() for term in region.body_parts]
ALL_KEYWORDS = [(word, key) for key, region in REGIONS.items() for word in region.keywords]


# --- the table -------------------------------------------------------------------------------


def test_sixteen_regions_keyed_by_their_own_unique_keys() -> None:
    assert len(REGIONS) == 16
    assert all(region.key == key for key, region in REGIONS.items())
    assert list(REGIONS) == sorted(REGIONS)
    assert {
        "ankle",
        "clavicle",
        "elbow",
        "femur",
        "forearm",
        "hip",
        "humerus",
        "knee",
        "pelvis",
        "shoulder",
        "tibia_fibula",
        "wrist",
        "foot",
        "hand",
    } <= set(REGIONS)


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        REGIONS["new"] = REGIONS["hand"]  # type: ignore[index]


@pytest.mark.parametrize("key", list(REGIONS))
def test_finding_site_is_a_snomed_code_pydicom_knows(key: str) -> None:
    site = REGIONS[key].finding_site
    assert site.scheme_designator == "SCT"
    assert site.value.isdigit() and site.meaning
    known = {(code.value, code.meaning) for code in codes.SCT.concepts.values()}
    assert (site.value, site.meaning) in known


def test_finding_sites_come_from_cid_4031_except_tibia_fibula() -> None:
    cid4031 = {(code.value, code.meaning) for code in codes.CID4031.concepts.values()}
    outside = {
        key
        for key, region in REGIONS.items()
        if (region.finding_site.value, region.finding_site.meaning) not in cid4031
    }
    assert outside == {"tibia_fibula"}


@pytest.mark.parametrize("key", list(REGIONS))
def test_finding_site_is_the_annex_l_code_of_one_of_its_body_parts(key: str) -> None:
    annex_l = get_anatomic_region_map()
    region = REGIONS[key]
    annex_codes = {annex_l[term][0].value for term in region.body_parts if term in annex_l}
    assert region.finding_site.value in annex_codes


def test_body_parts_are_annex_l_terms_apart_from_the_lenient_aliases() -> None:
    annex_l = get_anatomic_region_map()
    terms = {term for term, _ in ALL_BODY_PARTS}
    assert terms - set(annex_l) == LENIENT_BODY_PARTS
    assert len(terms) == len(ALL_BODY_PARTS), "a body part term is listed twice"


def test_keywords_are_unique_normalized_and_non_empty() -> None:
    words = [word for word, _ in ALL_KEYWORDS]
    assert len(set(words)) == len(words)
    assert all(word and normalize_description(word) == word for word in words)


def test_groups_are_known_and_follow_fracatlas() -> None:
    assert GLOBAL_GROUP in CALIBRATION_GROUPS
    assert {region.group for region in REGIONS.values()} <= set(CALIBRATION_GROUPS)
    assert {region.group for region in REGIONS.values()} == FRACATLAS_GROUPS | {GLOBAL_GROUP}
    expected = {
        "hand": {"hand", "wrist", "forearm"},
        "leg": {"ankle", "foot", "knee", "tibia_fibula", "femur"},
        "hip": {"hip", "pelvis"},
        "shoulder": {"shoulder", "clavicle", "humerus"},
        GLOBAL_GROUP: {"elbow", "ribs", "spine"},
    }
    for group, keys in expected.items():
        assert {key for key, region in REGIONS.items() if region.group == group} == keys


def test_region_by_key() -> None:
    assert region_by_key("tibia_fibula").display == "Tibia/fibula"
    with pytest.raises(ValueError, match="valid regions: ankle, clavicle"):
        region_by_key("tibia/fibula")


# --- BodyPartExamined -----------------------------------------------------------------------


@pytest.mark.parametrize(("term", "key"), ALL_BODY_PARTS)
def test_each_listed_body_part_maps_to_its_region(term: str, key: str) -> None:
    region = match_body_part(term)
    assert region is not None and region.key == key
    lenient = match_body_part(f"  {term.lower()} ")
    assert lenient is not None and lenient.key == key


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("tibia_fibula", "tibia_fibula"),
        ("Tibia Fibula", "tibia_fibula"),
        ("C-SPINE", "spine"),
        ("l_spine", "spine"),
        ("AC JOINT", "shoulder"),
        ("upper arm", "humerus"),
    ],
)
def test_body_part_separators_are_ignored(value: str, key: str) -> None:
    region = match_body_part(value)
    assert region is not None and region.key == key


@pytest.mark.parametrize("value", [None, "", "   ", "EXTREMITY", "CHEST", "THORAX", "ARM", "SKULL"])
def test_generic_or_absent_body_parts_name_no_region(value: str | None) -> None:
    assert match_body_part(value) is None


def test_body_parts_of_the_real_dicom_samples() -> None:
    with (SHARED / "dicom-samples" / "samples.csv").open(newline="") as handle:
        values = {row["body_part"] for row in csv.DictReader(handle)}
    assert {"HIP", "CSPINE", "EXTREMITY"} <= values
    resolved = {value: match_body_part(value) for value in values}
    assert {value: region.key for value, region in resolved.items() if region} == {
        "HIP": "hip",
        "CSPINE": "spine",
    }


# --- descriptions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("AP ankle", "ankle"),
        ("Hand 3 views", "hand"),
        ("R WRIST", "wrist"),
        ("XR TIB FIB LT", "tibia_fibula"),
        ("Tib/Fib AP+Lat", "tibia_fibula"),
        ("C-Spine 2 views", "spine"),
        ("LUMBAR SPINE AP/LAT", "spine"),
        ("XR CHEST RIBS BILAT", "ribs"),
        ("Pelvis AP", "pelvis"),
        ("Shoulder Y-view", "shoulder"),
        ("L CLAVICLE", "clavicle"),
        ("Elbow^2 views", "elbow"),
        ("RIGHT FEMUR", "femur"),
        ("FOREARM_AP_LAT", "forearm"),
        ("Humerus", "humerus"),
        ("KNEE 3V", "knee"),
        ("FEET BILATERAL", "foot"),
        ("Toes left", "foot"),
        ("Neck of femur L", "hip"),
        ("distal radius", "wrist"),
        ("Tibial plateau", "knee"),
        ("upper leg AP", "femur"),
        ("hand and wrist", "hand"),
        ("wrist and hand", "wrist"),
        ("XR FOOT AND ANKLE", "foot"),
        ("Röntgen Hüfte links", "hip"),
        ("Fuß d.p. und schräg", "foot"),
        ("HWS in 2 Ebenen", "spine"),
        ("OSG rechts", "ankle"),
        ("Handgelenk re", "wrist"),
        ("Épaule face", "shoulder"),
        ("Radio de muñeca", "wrist"),
        ("Pols links", "wrist"),
    ],
)
def test_realistic_descriptions(text: str, key: str) -> None:
    region = match_description([text])
    assert region is not None and region.key == key


@pytest.mark.parametrize("text", ["football injury", "CHEST PA", "Skull", "handheld", "LEGACY", ""])
def test_descriptions_naming_no_region(text: str) -> None:
    assert match_description([text]) is None


def test_first_text_naming_a_region_decides() -> None:
    region = match_description([None, "", "portable", "Knee 2V", "Ankle"])
    assert region is not None and region.key == "knee"
    assert match_description([]) is None
    assert match_description([None]) is None


def test_a_bare_string_is_refused() -> None:
    with pytest.raises(ValueError, match="sequence"):
        match_description("ankle")


_FILLER = st.sampled_from(["ap", "lat", "xr", "left", "r", "2", "views", "bilat", "dx", "obl"])
_SEPARATOR = st.sampled_from([" ", "  ", "_", "^", " - ", "/", ", "])


@given(data=st.data())
def test_each_keyword_resolves_to_its_region_amid_filler(data: st.DataObject) -> None:
    word, key = data.draw(st.sampled_from(ALL_KEYWORDS))
    before = data.draw(st.lists(_FILLER, max_size=2))
    after = data.draw(st.lists(_FILLER, max_size=2))
    separator = data.draw(_SEPARATOR)
    spelled = data.draw(st.sampled_from([word, word.upper(), word.title(), word.replace(" ", "-")]))
    text = separator.join([*before, spelled, *after])
    region = match_description([text])
    assert region is not None and region.key == key, text


# --- resolving and groups -------------------------------------------------------------------


def test_body_part_is_trusted_before_descriptions() -> None:
    match = resolve_region(body_part="KNEE", descriptions=["ankle"])
    assert match.region is not None and match.region.key == "knee"
    assert match.source == MatchSource.BODY_PART == "body_part"
    assert (match.group, match.fallback) == ("leg", False)


def test_generic_body_part_lets_descriptions_decide() -> None:
    match = resolve_region(body_part="EXTREMITY", descriptions=["Distal tibia", "Ankle"])
    assert match.region is not None and match.region.key == "tibia_fibula"
    assert match.source == "description"


def test_user_region_overrides_everything() -> None:
    match = resolve_region(body_part="KNEE", descriptions=["knee"], user_region="wrist")
    assert match.region is not None and match.region.key == "wrist"
    assert (match.source, match.group, match.fallback) == ("user", "hand", False)
    with pytest.raises(ValueError, match="unknown region"):
        resolve_region(body_part=None, descriptions=[], user_region="brain")


def test_unknown_region_is_a_flagged_fallback() -> None:
    match = resolve_region(body_part="CHEST", descriptions=["PA", None])
    assert match.region is None
    assert (match.source, match.group, match.fallback) == ("unknown", GLOBAL_GROUP, True)


@pytest.mark.parametrize("key", ["elbow", "ribs", "spine"])
def test_regions_without_a_fracatlas_group_are_flagged_fallbacks(key: str) -> None:
    match = resolve_region(body_part=None, descriptions=[REGIONS[key].keywords[0]])
    assert match.region is not None and match.region.key == key
    assert (match.group, match.fallback) == (GLOBAL_GROUP, True)


def test_region_match_refuses_inconsistent_fields() -> None:
    wrist = REGIONS["wrist"]
    with pytest.raises(ValueError, match="group"):
        RegionMatch(region=wrist, source=MatchSource.USER, group="leg", fallback=False)
    with pytest.raises(ValueError, match="fallback"):
        RegionMatch(region=wrist, source=MatchSource.USER, group="hand", fallback=True)
    with pytest.raises(ValueError, match="source"):
        RegionMatch(region=None, source=MatchSource.USER, group=GLOBAL_GROUP, fallback=True)


def test_group_for_calibrated_and_fallback_groups() -> None:
    everything = set(CALIBRATION_GROUPS)
    assert group_for("wrist", everything) == ("hand", False)
    assert group_for("pelvis", everything) == ("hip", False)
    assert group_for("wrist", {"leg", GLOBAL_GROUP}) == (GLOBAL_GROUP, True)
    assert group_for("elbow", everything) == (GLOBAL_GROUP, True)
    assert group_for(None, everything) == (GLOBAL_GROUP, True)


@given(
    key=st.sampled_from([*REGIONS, None]),
    calibrated=st.sets(st.sampled_from(sorted(FRACATLAS_GROUPS))),
)
def test_group_for_never_names_an_uncalibrated_group(key: str | None, calibrated: set[str]) -> None:
    available = calibrated | {GLOBAL_GROUP}
    group, fallback = group_for(key, available)
    assert group in available
    assert fallback == (group == GLOBAL_GROUP)
    if key is not None and REGIONS[key].group in calibrated:
        assert group == REGIONS[key].group


def test_group_for_refuses_bad_calibrations() -> None:
    with pytest.raises(ValueError, match="lack 'global'"):
        group_for("wrist", {"hand"})
    with pytest.raises(ValueError, match="unknown calibration groups"):
        group_for("wrist", {"hand", "global", "arm"})
    with pytest.raises(ValueError, match="unknown region"):
        group_for("brain", {"global"})
