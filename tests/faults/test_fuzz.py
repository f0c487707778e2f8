"""The fuzz harness in CI (issue 13): a seed-fixed short run of :mod:`tests.faults.fuzz`.

The stored regression cases (``fuzz_regressions.json``, one per defect the harness found and
that was fixed) run first, then ``CASES`` cases drawn from ``SEED``: mutated files through a
real listener (``python -m dicomnode listen``), the worker and the SR, SC and GSPS writers, and
mutated PDU exchanges over raw sockets. The counts go to ``results/fuzz.json``; the release run
(10,000 cases and more) is ``python -m tests.faults.fuzz --cases 10000`` (docs/fuzzing.md).

The oracle's own checks are tested too (a hung or silent PDU exchange, a status outside the
documented set and a study without an answer are defects), so that the run cannot pass by
not looking.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pynetdicom import _config

from tests.faults.conftest import record_counts
from tests.faults.fuzz import (
    FILE_STATUSES,
    REGRESSIONS,
    FuzzRun,
    Tally,
    draw_case,
    pdu_defect,
    regression_cases,
)
from tests.faults.fuzz_corpus import Base, build_bases
from tests.faults.fuzz_files import FileCase, build_file
from tests.faults.fuzz_pdus import PduCase, Reply, request_bytes, then_bytes

pytestmark = [pytest.mark.dicom_peers, pytest.mark.slow]

SEED = 20261205
#: About 100 s of cases on a 2-core machine (with the regression cases, the bases, the listener
#: and the worker: under three minutes).
CASES = 500
#: dciodvfy checks every result object of every VALIDATE_EVERY-th study (every study: the
#: release runs with every 20th missed errors in the studies they skipped).
VALIDATE_EVERY = 1


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Base]:
    return build_bases(tmp_path_factory.mktemp("fuzz-bases"))


@pytest.fixture
def chunked_send() -> Iterator[None]:
    """pynetdicom sends each file's data set bytes as they are (the harness's own setting)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


@pytest.mark.timeout(600)
def test_seed_fixed_fuzz_run_has_no_crash_and_every_study_an_answer(
    tmp_path: Path, chunked_send: None
) -> None:
    """The issue's invariants over the stored cases and ``CASES`` drawn ones: the listener
    never dies or errs, every file gets a documented status and every PDU exchange ends
    cleanly, the worker never raises or meets an unexpected decoding error, every accepted
    instance is answered (in the study's SR and a Secondary Capture naming it), and dciodvfy
    finds no error in the results."""
    stored = regression_cases()
    fuzz = FuzzRun(SEED, CASES, tmp_path, validate_every=VALIDATE_EVERY)
    summary = fuzz.run()
    counts = record_counts("fuzz", {k: v for k, v in summary.items() if k != "operations"})
    defects = [f"{d['kind']} {d['cases'][:3]}: {d['detail'][-300:]}" for d in fuzz.tally.defects]
    assert counts["cases_tried"] == CASES + len(stored)
    assert counts["listener_crashes"] == 0, defects
    assert counts["bad_answers"] == 0, defects
    assert counts["worker_crashes"] == 0, defects
    assert counts["studies_without_answer"] == 0, defects
    assert counts["dciodvfy_errors"] == 0, defects
    assert counts["defects"] == 0, defects
    # plausible counts: both kinds of case ran, files were stored and refused, images were
    # analysed and others answered "not analysed", and results were validated
    assert counts["file_cases"] > CASES // 2 and counts["pdu_cases"] > CASES // 10
    assert counts["liveness_checks"] == -(-(CASES + len(stored)) // fuzz.batch)
    assert counts["liveness_failures"] == 0
    assert counts["answers"].get("0x0000", 0) > CASES // 4
    assert sum(n for s, n in counts["answers"].items() if s in FILE_STATUSES - {"0x0000"}) > 0
    assert counts["instances_analysed"] > 0
    assert sum(counts["instances_not_analysed"].values()) > 0
    answered = counts["instances_analysed"] + sum(counts["instances_not_analysed"].values())
    assert counts["instances_answered"] == answered
    assert counts["studies"] > 0 and counts["objects_validated"] > 0


def test_regression_cases_are_stored_valid_and_run_first(bases: dict[str, Base]) -> None:
    """Every stored case parses, names its defect, builds (file bytes or request bytes), and
    the run yields them before the drawn cases."""
    raw = REGRESSIONS.read_text()
    stored = regression_cases()
    assert stored, f"no cases in {REGRESSIONS}"
    assert len({c.name for c in stored}) == len(stored)
    for case in stored:
        if isinstance(case, FileCase):
            assert case.base in bases, case.name
            assert build_file(case, bases)[128:132] == b"DICM"
        else:
            assert request_bytes(case)
            assert all(then_bytes(op) for op in case.then)
    assert raw.count('"defect"') == len(stored)
    fuzz = FuzzRun(SEED, 3, Path("unused"))
    first = [c.name for c in fuzz.all_cases(bases)]
    assert first == [c.name for c in stored] + [f"{SEED}:{i}" for i in range(3)]


def test_a_case_is_the_same_from_its_seed_and_index(bases: dict[str, Base]) -> None:
    """Replay depends on it: ``(seed, index)`` always gives the same spec and the same bytes."""
    for index in random.Random(SEED).sample(range(100_000), 40):
        one, two = draw_case(SEED, index, bases, 0.3), draw_case(SEED, index, bases, 0.3)
        assert one.to_json() == two.to_json()
        if isinstance(one, FileCase) and isinstance(two, FileCase):
            assert build_file(one, bases) == build_file(two, bases)
        elif isinstance(one, PduCase) and isinstance(two, PduCase):
            assert request_bytes(one) == request_bytes(two)


def test_the_oracle_flags_what_it_must() -> None:
    """A node that never closes, closes without a word on a request, or answers a file with a
    status outside the documented set is a defect; an A-ABORT or a close on its timeout is
    not."""
    plain = PduCase("t:1")
    assert pdu_defect(plain, Reply(["AC"], "hung", seconds=10.0)) == "pdu_hung"
    assert pdu_defect(plain, Reply([], "closed", seconds=0.01)) == "pdu_no_answer"
    assert pdu_defect(plain, Reply(["ABORT(2,6)"], "closed", seconds=0.01)) is None
    assert pdu_defect(plain, Reply([], "closed", seconds=2.0)) is None
    assert "0xC001" not in FILE_STATUSES and "no_status" not in FILE_STATUSES
    tally = Tally(seed=1)
    tally.defect("no_answer", ["1:5", "1:6"], "1 instances without a capture, 1 SRs")
    tally.defect("worker_exception", ["1:7"], "Traceback")
    tally.defect("pdu_hung", ["1:8"], "hung")
    summary = tally.summary({})
    assert summary["studies_without_answer"] == 1
    assert summary["worker_crashes"] == 1
    assert summary["bad_answers"] == 1
    assert summary["defects"] == 3
    # an instance answered 0x0000 that no job ever answered is a study without an answer
    fuzz = FuzzRun(1, 0, Path("unused"))
    fuzz.accepted = {"1.2.3": ("1.2", "1:5"), "1.2.4": ("1.2", "1:6"), "1.3.1": ("1.3", "1:9")}
    fuzz.unanswered(SimpleNamespace(answered={"1.2.3", "1.3.1"}))  # type: ignore[arg-type]
    assert fuzz.tally.summary({})["studies_without_answer"] == 1
    assert fuzz.tally.defects[0]["cases"] == ["1:6"]
