"""Mutated DICOM files for the fuzzer (issue 13): case specs drawn from a seed, and applied.

A :class:`FileCase` is data (JSON-able): the base file, the UIDs the case gets and a list of
operations. :func:`draw_file_case` draws one from a ``random.Random`` (seeded with the run's seed
and the case's index, so every case is reproducible from ``(seed, index)``), :func:`build_file`
applies it. Regression cases (``fuzz_regressions.json``) are stored as specs, so they stay the
same when the generator changes.

Two kinds of operations:

- on the data set (pydicom, before encoding; values are written as raw bytes, so anything can be
  written): a bad value for a header attribute (wrong VR content, over-long, empty, non-ASCII in
  an ASCII VR, malformed DS/IS numbers, bad dates and UIDs, padding), absurd image attributes
  (Rows, Columns, Bits Allocated/Stored, High Bit, Pixel Representation, Photometric
  Interpretation, Rescale Slope...), wrong VOI LUT and Modality LUT sequences, pixel padding
  values, odd character sets with text in other encodings, deeply nested sequences, deleted
  attributes, an element re-declared with another VR, private elements;
- on the encoded bytes: flips in the header and in the pixel data (encapsulated fragments
  included), truncation, element lengths (odd, short, long, undefined), VR bytes, inserted and
  deleted bytes, duplicated and swapped elements, fragment item headers, and the File Meta's
  transfer syntax replaced by another one the node accepts (content and syntax disagree).
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID

from dicomnode.scp import TRANSFER_SYNTAXES
from tests.faults.fuzz_corpus import Base, parse

Op = dict[str, Any]


@dataclass(frozen=True)
class FileCase:
    """One mutated file: ``base`` with ``uids`` (study, series, SOP instance) and ``ops``."""

    name: str
    base: str
    uids: tuple[str, str, str]
    ops: tuple[Op, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "base": self.base, "uids": list(self.uids), "ops": list(self.ops)
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FileCase:
        return cls(raw["name"], raw["base"], tuple(raw["uids"]), tuple(raw["ops"]))

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(op["op"] for op in self.ops) or ("clean",)


# -- values ----------------------------------------------------------------------------------

TEXT_VRS = (
    "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UT"
)
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
              "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UI": 64, "UT": 4096}
BAD_NUMBERS = (b"abc", b"1,5", b"NaN", b"nan", b"inf", b"-inf", b"1e999", b"1e-999", b"1.2.3",
               b"0x1F", b"--1", b"+", b".", b"1e", b"123456789012345678901234", b" 1 2 ", b"-0",
               b"0", b"-1", b"1e30", b"1e-30", b"\\", b"1\\", b"\\\\\\", b"0.0000000000000001")
BAD_DATES = (b"20261340", b"2026-01-01", b"19000229", b"abcdefgh", b"2026", b"00000000",
             b"99999999", b"20260101120000", b"2026013", b"1\\2", b"-")
BAD_TIMES = (b"256199", b"12:00:00", b"1200.5.5", b"ab", b"240000", b"12", b"1.")
BAD_UIDS = (b"1.2.03", b"1..2", b"abc", b"1.2.", b"0", b"1.2." + b"9" * 70, b"1.2.3\x00\x00",
            b" 1.2", b"1.2.840.10008.5.1.4.1.1.1\x00junk", b"1.2\\1.3", b"-1.2", b"2.25.0")
NON_ASCII = ("Gonçalves^Zoë".encode(), "Müller^Jürgen".encode("latin-1"), "骨折".encode(),
             "Ωμέγα".encode("iso8859-7"), b"\x1b$B8?@^\x1b(B", b"\xff\xfe\x00A", b"\x1b",
             b"\x80\x81", "患者".encode("shift_jis"), "환자".encode("euc_kr"))
CONTROL = (b"\x00", b"A\x00B", b"\r\n", b"\t", b"A\x7fB", b"\x1b$B", b"  ")
CS_PHOTOMETRIC = (b"RGB", b"YBR_FULL", b"YBR_FULL_422", b"PALETTE COLOR", b"MONOCHROME3",
                  b"monochrome2", b"", b"MONOCHROME1\\MONOCHROME2", b" MONOCHROME2",
                  b"MONOCHROME2 ", b"MONOCHROME1", b"MONOCHROME2", b"YBR_ICT", b"ARGB")
CHARSETS = (b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 87", b"ISO 2022 IR 13\\ISO 2022 IR 87",
            b"GB18030", b"ISO_IR 999", b"", b"ISO_IR 6", b"\\ISO 2022 IR 149", b"ISO-8859-1",
            b"ISO_IR 100\\ISO_IR 192", b"UTF-8", b"ISO 2022 IR 6\\ISO 2022 IR 58", b"ISO_IR 13",
            b"\x00", b"ISO_IR 148", b"ISO 2022 IR 100\\ISO 2022 IR 126")

#: Header attributes mutated with bad values: keyword → VR.
ATTRIBUTES = {
    "PatientWeight": "DS", "PatientSize": "DS", "ImagerPixelSpacing": "DS", "PixelSpacing": "DS",
    "WindowCenter": "DS", "WindowWidth": "DS", "RescaleSlope": "DS", "RescaleIntercept": "DS",
    "LossyImageCompressionRatio": "DS", "PatientAge": "AS", "PatientBirthDate": "DA",
    "StudyDate": "DA", "SeriesDate": "DA", "ContentDate": "DA", "StudyTime": "TM",
    "ContentTime": "TM", "AcquisitionDateTime": "DT", "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI", "FrameOfReferenceUID": "UI", "SOPClassUID": "UI",
    "SOPInstanceUID": "UI", "PhotometricInterpretation": "CS", "Modality": "CS",
    "BodyPartExamined": "CS", "Laterality": "CS", "ImageLaterality": "CS", "PatientSex": "CS",
    "PatientOrientation": "CS", "ImageType": "CS", "PresentationLUTShape": "CS",
    "LossyImageCompression": "CS", "LossyImageCompressionMethod": "CS", "VOILUTFunction": "CS",
    "PresentationIntentType": "CS", "BurnedInAnnotation": "CS", "PixelIntensityRelationship": "CS",
    "ViewPosition": "CS", "RescaleType": "LO", "PatientName": "PN",
    "ReferringPhysicianName": "PN", "PatientID": "LO", "IssuerOfPatientID": "LO",
    "AccessionNumber": "SH", "StudyID": "SH", "StudyDescription": "LO",
    "SeriesDescription": "LO", "ProtocolName": "LO", "Manufacturer": "LO",
    "ManufacturerModelName": "LO", "StationName": "SH", "DeviceSerialNumber": "LO",
    "InstitutionName": "LO", "SoftwareVersions": "LO", "InstanceNumber": "IS",
    "SeriesNumber": "IS", "NumberOfFrames": "IS", "WindowCenterWidthExplanation": "LO",
    "DerivationDescription": "ST", "ImageComments": "LT", "PatientComments": "LT",
}
#: Image attributes (US) and the absurd values they get.
IMAGE_US = {
    "Rows": (0, 1, 2, 31, 32, 33, 64, 255, 256, 32768, 65535),
    "Columns": (0, 1, 2, 31, 32, 33, 64, 255, 256, 32768, 65535),
    "BitsAllocated": (0, 1, 7, 8, 12, 16, 24, 32, 64, 255, 65535),
    "BitsStored": (0, 1, 7, 8, 10, 12, 16, 17, 32, 33, 65535),
    "HighBit": (0, 7, 9, 11, 15, 16, 31, 255, 65535),
    "PixelRepresentation": (0, 1, 2, 255, 65535),
    "SamplesPerPixel": (0, 2, 3, 4, 65535),
    "PlanarConfiguration": (0, 1, 2, 65535),
    "SmallestImagePixelValue": (0, 65535, 32768),
    "LargestImagePixelValue": (0, 1, 65535),
}
DELETABLE = ("PatientID", "PatientName", "Modality", "PhotometricInterpretation", "Rows", "Columns",
             "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
             "PixelData", "SpecificCharacterSet", "StudyDate", "WindowWidth", "WindowCenter",
             "RescaleSlope", "RescaleIntercept", "BodyPartExamined", "ImageType", "StudyTime",
             "VOILUTSequence", "SeriesInstanceUID", "SOPClassUID", "PatientOrientation")
#: Sequences nested deeply (their own tag inside each item); some are copied into the results.
NESTABLE = {
    "OtherPatientIDsSequence": (0x00100020, "LO", b"OTHER"),
    "IssuerOfAccessionNumberSequence": (0x00400031, "UT", b"ISSUER"),
    "ReferencedImageSequence": (0x00081155, "UI", b"1.2.3.4"),
    "SourceImageSequence": (0x00081155, "UI", b"1.2.3.4"),
    "RequestAttributesSequence": (0x00400009, "SH", b"STEP"),
    "VOILUTSequence": (0x00283003, "LO", b"LUT"),
}
NEST_DEPTHS = (2, 8, 32, 64, 100, 150, 200, 240, 255, 300, 400, 1000)
TEXT_TARGETS = ("PatientName", "StudyDescription", "SeriesDescription", "BodyPartExamined",
                "InstitutionName", "PatientID", "AccessionNumber", "ProtocolName",
                "ReferringPhysicianName", "Manufacturer")
OTHER_VRS = ("UN", "OB", "SQ", "US", "DS", "LO", "UT", "OW", "FD", "AT", "ZZ", "xx", "\x00\x00")


def bad_text(rng: random.Random, vr: str) -> bytes:
    """A value that breaks (or stretches) text VR ``vr``: one of a few families."""
    family = rng.choice(("empty", "overlong", "non_ascii", "control", "number", "date", "time",
                         "uid", "multi", "binary", "valid_other"))
    if family == "empty":
        return rng.choice((b"", b" ", b"\x00"))
    if family == "overlong":
        unit = rng.choice((b"A", b"9", b"1.", b"^", b"\xc3\xa9"))
        return unit * (MAX_LENGTH.get(vr, 64) * rng.choice((1, 2, 4)) // len(unit) + 1)
    if family == "non_ascii":
        return rng.choice(NON_ASCII)
    if family == "control":
        return rng.choice(CONTROL)
    if family == "number":
        return rng.choice(BAD_NUMBERS)
    if family == "date":
        return rng.choice(BAD_DATES)
    if family == "time":
        return rng.choice(BAD_TIMES)
    if family == "uid":
        return rng.choice(BAD_UIDS)
    if family == "multi":
        return b"\\".join(rng.choice((b"1", b"", b"A", b"2.5")) for _ in range(rng.randint(2, 40)))
    if family == "binary":
        return rng.randbytes(rng.randint(1, 64))
    return rng.choice((b"HAND", b"CHEST", b"1", b"20260101", b"1.2.3", b"MONOCHROME2", b"R"))


def pack_us(values: list[int], little: bool) -> bytes:
    return struct.pack(f"{'<' if little else '>'}{len(values)}H", *(v & 0xFFFF for v in values))


def pack_ss(values: list[int], little: bool) -> bytes:
    wrapped = [((v + 0x8000) & 0xFFFF) - 0x8000 for v in values]
    return struct.pack(f"{'<' if little else '>'}{len(values)}h", *wrapped)


def hexed(value: bytes) -> str:
    return value.hex()


# -- drawing a case --------------------------------------------------------------------------


def draw_attribute(rng: random.Random) -> Op:
    keyword = rng.choice(sorted(ATTRIBUTES))
    vr = ATTRIBUTES[keyword]
    if rng.random() < 0.15:  # the same value declared with another VR
        vr = rng.choice(TEXT_VRS)
    return {"op": "set", "tag": int(Tag(keyword)), "vr": vr, "value": hexed(bad_text(rng, vr))}


def draw_image_attribute(rng: random.Random) -> Op:
    if rng.random() < 0.7:
        keyword = rng.choice(sorted(IMAGE_US))
        count = rng.choice((1, 1, 1, 0, 2))
        values = [rng.choice(IMAGE_US[keyword]) for _ in range(count)]
        odd = rng.random() < 0.1
        return {"op": "set_us", "tag": int(Tag(keyword)), "values": values, "odd": odd}
    keyword, choices = rng.choice((
        ("PhotometricInterpretation", CS_PHOTOMETRIC),
        ("RescaleSlope", (b"0", b"-1", b"1e30", b"NaN", b"1e-30", b"inf", b"abc", b"", b"-0")),
        ("RescaleIntercept", (b"1e30", b"-1e30", b"NaN", b"abc", b"", b"-inf", b"65536")),
        ("WindowWidth", (b"0", b"-1", b"1e-9", b"1e30", b"NaN", b"", b"1\\", b"0\\0")),
        ("WindowCenter", (b"1e30", b"NaN", b"abc", b"-1e30", b"1\\2\\3", b"")),
        ("NumberOfFrames", (b"0", b"2", b"-1", b"abc", b"1000000", b"", b"1.5")),
        ("VOILUTFunction", (b"SIGMOID", b"LINEAR_EXACT", b"FOO", b"")),
        ("PresentationLUTShape", (b"INVERSE", b"IDENTITY", b"FOO", b"")),
    ))
    vr = ATTRIBUTES.get(keyword, "CS")
    return {"op": "set", "tag": int(Tag(keyword)), "vr": vr, "value": hexed(rng.choice(choices))}


def draw_lut(rng: random.Random) -> Op:
    """A VOI or Modality LUT sequence that is wrong in one way."""
    entries = rng.choice((0, 1, 2, 16, 256, 4096, 65535))
    return {
        "op": "lut",
        "which": rng.choice(("voi", "voi", "modality")),
        "descriptor": [entries, rng.choice((0, 0, 100, 32767, 65535)),
                       rng.choice((8, 12, 16, 0, 1, 7, 17, 32, 40))][: rng.choice((3, 3, 3, 2, 4))],
        "descriptor_vr": rng.choice(("US", "US", "SS", "OB")),
        "data_count": rng.choice((entries, entries, max(0, entries - 1), entries + 7, 0, 3)),
        "data_vr": rng.choice(("US", "OW", "OW", "SS", "OB")),
        "odd": rng.random() < 0.1,
        "items": rng.choice((1, 1, 1, 0, 2)),
        "keep_window": rng.random() < 0.5,
        "missing": rng.choice(("", "", "", "LUTDescriptor", "LUTData")),
    }


def draw_padding(rng: random.Random) -> Op:
    return {
        "op": "padding",
        "vr": rng.choice(("US", "SS", "OB", "US")),
        "values": [rng.choice((0, 1, 255, 4095, 65535, -1, -32768, 32767))
                   for _ in range(rng.choice((1, 1, 2, 0)))],
        "limit": rng.choice((None, None, 0, 65535, -2048, 100)),
    }


def draw_charset(rng: random.Random) -> Op:
    targets = rng.sample(TEXT_TARGETS, rng.randint(1, 3))
    return {
        "op": "charset",
        "charset": hexed(rng.choice(CHARSETS)),
        "texts": {str(int(Tag(t))): hexed(rng.choice(NON_ASCII)) for t in targets},
    }


def draw_nest(rng: random.Random) -> Op:
    return {
        "op": "nest",
        "keyword": rng.choice(sorted(NESTABLE)),
        "depth": rng.choice(NEST_DEPTHS),
        "undefined": rng.random() < 0.5,
    }


def draw_dataset_op(rng: random.Random) -> Op:
    draw: Callable[[random.Random], Op] = rng.choices(
        (draw_attribute, draw_image_attribute, draw_lut, draw_padding, draw_charset, draw_nest,
         lambda r: {"op": "delete", "tag": int(Tag(r.choice(DELETABLE)))},
         lambda r: {"op": "revr", "nth": r.randrange(1 << 16), "vr": r.choice(OTHER_VRS)},
         lambda r: {"op": "private", "garbage": hexed(r.randbytes(r.randint(0, 40))),
                    "creator": r.random() < 0.7, "sq": r.random() < 0.4}),
        weights=(40, 16, 8, 5, 8, 5, 7, 6, 3),
    )[0]
    return draw(rng)


def draw_byte_op(rng: random.Random) -> Op:
    kind = rng.choices(
        ("flip_header", "flip_pixels", "truncate", "length", "vr_bytes", "insert", "delete_bytes",
         "duplicate", "swap", "fragment", "syntax"),
        weights=(18, 18, 10, 12, 5, 5, 5, 4, 4, 9, 10),
    )[0]
    if kind in ("flip_header", "flip_pixels"):
        count = rng.choice((1, 1, 2, 4, 16))
        return {"op": kind, "at": [rng.random() for _ in range(count)],
                "xor": [rng.randint(1, 255) for _ in range(count)]}
    if kind == "truncate":
        return {"op": kind, "at": rng.random()}
    if kind == "length":
        return {"op": kind, "nth": rng.randrange(1 << 16),
                "value": rng.choice(("zero", "one", "odd", "plus2", "minus2", "max16", "undefined",
                                     "huge", "random"))
                , "random": rng.randrange(1 << 32)}
    if kind == "vr_bytes":
        return {"op": kind, "nth": rng.randrange(1 << 16), "vr": rng.choice(OTHER_VRS)}
    if kind == "insert":
        return {"op": kind, "at": rng.random(), "bytes": hexed(rng.randbytes(rng.randint(1, 64)))}
    if kind == "delete_bytes":
        return {"op": kind, "at": rng.random(), "count": rng.randint(1, 64)}
    if kind in ("duplicate", "swap"):
        return {"op": kind, "nth": rng.randrange(1 << 16)}
    if kind == "fragment":
        return {"op": kind, "nth": rng.randrange(1 << 16),
                "field": rng.choice(("length", "length", "tag", "drop_delimiter", "offsets")),
                "random": rng.randrange(1 << 32)}
    return {"op": "syntax", "uid": str(rng.choice(TRANSFER_SYNTAXES))}


def draw_file_case(
    rng: random.Random, name: str, bases: dict[str, Base], uids: tuple[str, str, str]
) -> FileCase:
    """One case: a base drawn by weight, 0-3 data set operations and 0-2 byte operations
    (about 5 % of cases are left clean, as controls)."""
    names = sorted(bases)
    base = rng.choices(names, weights=[bases[n].weight for n in names])[0]
    if rng.random() < 0.05:
        return FileCase(name, base, uids)
    ops = [draw_dataset_op(rng) for _ in range(rng.choices((0, 1, 2, 3), (15, 55, 20, 10))[0])]
    ops += [draw_byte_op(rng) for _ in range(rng.choices((0, 1, 2), (55, 35, 10))[0])]
    if not ops:
        ops.append(draw_dataset_op(rng))
    return FileCase(name, base, uids, tuple(ops))


# -- applying a case ---------------------------------------------------------------------------


def raw_element(tag: int, vr: str | None, value: bytes, ds: Dataset) -> RawDataElement:
    implicit, little = ds.original_encoding
    return RawDataElement(Tag(tag), vr, len(value), value, 0, bool(implicit), little is not False)


def little_endian(ds: Dataset) -> bool:
    return ds.original_encoding[1] is not False


def element_vr(ds: Dataset, tag: int) -> str:
    """The VR of element ``tag`` as the dictionary gives it (first choice of ambiguous ones)."""
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(Tag(tag)).split(" or ")[0]
    except KeyError:
        return "UN"


def set_uids(ds: Dataset, uids: tuple[str, str, str]) -> None:
    study, series, sop = uids
    for keyword, value in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                           ("SOPInstanceUID", sop)):
        encoded = value.encode() + b"\x00" * (len(value) % 2)
        ds[Tag(keyword)] = raw_element(int(Tag(keyword)), "UI", encoded, ds)
    ds.file_meta.MediaStorageSOPInstanceUID = sop


def op_set(ds: Dataset, op: Op) -> None:
    ds[Tag(op["tag"])] = raw_element(op["tag"], op["vr"], bytes.fromhex(op["value"]), ds)


def op_set_us(ds: Dataset, op: Op) -> None:
    value = pack_us(op["values"], little_endian(ds))
    if op.get("odd"):
        value += b"\x01"
    ds[Tag(op["tag"])] = raw_element(op["tag"], "US", value, ds)


def op_delete(ds: Dataset, op: Op) -> None:
    if Tag(op["tag"]) in ds:
        del ds[Tag(op["tag"])]


def lut_item(ds: Dataset, op: Op, which: str) -> bytes:
    """One item of a LUT sequence, encoded (descriptor, data and explanation or type)."""
    little = little_endian(ds)
    descriptor = op["descriptor"]
    packed = pack_ss(descriptor, little) if op["descriptor_vr"] == "SS" else pack_us(
        descriptor, little)
    data = pack_us(list(range(op["data_count"])), little)
    if op.get("odd"):
        data += b"\x00"
    elements = {0x00283002: (op["descriptor_vr"], packed), 0x00283006: (op["data_vr"], data)}
    if which == "modality":
        elements[0x00283004] = ("LO", b"HU")
    else:
        elements[0x00283003] = ("LO", b"FUZZ")
    coder = coder_of(ds)
    return b"".join(
        coder.header(tag, vr if len(value) <= 0xFFFF else "OW", len(value)) + value
        for tag, (vr, value) in sorted(elements.items())
        if not (op.get("missing") and Tag(tag) == Tag(op["missing"]))
    )


def op_lut(ds: Dataset, op: Op) -> None:
    which = op["which"]
    keyword = "VOILUTSequence" if which == "voi" else "ModalityLUTSequence"
    items = [lut_item(ds, op, which) for _ in range(op["items"])]
    set_sequence(ds, int(Tag(keyword)), items, undefined=op.get("odd", False))
    drop = ("RescaleSlope", "RescaleIntercept", "RescaleType") if which == "modality" else (
        () if op.get("keep_window") else ("WindowCenter", "WindowWidth"))
    for keyword in drop:
        if keyword in ds:
            del ds[keyword]


def coder_of(ds: Dataset) -> ElementCoder:
    implicit, little = ds.original_encoding
    return ElementCoder(bool(implicit), little is not False)


def set_sequence(ds: Dataset, tag: int, items: list[bytes], undefined: bool) -> None:
    """Element ``tag`` becomes a sequence of the encoded ``items`` (raw bytes)."""
    coder = coder_of(ds)
    encoded = coder.sequence(tag, items, undefined)
    value = encoded[len(coder.header(tag, "SQ", 0)) :]
    length = 0xFFFFFFFF if undefined else len(value)
    ds[Tag(tag)] = RawDataElement(Tag(tag), "SQ", length, value, 0, coder.implicit, coder.little)


def op_padding(ds: Dataset, op: Op) -> None:
    little = little_endian(ds)
    packer = pack_ss if op["vr"] == "SS" else pack_us
    ds[Tag("PixelPaddingValue")] = raw_element(
        0x00280120, op["vr"], packer(op["values"], little), ds)
    if op["limit"] is not None:
        ds[Tag("PixelPaddingRangeLimit")] = raw_element(
            0x00280121, op["vr"], packer([op["limit"]], little), ds)


def op_charset(ds: Dataset, op: Op) -> None:
    charset = bytes.fromhex(op["charset"])
    ds[Tag(0x00080005)] = raw_element(0x00080005, "CS", charset + b" " * (len(charset) % 2), ds)
    for tag, value in op["texts"].items():
        tag = int(tag)
        ds[Tag(tag)] = raw_element(tag, element_vr(ds, tag), bytes.fromhex(value), ds)


def op_nest(ds: Dataset, op: Op) -> None:
    """A sequence nested ``depth`` levels deep (each item holds a leaf element and the next
    level), written as bytes: pydicom's writer cannot write more than about 250 levels."""
    keyword = op["keyword"]
    leaf_tag, leaf_vr, leaf_value = NESTABLE[keyword]
    coder = coder_of(ds)
    tag = int(Tag(keyword))
    item = coder.element(leaf_tag, leaf_vr, leaf_value)
    for _ in range(op["depth"] - 1):
        item = coder.element(leaf_tag, leaf_vr, leaf_value) + coder.sequence(
            tag, [item], op["undefined"])
    set_sequence(ds, tag, [item], op["undefined"])


def op_revr(ds: Dataset, op: Op) -> None:
    """An existing top-level element re-declared with another VR (its value bytes kept)."""
    if ds.original_encoding[0]:
        return  # implicit VR: nothing declares a VR
    tags = [t for t in list(ds.keys()) if t != Tag("PixelData") or op["nth"] % 5 == 0]
    tag = tags[op["nth"] % len(tags)]
    elem = ds.get_item(tag)
    if not isinstance(elem, RawDataElement) or elem.value is None:
        return
    value = elem.value
    if op["vr"] not in ("OB", "OW", "SQ", "UN", "UT") and len(value) > 0xFFFF:
        return
    length = 0xFFFFFFFF if elem.length == 0xFFFFFFFF else len(value)
    ds[tag] = RawDataElement(tag, op["vr"], length, value, 0, False, little_endian(ds))


def op_private(ds: Dataset, op: Op) -> None:
    garbage = bytes.fromhex(op["garbage"])
    if op["creator"]:
        ds[Tag(0x00090010)] = raw_element(0x00090010, "LO", b"FUZZ CREATOR", ds)
    if op["sq"]:
        item = coder_of(ds).element(0x00091012, "UN", garbage)
        set_sequence(ds, 0x00091011, [item], undefined=True)
    else:
        padded = garbage + b"\x00" * (len(garbage) % 2)
        ds[Tag(0x00091011)] = raw_element(0x00091011, "UN", padded, ds)


DATASET_OPS: dict[str, Callable[[Dataset, Op], None]] = {
    "set": op_set, "set_us": op_set_us, "delete": op_delete, "lut": op_lut,
    "padding": op_padding, "charset": op_charset, "nest": op_nest, "revr": op_revr,
    "private": op_private,
}


@dataclass(frozen=True)
class ElementCoder:
    """Encodes elements and sequences as bytes in one of the four uncompressed encodings."""

    implicit: bool
    little: bool

    @property
    def _e(self) -> str:
        return "<" if self.little else ">"

    def header(self, tag: int, vr: str, length: int) -> bytes:
        group, elem = tag >> 16, tag & 0xFFFF
        e = self._e
        if self.implicit:
            return struct.pack(f"{e}HHI", group, elem, length)
        if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"):
            return struct.pack(f"{e}HH2sHI", group, elem, vr.encode(), 0, length)
        return struct.pack(f"{e}HH2sH", group, elem, vr.encode(), length)

    def delimiter(self) -> bytes:
        return struct.pack(f"{self._e}HHI", 0xFFFE, 0xE0DD, 0)

    def element(self, tag: int, vr: str, value: bytes) -> bytes:
        value += b"\x00" * (len(value) % 2)
        return self.header(tag, vr, len(value)) + value

    def sequence(self, tag: int, items: list[bytes], undefined: bool) -> bytes:
        e = self._e
        body = b""
        for item in items:
            if undefined:
                body += struct.pack(f"{e}HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
                body += struct.pack(f"{e}HHI", 0xFFFE, 0xE00D, 0)
            else:
                body += struct.pack(f"{e}HHI", 0xFFFE, 0xE000, len(item)) + item
        if undefined:
            return self.header(tag, "SQ", 0xFFFFFFFF) + body + struct.pack(
                f"{e}HHI", 0xFFFE, 0xE0DD, 0)
        return self.header(tag, "SQ", len(body)) + body


# -- byte layout and byte operations -----------------------------------------------------------

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV",
            b"UV"}


@dataclass(frozen=True)
class Element:
    """Where one top-level element sits in the file: its tag, the offsets of its header, VR
    (None: implicit), length field (and its size) and value, and its value length."""

    tag: int
    start: int
    vr_at: int | None
    length_at: int
    length_size: int
    value_at: int
    length: int

    @property
    def end(self) -> int:
        return self.value_at + (0 if self.length == 0xFFFFFFFF else self.length)


@dataclass(frozen=True)
class Layout:
    """The file's regions: data set start, top-level elements and the pixel data value."""

    start: int
    little: bool
    implicit: bool
    elements: tuple[Element, ...]
    pixel: tuple[int, int] | None


def layout(data: bytes, start: int, syntax: UID) -> Layout | None:
    """Walk the top-level elements of an uncompressed-header file (None for Deflated)."""
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return None
    little, implicit = syntax != pydicom.uid.ExplicitVRBigEndian, syntax.is_implicit_VR
    e = "<" if little else ">"
    elements = []
    pos = start
    try:
        while pos + 8 <= len(data):
            group, elem = struct.unpack_from(f"{e}HH", data, pos)
            tag = (group << 16) | elem
            if implicit:
                vr_at, length_at, size = None, pos + 4, 4
            else:
                vr_at = pos + 4
                long = data[pos + 4 : pos + 6] in LONG_VRS
                length_at, size = (pos + 8, 4) if long else (pos + 6, 2)
            length = struct.unpack_from(f"{e}{'I' if size == 4 else 'H'}", data, length_at)[0]
            value_at = length_at + size
            element = Element(tag, pos, vr_at, length_at, size, value_at, length)
            elements.append(element)
            pos = skip_undefined(data, value_at, e) if length == 0xFFFFFFFF else element.end
    except (struct.error, ValueError):
        pass
    pixel = next(((el.value_at, min(len(data), el.end if el.length != 0xFFFFFFFF else len(data)))
                  for el in elements if el.tag == 0x7FE00010), None)
    return Layout(start, little, implicit, tuple(elements), pixel)


def skip_undefined(data: bytes, pos: int, e: str) -> int:
    """Position after an undefined-length value (items up to the sequence delimiter)."""
    depth = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from(f"{e}HHI", data, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            if depth == 0:
                return pos
            depth -= 1
        elif (group, elem) == (0xFFFE, 0xE000) and length != 0xFFFFFFFF:
            pos += length
        elif (group, elem) == (0xFFFE, 0xE000):
            depth += 0  # an undefined-length item: its elements follow
        elif (group, elem) == (0xFFFE, 0xE00D):
            pass
        else:  # an element inside an undefined-length item: skip its value (explicit VR guess)
            pos -= 8
            vr = data[pos + 4 : pos + 6]
            if vr in LONG_VRS:
                length = struct.unpack_from(f"{e}I", data, pos + 8)[0]
                pos += 12
                if length == 0xFFFFFFFF:
                    depth += 1
                    continue
            elif vr.isalpha():
                length = struct.unpack_from(f"{e}H", data, pos + 6)[0]
                pos += 8
            else:
                length = struct.unpack_from(f"{e}I", data, pos + 4)[0]
                pos += 8
                if length == 0xFFFFFFFF:
                    depth += 1
                    continue
            pos += length
    raise ValueError("no sequence delimiter")


def nth_element(lay: Layout, nth: int, skip_pixels: bool = False) -> Element | None:
    elements = [el for el in lay.elements if not (skip_pixels and el.tag == 0x7FE00010)]
    return elements[nth % len(elements)] if elements else None


def region(data: bytearray, lay: Layout | None, pixels: bool) -> tuple[int, int]:
    if lay is None:
        return (0, len(data))
    if pixels and lay.pixel is not None:
        return lay.pixel
    end = lay.pixel[0] if lay.pixel is not None else len(data)
    return (lay.start, max(lay.start + 1, end))


def b_flip(data: bytearray, lay: Layout | None, op: Op) -> None:
    low, high = region(data, lay, op["op"] == "flip_pixels")
    if lay is None:
        low = max(low, dataset_start(bytes(data)))
    for at, xor in zip(op["at"], op["xor"], strict=True):
        pos = low + int(at * (high - low))
        if pos < len(data):
            data[pos] ^= xor


def b_truncate(data: bytearray, lay: Layout | None, op: Op) -> None:
    start = lay.start if lay else dataset_start(bytes(data))
    del data[start + int(op["at"] * (len(data) - start)) :]


def b_length(data: bytearray, lay: Layout | None, op: Op) -> None:
    element = nth_element(lay, op["nth"]) if lay else None
    if element is None or lay is None:
        return
    full = 0xFFFFFFFF if element.length_size == 4 else 0xFFFF
    value = {
        "zero": 0, "one": 1, "odd": element.length | 1, "plus2": element.length + 2,
        "minus2": max(0, element.length - 2), "max16": 0xFFFF, "undefined": 0xFFFFFFFF,
        "huge": 0x7FFFFFFF, "random": op["random"],
    }[op["value"]] & full
    fmt = ("<" if lay.little else ">") + ("I" if element.length_size == 4 else "H")
    struct.pack_into(fmt, data, element.length_at, value)


def b_vr(data: bytearray, lay: Layout | None, op: Op) -> None:
    element = nth_element(lay, op["nth"]) if lay else None
    if element is None or element.vr_at is None:
        return
    data[element.vr_at : element.vr_at + 2] = op["vr"].encode("latin-1")[:2].ljust(2, b"\x00")


def b_insert(data: bytearray, lay: Layout | None, op: Op) -> None:
    start = lay.start if lay else dataset_start(bytes(data))
    pos = start + int(op["at"] * (len(data) - start))
    data[pos:pos] = bytes.fromhex(op["bytes"])


def b_delete(data: bytearray, lay: Layout | None, op: Op) -> None:
    start = lay.start if lay else dataset_start(bytes(data))
    pos = start + int(op["at"] * (len(data) - start))
    del data[pos : pos + op["count"]]


def b_duplicate(data: bytearray, lay: Layout | None, op: Op) -> None:
    element = nth_element(lay, op["nth"], skip_pixels=True) if lay else None
    if element is None or element.length == 0xFFFFFFFF:
        return
    data[element.end : element.end] = data[element.start : element.end]


def b_swap(data: bytearray, lay: Layout | None, op: Op) -> None:
    if lay is None or len(lay.elements) < 2:
        return
    index = op["nth"] % (len(lay.elements) - 1)
    first, second = lay.elements[index], lay.elements[index + 1]
    if 0xFFFFFFFF in (first.length, second.length):
        return
    data[first.start : second.end] = (
        data[second.start : second.end] + data[first.start : first.end])


def b_fragment(data: bytearray, lay: Layout | None, op: Op) -> None:
    """Damage the item headers of encapsulated pixel data (offset table, fragments, delimiter)."""
    if lay is None or lay.pixel is None:
        return
    e = "<" if lay.little else ">"
    items = list(fragment_items(bytes(data), lay.pixel[0], e))
    if not items:
        return
    if op["field"] == "drop_delimiter":
        last = items[-1]
        if struct.unpack_from(f"{e}HH", data, last)[::-1] == (0xE0DD, 0xFFFE):
            del data[last : last + 8]
        return
    pos = items[op["nth"] % len(items)]
    if pos + 8 > len(data):
        return
    if op["field"] == "tag":
        struct.pack_into(f"{e}I", data, pos, op["random"])
    elif op["field"] == "length":
        length = struct.unpack_from(f"{e}I", data, pos + 4)[0]
        choice = op["random"] % 6
        new = (0, 1, length + 1, max(0, length - 1), 0xFFFFFFFF, op["random"])[choice]
        struct.pack_into(f"{e}I", data, pos + 4, new)
    else:  # offsets: the basic offset table's entries replaced by garbage
        first = items[0]
        length = struct.unpack_from(f"{e}I", data, first + 4)[0]
        rng = random.Random(op["random"])
        for at in range(first + 8, min(first + 8 + length, len(data) - 4), 4):
            struct.pack_into(f"{e}I", data, at, rng.randrange(1 << 32))


def fragment_items(data: bytes, pos: int, e: str) -> Iterator[int]:
    """Offsets of the item headers of encapsulated pixel data starting at ``pos``."""
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from(f"{e}HHI", data, pos)
        if group != 0xFFFE:
            return
        yield pos
        if elem == 0xE0DD or length == 0xFFFFFFFF:
            return
        pos += 8 + length


def b_syntax(data: bytearray, lay: Layout | None, op: Op) -> None:
    """The File Meta rewritten to name another transfer syntax; the data set bytes kept."""
    start = dataset_start(bytes(data))
    meta = pydicom.dcmread(io.BytesIO(bytes(data[:start])), force=True).file_meta
    meta.TransferSyntaxUID = UID(op["uid"])
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    data[:start] = buffer.getvalue()


BYTE_OPS: dict[str, Callable[[bytearray, Layout | None, Op], None]] = {
    "flip_header": b_flip, "flip_pixels": b_flip, "truncate": b_truncate, "length": b_length,
    "vr_bytes": b_vr, "insert": b_insert, "delete_bytes": b_delete, "duplicate": b_duplicate,
    "swap": b_swap, "fragment": b_fragment, "syntax": b_syntax,
}


def dataset_start(data: bytes) -> int:
    """Where the data set starts after the preamble and File Meta of ``data``."""
    length = struct.unpack_from("<I", data, 132 + 8)[0]  # (0002,0000) UL, explicit VR LE
    return 132 + 12 + length


def build_file(case: FileCase, bases: dict[str, Base]) -> bytes:
    """The bytes of ``case``: the base re-read (its elements stay raw), the UIDs and data set
    operations applied, encoded, then the byte operations applied."""
    base = bases[case.base]
    ds = parse(base.data)
    set_uids(ds, case.uids)
    byte_ops = []
    for op in case.ops:
        if op["op"] in DATASET_OPS:
            DATASET_OPS[op["op"]](ds, op)
        else:
            byte_ops.append(op)
    data = bytearray(encode_raw(ds))
    for op in byte_ops:
        start = dataset_start(bytes(data))
        syntax = pydicom.dcmread(io.BytesIO(bytes(data[:start])), force=True).file_meta
        lay = layout(bytes(data), start, UID(syntax.TransferSyntaxUID))
        BYTE_OPS[op["op"]](data, lay, op)
    return bytes(data)


def encode_raw(ds: Dataset) -> bytes:
    """``ds`` as a file without pydicom's writer: the File Meta by pydicom, then every element
    as its raw bytes in the data set's own encoding (pydicom would parse and convert some
    elements, and cannot write what the operations make: deep nesting, wrong VRs, odd lengths).
    Deflated data sets are deflated again."""
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
    coder = coder_of(ds)
    body = bytearray()
    for tag in sorted(ds.keys()):
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement):  # parsed by pydicom while reading the base
            body += converted_bytes(elem, coder)
            continue
        value = elem.value or b""
        length = 0xFFFFFFFF if elem.length == 0xFFFFFFFF else len(value)
        if length == 0xFFFFFFFF and elem.value_tell:  # pydicom keeps no sequence delimiter
            value += coder.delimiter()
        vr = elem.VR or "UN"
        if not coder.implicit and vr not in LONG_VR_NAMES and length > 0xFFFF:
            vr = "UN"
        body += coder.header(int(tag), vr, length) + value
    if UID(ds.file_meta.TransferSyntaxUID) == pydicom.uid.DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = bytearray(packer.compress(bytes(body)) + packer.flush())
    return bytes(buffer.getvalue()) + bytes(body)


LONG_VR_NAMES = {vr.decode() for vr in LONG_VRS}


def converted_bytes(elem: DataElement, coder: ElementCoder) -> bytes:
    """An element pydicom parsed while reading a base (character set, sequences), written by
    pydicom in the data set's encoding."""
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = coder.little, coder.implicit
    write_data_element(buffer, elem)
    return bytes(buffer.getvalue())
