"""The layout shows the architecture: `inference` is pure compute, it never reaches DICOM."""

from __future__ import annotations

import ast

from .conftest import REPO

FORBIDDEN = ("pydicom", "pynetdicom", "highdicom", "dicomnode")


def imported_modules(source: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_inference_never_imports_dicom_libraries() -> None:
    files = sorted((REPO / "inference").rglob("*.py"))
    assert len(files) > 20
    offenders = {
        str(path.relative_to(REPO)): sorted(
            m for m in imported_modules(path.read_text()) if m.split(".")[0] in FORBIDDEN
        )
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_check_sees_imports() -> None:
    source = "import pydicom\nfrom pynetdicom import AE\nfrom .x import y\nimport numpy as np\n"
    assert imported_modules(source) == {"pydicom", "pynetdicom", "numpy"}


def test_production_code_never_imports_the_demo() -> None:
    """The demo's PACS launchers and ``dx_from_image`` are test and demo helpers: no role of the
    service (listener, worker, sender, CLI) may need them to start."""
    files = [p for p in sorted((REPO / "dicomnode").rglob("*.py")) if p.name != "demo.py"]
    offenders = [
        str(path.relative_to(REPO))
        for path in files
        if "dicomnode.demo" in imported_modules(path.read_text())
    ]
    assert offenders == []
