"""Dependencies whose internals the node relies on are the versions it was tested with."""

from __future__ import annotations

import tomllib

import pynetdicom
import pytest
from packaging.specifiers import SpecifierSet

from .conftest import REPO

#: The pynetdicom minor version the listener's overrides were written against: the socket
#: reader it replaces (``AssociationSocket.recv`` in dicomnode/limits.py), the threaded server it
#: subclasses to share a listening socket (dicomnode/receivers.py), and the chunked-receive
#: switch ``_config.STORE_RECV_CHUNKED_DATASET`` (dicomnode/scp.py).
TESTED_PYNETDICOM = "3.0"


def test_pynetdicom_is_the_minor_version_the_overrides_were_written_for() -> None:
    installed = pynetdicom.__version__
    if not installed.startswith(f"{TESTED_PYNETDICOM}."):
        pytest.fail(
            f"pynetdicom {installed} is installed, but the listener overrides private parts of "
            f"pynetdicom {TESTED_PYNETDICOM} (AssociationSocket.recv, ThreadedAssociationServer, "
            "_config.STORE_RECV_CHUNKED_DATASET): check them against the new version, run the "
            "fault suite, then update TESTED_PYNETDICOM and the pin in pyproject.toml"
        )
    metadata = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in metadata if d.startswith("pynetdicom")]
    assert installed in SpecifierSet(pin.removeprefix("pynetdicom"))


def test_torch_is_unpinned_in_the_metadata_and_pinned_where_installed() -> None:
    metadata = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [d for d in metadata if d.startswith("torch")]
    assert "==" not in torch  # a GPU site installs its own CUDA build of torch
    assert '"torch==2.13.0"' in (REPO / "run").read_text()  # the CPU wheel these machines carry
