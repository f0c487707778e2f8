"""The conformance statement stays true: its presentation-context tables are what the listener
accepts and the sender proposes."""

from __future__ import annotations

import re
from pathlib import Path

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import parse_config
from dicomnode.scp import CR_DX_SOP_CLASSES, build_ae
from dicomnode.scu import RESULT_SOP_CLASSES
from dicomnode.scu import TRANSFER_SYNTAXES as SENT_SYNTAXES

from .conftest import REPO

STATEMENT = REPO / "docs" / "conformance-statement.md"


def table(name: str) -> list[tuple[str, str]]:
    """The (name, UID) rows of the table marked ``<!-- table: name -->``, in order."""
    text = STATEMENT.read_text(encoding="utf-8")
    marker = f"<!-- table: {name} -->"
    assert marker in text, f"{STATEMENT.name} has no table {name}"
    rows = []
    for line in text.split(marker, 1)[1].strip().splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], cells[1]))
    assert rows, name
    return rows


def test_the_listener_accepts_what_the_statement_says(tmp_path: Path) -> None:
    ae = build_ae(parse_config({"node": {"state_dir": str(tmp_path)}}, tmp_path))
    contexts = {str(c.abstract_syntax): list(c.transfer_syntax) for c in ae.supported_contexts}
    syntaxes = [uid for _, uid in table("scp-transfer-syntaxes")]
    for name, uid in table("scp-analysed-sop-classes"):
        assert uid in CR_DX_SOP_CLASSES, name
        assert contexts[uid] == syntaxes, name  # the same syntaxes, in the same preference
    assert {uid for _, uid in table("scp-analysed-sop-classes")} == set(CR_DX_SOP_CLASSES)
    # every other storage SOP class is negotiated with them too (then discarded or refused)
    storage = {str(c.abstract_syntax) for c in AllStoragePresentationContexts}
    assert storage <= contexts.keys()
    assert all(contexts[uid] == syntaxes for uid in storage)
    verification = [uid for _, uid in table("scp-verification-transfer-syntaxes")]
    assert contexts[str(Verification)] == verification
    assert len(storage) == int(re.search(r"\((\d+) in pynetdicom", STATEMENT.read_text())[1])


def test_the_sender_proposes_what_the_statement_says() -> None:
    assert [uid for _, uid in table("scu-sop-classes")] == list(RESULT_SOP_CLASSES)
    assert [uid for _, uid in table("scu-transfer-syntaxes")] == list(SENT_SYNTAXES)


def test_the_statement_names_each_uid_by_its_dicom_name() -> None:
    from pydicom.uid import UID

    for name in ("scp-analysed-sop-classes", "scp-transfer-syntaxes", "scu-sop-classes",
                 "scu-transfer-syntaxes", "scp-verification-transfer-syntaxes"):
        for label, uid in table(name):
            assert UID(uid).name == label, (name, uid)
