"""The anatomical regions the detector knows, and how a study is assigned to one.

The paper (Jones et al. 2020, npj Digit Med 3:144) tests "16 anatomical regions" and calibrates one
decision threshold per region (92.5 % sensitivity on each). The text shipped in
``shared/reference`` never names all sixteen (they are listed in its Fig. 2, which is an image);
searching the stored public references did not turn up the figure either. What is certain: the
cleared device (Imagen OsteoDetect/FractureDetect, the paper's ref. 19) lists ankle, clavicle,
elbow, femur, forearm, hip, humerus, knee, pelvis, shoulder, tibia/fibula and wrist, and the
paper's text itself names foot (lowest AUC) and hand. The remaining two are taken to be ribs and
spine, the other two regions routinely imaged for adult trauma; that part is an educated guess
(moderate confidence) and only changes which extra studies this table recognises.

Each :class:`Region` carries

* its SNOMED CT code for use as a DICOM finding site / anatomic region. The values are those DICOM
  itself uses: CID 4031 "Common Anatomic Regions" where the region is in it, otherwise the code
  PS3.16 Annex L pairs with the BodyPartExamined term (``Tibia and fibula``, 110536004). They
  were checked against pydicom's ``pydicom.sr.codedict`` and highdicom's copy of Annex L (table
  L-1); ``tests/test_regions.py`` re-checks them against both, so a typo cannot ship. Joints use
  the joint code where DICOM does (ANKLE -> "Ankle joint", HIP -> "Hip joint" ...).
* the BodyPartExamined (0018,0015) defined terms of Annex L that map onto it. Two lenient
  aliases that are not Annex L terms are accepted because real modalities send them: ``LEG`` (a
  defined term of the old PS3.3 list, meaning the lower leg) and ``RIBS``. The equally old
  ``ARM`` is deliberately *not* mapped: sites use it for the forearm as often as for the upper
  arm, so the descriptions decide instead.
* keywords (already in the normal form of :func:`normalize_description`) that find the region in
  free-text study / series descriptions and protocol names, in English plus a few common German,
  French, Dutch and Spanish words and abbreviations (HWS/BWS/LWS, OSG, tib/fib, c-spine ...).
* its calibration group. The shipped training data (FracAtlas) only labels four coarse groups,
  so only those can have calibrated thresholds: ``hand`` (hand, wrist, forearm), ``leg`` (ankle,
  foot, knee, tibia/fibula, femur), ``hip`` (hip, pelvis), ``shoulder`` (shoulder, clavicle,
  humerus). Elbow, ribs and spine have no FracAtlas group (FracAtlas's "hand" covers hand, wrist
  and forearm but not the elbow; it has no trunk images) and use the pooled ``global`` thresholds,
  flagged as a fallback wherever a result is reported.

This module is pure Python: the DICOM edge reads the attributes and passes strings in.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

GLOBAL_GROUP = "global"
"""The pooled fallback calibration group, used where a region has no calibrated thresholds."""

CALIBRATION_GROUPS: tuple[str, ...] = ("hand", "leg", "hip", "shoulder", GLOBAL_GROUP)
"""Every calibration group name a region may use (FracAtlas's four groups plus the fallback)."""

_KEY_RE = re.compile(r"[a-z][a-z0-9_]*")
_BODY_PART_RE = re.compile(r"[A-Z0-9]+")
_NON_WORD_RE = re.compile(r"[^a-z0-9]+")
_BODY_PART_SEPARATORS_RE = re.compile(r"[\s_\-/.,]+")


def normalize_description(text: str) -> str:
    """Fold a free-text description into the form keywords are written in.

    Case-folded (``ß`` -> ``ss``), accents stripped (``épaule`` -> ``epaule``), and every run of
    characters other than ``a-z``/``0-9`` (spaces, ``/``, ``-``, ``_``, ``^``, dots ...) turned
    into one space, so ``"Tib/Fib"``, ``"tib-fib"`` and ``"TIB_FIB"`` all read ``"tib fib"``.
    """
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    ascii_only = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _NON_WORD_RE.sub(" ", ascii_only).strip()


def normalize_body_part(value: str) -> str:
    """Fold a BodyPartExamined value into Annex L spelling (``"tibia_fibula "`` -> ``TIBIAFIBULA``).

    BodyPartExamined is a code string without separators, but hand-typed or converted values
    carry spaces, underscores, hyphens or slashes; those are dropped and the rest upper-cased.
    """
    return _BODY_PART_SEPARATORS_RE.sub("", value.strip().upper())


@dataclass(frozen=True)
class Code:
    """A coded concept, with the field names pydicom's and highdicom's ``Code`` use."""

    value: str
    meaning: str
    scheme_designator: str = "SCT"

    def __post_init__(self) -> None:
        if self.scheme_designator == "SCT" and not self.value.isdigit():
            raise ValueError(f"SNOMED CT code value {self.value!r} is not all digits")
        if not self.meaning:
            raise ValueError(f"code {self.value!r} has an empty meaning")


@dataclass(frozen=True)
class Region:
    """One anatomical region: its names, DICOM coding, text keywords and calibration group."""

    key: str
    display: str
    finding_site: Code
    body_parts: tuple[str, ...]
    keywords: tuple[str, ...]
    group: str

    def __post_init__(self) -> None:
        if not _KEY_RE.fullmatch(self.key):
            raise ValueError(f"region key {self.key!r} is not lower_snake_case")
        if self.group not in CALIBRATION_GROUPS:
            raise ValueError(
                f"region {self.key!r}: group {self.group!r} is not one of {CALIBRATION_GROUPS}"
            )
        for term in self.body_parts:
            if not _BODY_PART_RE.fullmatch(term):
                raise ValueError(f"region {self.key!r}: body part {term!r} is not a code string")
        if not self.keywords:
            raise ValueError(f"region {self.key!r} has no keywords")
        for keyword in self.keywords:
            if normalize_description(keyword) != keyword:
                raise ValueError(
                    f"region {self.key!r}: keyword {keyword!r} is not in normalized form "
                    f"{normalize_description(keyword)!r}"
                )


def _region(
    key: str,
    display: str,
    code: tuple[str, str],
    body_parts: str,
    keywords: str,
    group: str,
) -> Region:
    """Build a table row; ``body_parts`` is space-separated, ``keywords`` comma-separated."""
    return Region(
        key=key,
        display=display,
        finding_site=Code(value=code[0], meaning=code[1]),
        body_parts=tuple(body_parts.split()),
        keywords=tuple(word.strip() for word in keywords.split(",")),
        group=group,
    )


_TABLE: tuple[Region, ...] = (
    _region(
        "ankle",
        "Ankle",
        ("70258002", "Ankle joint"),
        "ANKLE",
        "ankle, mortise, malleolus, malleolar, sprunggelenk, osg, cheville, tobillo, enkel",
        "leg",
    ),
    _region(
        "clavicle",
        "Clavicle",
        ("51299004", "Clavicle"),
        "CLAVICLE SCJOINT",
        "clavicle, clavicula, klavikula, clavicule, schlusselbein, schluesselbein, sleutelbeen, "
        "sternoclavicular, sc joint",
        "shoulder",
    ),
    _region(
        "elbow",
        "Elbow",
        ("16953009", "Elbow joint"),
        "ELBOW",
        "elbow, olecranon, radial head, ellenbogen, ellbogen, coude, codo, elleboog",
        GLOBAL_GROUP,
    ),
    _region(
        "femur",
        "Femur",
        ("71341001", "Femur"),
        "FEMUR THIGH",
        "femur, thigh, upper leg, femoral shaft, oberschenkel, dijbeen, bovenbeen, cuisse, muslo",
        "leg",
    ),
    _region(
        "foot",
        "Foot",
        ("56459004", "Foot"),
        "FOOT TOE CALCANEUS",
        "foot, feet, toe, hallux, calcaneus, calcaneum, heel, metatarsal, fuss, ferse, pied, pie, "
        "voet",
        "leg",
    ),
    _region(
        "forearm",
        "Forearm",
        ("14975008", "Forearm"),
        "FOREARM RADIUS ULNA",
        "forearm, radius, ulna, radius ulna, unterarm, onderarm, avant bras, antebrazo",
        "hand",
    ),
    _region(
        "hand",
        "Hand",
        ("85562004", "Hand"),
        "HAND FINGER THUMB",
        "hand, finger, thumb, metacarpal, mano, daumen, vinger, duim, doigt, pouce",
        "hand",
    ),
    _region(
        "hip",
        "Hip",
        ("24136001", "Hip joint"),
        "HIP",
        "hip, hip joint, neck of femur, femoral neck, nof, hufte, huefte, hanche, cadera, heup",
        "hip",
    ),
    _region(
        "humerus",
        "Humerus",
        ("85050009", "Humerus"),
        "HUMERUS UPPERARM",
        "humerus, humeral, upper arm, oberarm, bovenarm, humero",
        "shoulder",
    ),
    _region(
        "knee",
        "Knee",
        ("72696002", "Knee"),
        "KNEE PATELLA",
        "knee, patella, tibial plateau, knie, genou, rodilla",
        "leg",
    ),
    _region(
        "pelvis",
        "Pelvis",
        ("816092008", "Pelvis"),
        "PELVIS SIJOINT",
        "pelvis, pelvic, acetabulum, acetabular, sacroiliac, si joint, pubic, becken, bassin, "
        "bekken",
        "hip",
    ),
    _region(
        "ribs",
        "Ribs",
        ("113197003", "Rib"),
        "RIB RIBS",
        "rib, rippen, ribben, costillas, cotes",
        GLOBAL_GROUP,
    ),
    _region(
        "shoulder",
        "Shoulder",
        ("16982005", "Shoulder"),
        "SHOULDER SCAPULA ACJOINT",
        "shoulder, scapula, ac joint, acromioclavicular, glenohumeral, schulter, epaule, hombro, "
        "schouder",
        "shoulder",
    ),
    _region(
        "spine",
        "Spine",
        ("421060004", "Spine"),
        "SPINE CSPINE TSPINE LSPINE LSSPINE SSPINE CTSPINE TLSPINE COCCYX",
        "spine, c spine, t spine, l spine, ls spine, cspine, tspine, lspine, cervical spine, "
        "thoracic spine, lumbar spine, lumbosacral spine, cervical, lumbar, thoracolumbar, "
        "sacrum, coccyx, vertebra, vertebrae, hws, bws, lws, wirbelsaule, wirbelsaeule, "
        "wervelkolom, rachis, columna",
        GLOBAL_GROUP,
    ),
    _region(
        "tibia_fibula",
        "Tibia/fibula",
        ("110536004", "Tibia and fibula"),
        "TIBIAFIBULA TIBIA FIBULA LOWERLEG LEG",
        "tibia, fibula, tibia fibula, tibia and fibula, tib fib, tibfib, lower leg, leg, "
        "unterschenkel, onderbeen, jambe, perone",
        "leg",
    ),
    _region(
        "wrist",
        "Wrist",
        ("74670003", "Wrist joint"),
        "WRIST",
        "wrist, scaphoid, distal radius, carpal, carpus, handgelenk, poignet, muneca, pols",
        "hand",
    ),
)


def _index_table(table: Sequence[Region]) -> Mapping[str, Region]:
    """Key the table, refusing duplicate keys (a table error, caught at import)."""
    index: dict[str, Region] = {}
    for region in table:
        if region.key in index:
            raise ValueError(f"duplicate region key {region.key!r}")
        index[region.key] = region
    return MappingProxyType(index)


REGIONS: Mapping[str, Region] = _index_table(_TABLE)
"""The regions by key, in table (alphabetical) order. Read-only."""


def _unique_index(pairs: Sequence[tuple[str, Region]], what: str) -> Mapping[str, Region]:
    """Index regions by a term, refusing a term claimed by two regions."""
    index: dict[str, Region] = {}
    for term, region in pairs:
        if term in index and index[term] is not region:
            raise ValueError(f"{what} {term!r} is claimed by {index[term].key} and {region.key}")
        index[term] = region
    return MappingProxyType(index)


_BY_BODY_PART = _unique_index(
    [(term, region) for region in _TABLE for term in region.body_parts], "body part"
)
_BY_KEYWORD = _unique_index(
    [(word, region) for region in _TABLE for word in region.keywords], "keyword"
)


def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    """Whole-word pattern for a normalized keyword, allowing an English plural (``-s``/``-es``).

    Words are delimited by the spaces :func:`normalize_description` leaves, or the text's ends,
    so ``foot`` does not match ``football`` and ``hand`` does not match ``handgelenk``.
    """
    return re.compile(rf"(?<![a-z0-9]){re.escape(keyword)}(?:s|es)?(?![a-z0-9])")


_KEYWORD_PATTERNS: tuple[tuple[re.Pattern[str], int, Region], ...] = tuple(
    (_keyword_pattern(word), len(word.split()), region) for word, region in _BY_KEYWORD.items()
)


def region_by_key(key: str) -> Region:
    """The region with this key; ValueError naming the valid keys otherwise."""
    try:
        return REGIONS[key]
    except KeyError:
        raise ValueError(f"unknown region {key!r}; valid regions: {', '.join(REGIONS)}") from None


def match_body_part(value: str | None) -> Region | None:
    """The region a BodyPartExamined value names, or None (absent, empty or not a region term).

    Lenient about case, surrounding blanks and separators (``"tibia fibula"``, ``"C-SPINE"``).
    Generic terms (``EXTREMITY``, ``CHEST``, ``ARM``) deliberately name no region.
    """
    if value is None:
        return None
    return _BY_BODY_PART.get(normalize_body_part(value))


def _match_text(text: str) -> Region | None:
    """The most specific region named in one text (see :func:`match_description`)."""
    normalized = normalize_description(text)
    best: tuple[int, int] | None = None
    best_region: Region | None = None
    for pattern, n_words, region in _KEYWORD_PATTERNS:
        found = pattern.search(normalized)
        if found is None:
            continue
        rank = (n_words, -found.start())
        if best is None or rank > best:
            best, best_region = rank, region
    return best_region


def match_description(texts: Sequence[str | None]) -> Region | None:
    """The region named by free-text descriptions, or None when none names one.

    ``texts`` are tried in the order given, so the caller lists the most specific first (series
    description, then protocol name, then study description); the first text that names any
    region decides. Within a text, keywords match whole words after
    :func:`normalize_description` (``"tib/fib"`` -> tibia/fibula; ``"football"`` is not a foot),
    and the most specific match wins: a longer phrase beats a single word (``"neck of femur"``
    -> hip although ``femur`` matches too; ``"distal radius"`` -> wrist; ``"tibial plateau"`` ->
    knee; ``"upper leg"`` -> femur), and between equally long matches the one named first wins,
    since a description leads with the part examined: ``"hand and wrist"`` -> hand, ``"wrist
    and hand"`` -> wrist, ``"foot and ankle"`` -> foot.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of descriptions, not a single string")
    for text in texts:
        if text:
            region = _match_text(text)
            if region is not None:
                return region
    return None


class MatchSource(StrEnum):
    """Where a study's region came from."""

    USER = "user"
    BODY_PART = "body_part"
    DESCRIPTION = "description"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RegionMatch:
    """The region assigned to an image, where it came from, and the calibration group it implies.

    ``fallback`` is True when the region is unknown or its group is the pooled ``global`` one,
    i.e. whenever no region-specific thresholds can apply whatever the calibration holds.
    """

    region: Region | None
    source: MatchSource
    group: str
    fallback: bool

    def __post_init__(self) -> None:
        if (self.region is None) != (self.source == MatchSource.UNKNOWN):
            raise ValueError(f"source {self.source} does not fit region {self.region!r}")
        expected = GLOBAL_GROUP if self.region is None else self.region.group
        if self.group != expected:
            raise ValueError(f"group {self.group!r} does not fit region (expected {expected!r})")
        if self.fallback != (self.group == GLOBAL_GROUP):
            raise ValueError(f"fallback={self.fallback} does not fit group {self.group!r}")

    @classmethod
    def of(cls, region: Region | None, source: MatchSource) -> RegionMatch:
        """Build a match, deriving the group and the fallback flag from the region."""
        group = GLOBAL_GROUP if region is None else region.group
        return cls(region=region, source=source, group=group, fallback=group == GLOBAL_GROUP)


def resolve_region(
    *,
    body_part: str | None,
    descriptions: Sequence[str | None],
    user_region: str | None = None,
) -> RegionMatch:
    """Assign a region: the configured one, else BodyPartExamined, else the descriptions.

    ``user_region`` is a region key forced by configuration (a node that only ever sees wrists);
    an unknown key is a ValueError. BodyPartExamined is a coded attribute and so is trusted
    before free text, but generic values (``EXTREMITY``) name no region and let the
    descriptions decide. When nothing names a region the match is ``unknown`` on the ``global``
    fallback group.
    """
    if user_region is not None:
        return RegionMatch.of(region_by_key(user_region), MatchSource.USER)
    region = match_body_part(body_part)
    if region is not None:
        return RegionMatch.of(region, MatchSource.BODY_PART)
    region = match_description(descriptions)
    if region is not None:
        return RegionMatch.of(region, MatchSource.DESCRIPTION)
    return RegionMatch.of(None, MatchSource.UNKNOWN)


def group_for(region_key: str | None, calibrated_groups: Collection[str]) -> tuple[str, bool]:
    """The calibration group whose thresholds to use, and whether that is a fallback.

    ``calibrated_groups`` are the groups a calibration file has thresholds for; it must hold
    ``global``, the pooled fallback, and only names from :data:`CALIBRATION_GROUPS`. A region
    whose group is calibrated uses it (fallback False, unless that group is ``global`` itself);
    an unknown region (None) or one whose group was not calibrated (too few positives in the
    calibration data, say) falls back to ``global`` (fallback True). An unknown key is a
    ValueError.
    """
    unknown = sorted(set(calibrated_groups) - set(CALIBRATION_GROUPS))
    if unknown:
        raise ValueError(f"unknown calibration groups {unknown}; known: {CALIBRATION_GROUPS}")
    if GLOBAL_GROUP not in calibrated_groups:
        raise ValueError(f"calibrated groups {sorted(calibrated_groups)} lack {GLOBAL_GROUP!r}")
    if region_key is None:
        return GLOBAL_GROUP, True
    group = region_by_key(region_key).group
    if group in calibrated_groups:
        return group, group == GLOBAL_GROUP
    return GLOBAL_GROUP, True


@dataclass(frozen=True)
class OtherAnatomy:
    """Anatomy outside musculoskeletal fracture imaging that a header may name (chest, abdomen,
    head, breast): recognised so that such an image is reported as outside the intended use
    instead of being analysed as an unknown region."""

    name: str
    body_parts: tuple[str, ...]
    keywords: tuple[str, ...]


OTHER_ANATOMY: tuple[OtherAnatomy, ...] = (
    OtherAnatomy(
        "chest",
        ("CHEST", "THORAX", "LUNG", "HEART", "MEDIASTINUM"),
        ("chest", "thorax", "lung", "cxr", "torax", "poumon", "brustkorb", "lunge", "borstkas"),
    ),
    OtherAnatomy(
        "abdomen",
        ("ABDOMEN", "KIDNEY", "BLADDER", "COLON", "STOMACH", "ABDOMENPELVIS"),
        ("abdomen", "abdominal", "kub", "bauch", "abdomen leer", "buik"),
    ),
    OtherAnatomy(
        "head",
        ("HEAD", "SKULL", "BRAIN", "FACE", "SINUS", "JAW", "TMJ", "MANDIBLE", "ORBIT"),
        ("head", "skull", "sinus", "mandible", "orbit", "schadel", "crane", "schedel", "craneo"),
    ),
    OtherAnatomy("breast", ("BREAST",), ("breast", "mammo", "mammography", "mamma")),
)
"""Non-musculoskeletal anatomy by BodyPartExamined terms (Annex L) and description keywords."""

_OTHER_BY_BODY_PART = {term: a.name for a in OTHER_ANATOMY for term in a.body_parts}
_OTHER_PATTERNS = tuple(
    (_keyword_pattern(word), a.name) for a in OTHER_ANATOMY for word in a.keywords
)


def match_other_anatomy(*, body_part: str | None, descriptions: Sequence[str | None]) -> str | None:
    """The name of non-musculoskeletal anatomy the header names ("chest"), or None.

    Asked only when :func:`resolve_region` found no region: BodyPartExamined first, then the
    descriptions in the order given, whole words as for regions ("thoracic spine" is the spine
    region, found before this is asked)."""
    if body_part and (name := _OTHER_BY_BODY_PART.get(normalize_body_part(body_part))):
        return name
    for text in descriptions:
        if not text:
            continue
        normalized = normalize_description(text)
        for pattern, name in _OTHER_PATTERNS:
            if pattern.search(normalized):
                return name
    return None


PAIRED_REGIONS = frozenset(
    (
        "ankle",
        "clavicle",
        "elbow",
        "femur",
        "foot",
        "forearm",
        "hand",
        "hip",
        "humerus",
        "knee",
        "ribs",
        "shoulder",
        "tibia_fibula",
        "wrist",
    )
)
"""Regions on both sides of the body (DICOM wants a Laterality for images of them)."""


GENERIC_LIMB_TERMS = ("EXTREMITY", "UPPEREXTREMITY", "LOWEREXTREMITY", "ARM")
"""Annex L terms for a limb that name no single region (the descriptions decide the region);
kept as they are in results' Body Part Examined, and paired."""


def is_paired_body_part(value: str) -> bool:
    """Whether a BodyPartExamined value names a paired structure (a hand or a limb, not the
    pelvis); False for values the tables do not know."""
    if normalize_body_part(value) in GENERIC_LIMB_TERMS:
        return True
    region = match_body_part(value)
    return region is not None and region.key in PAIRED_REGIONS


def canonical_body_part(value: str | None) -> str | None:
    """The first Annex L term of the region or other anatomy a BodyPartExamined value names
    (``"Hand "`` -> ``HAND``, ``THORAX`` -> ``CHEST``), or None for values the tables do not
    know: what a result object may write as its series' Body Part Examined."""
    if not value:
        return None
    if normalize_body_part(value) in GENERIC_LIMB_TERMS:
        return normalize_body_part(value)
    region = match_body_part(value)
    if region is not None:
        return region.body_parts[0]
    name = _OTHER_BY_BODY_PART.get(normalize_body_part(value))
    if name is None:
        return None
    return next(a.body_parts[0] for a in OTHER_ANATOMY if a.name == name)
