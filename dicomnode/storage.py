"""Durable, bit-preserving storage of received instances in the state directory.

Layout under ``node.state_dir``::

    state.sqlite                      the state database (see ``dicomnode.state``)
    instances/<StudyUID>/<SOPUID>.dcm every accepted instance, exactly as received
    results/                          the worker's result objects
    tmp/                              the listener's partial writes; emptied when it starts

An instance is written to ``tmp/``, fsynced, renamed into place and the folder fsynced, and only
then recorded in the database, so a row always points at a complete file. A crash before the row
commits leaves at most a file without a row, which the peer's re-send (it never got a success)
overwrites.
"""

from __future__ import annotations

import errno
import fcntl
import filecmp
import hashlib
import io
import mmap
import os
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicomnode.records import InstanceHeader, StoredInstance
from dicomnode.state import StateDB

COPY_CHUNK = 1024 * 1024
_UID_CHARS = re.compile(r"[0-9]+(\.[0-9]+)*")


def check_uid(value: str, name: str) -> str:
    """Return ``value`` if it is usable as a UID and as a file name, else raise ValueError.

    Deliberately lenient about DICOM's finer rules (leading zeros in components occur in real
    devices' UIDs and must not cost an image) but strict about what could escape the folder:
    only digits and single dots, 1-64 characters.
    """
    if not 0 < len(value) <= 64 or _UID_CHARS.fullmatch(value) is None:
        raise ValueError(f"{name} is not a valid UID: {value!r}")
    return value


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def mapped(path: Path) -> Iterator[BinaryIO]:
    """The file ``path`` as a read-only memory map: a file object whose reads, seeks and tells
    make no system call. pydicom tells often (about 40 times for a header) and a buffered
    file's ``tell`` is an ``lseek`` each, which releases the GIL that a busy listener's other
    associations are waiting for. An empty file (which cannot be mapped) is an empty stream."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            yield io.BytesIO()
            return
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
            yield cast(BinaryIO, view)


def copy_durably(src: Path, dst: Path) -> tuple[int, str]:
    """Stream ``src`` into the new file ``dst`` in 1 MiB chunks and fsync it.

    Returns the size and SHA-256 hex digest of what was written. Memory use stays at one chunk
    whatever the file size.
    """
    digest = hashlib.sha256()
    size = 0
    with src.open("rb") as fin, dst.open("xb") as fout:
        while chunk := fin.read(COPY_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return size, digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file ``path``."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def same_bytes(a: Path, b: Path) -> bool:
    """Whether files ``a`` and ``b`` hold the same bytes."""
    return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)


def move_durably(src: Path, dst: Path) -> tuple[int, str]:
    """Give the file ``src`` the new name ``dst`` (which must not exist), fsync it, and return its
    size and ``""``: the received file is kept instead of written a second time, and not read
    back to hash it (:attr:`~dicomnode.records.StoredInstance.sha256`).

    ``src`` and ``dst`` should be on one file system; where they are not (``EXDEV``), ``src`` is
    copied with :func:`copy_durably` (which hashes what it copies) and left in place.
    """
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return copy_durably(src, dst)
    src.unlink(missing_ok=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size, ""
    finally:
        os.close(fd)


def _canonical(value: object) -> object:
    """A comparable form of an element value, independent of how it was encoded."""
    if isinstance(value, Dataset):
        return tuple((int(e.tag), _canonical(e.value)) for e in value)
    if isinstance(value, DicomSequence | MultiValue | list):
        return tuple(_canonical(item) for item in value)
    if isinstance(value, bytes | int | float):
        return value
    return str(value)


def same_content(first: Path, second: Path) -> bool:
    """True if two DICOM files hold the same dataset, whatever their encoding.

    A sender may re-encode an instance it sends again (another transfer syntax, implicit or
    explicit VR, OB or OW for 8-bit pixel data), so equal content can come as different bytes.
    The File Meta is ignored; values are compared element by element (sequences recursively),
    so re-compressed pixel data counts as different. Both datasets are read whole, so this is
    called only when one SOP Instance UID comes again with different bytes. A file that cannot
    be parsed is never the same as anything.
    """
    try:
        a, b = pydicom.dcmread(first), pydicom.dcmread(second)
        return _canonical(a) == _canonical(b)
    except Exception:  # unparseable content (a listener's header check passed it): not equal
        return False


@dataclass(frozen=True)
class StateLayout:
    """Where things live in the state directory."""

    root: Path

    @property
    def db_path(self) -> Path:
        return self.root / "state.sqlite"

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def lock_path(self) -> Path:
        """The file :class:`StoreLock` locks."""
        return self.root / "store.lock"

    @property
    def associations_lock_path(self) -> Path:
        """The file the receiving processes lock to count their associations together."""
        return self.root / "associations.lock"

    @property
    def spool_dir(self) -> Path:
        """Where the listener's pynetdicom spools incoming data sets while they arrive."""
        return self.root / "spool"

    @property
    def device_uid_path(self) -> Path:
        """The installation's Device Observer UID, made once (see :func:`installation_uid`)."""
        return self.root / "device-uid"

    @property
    def metrics_dir(self) -> Path:
        """Prometheus multi-process files, one folder per role (``dicomnode.metrics``)."""
        return self.root / "metrics"

    @property
    def health_dir(self) -> Path:
        """What each running role reports about itself for readiness (``dicomnode.health``)."""
        return self.root / "health"

    def create(self) -> StateLayout:
        """Create the folders (idempotent; safe to call from any role), private to their owner.

        New folders get mode 0700; a state directory that others can enter or read (e.g. made
        by hand with the default umask) loses those permissions: it holds patient images.
        """
        for folder in (
            self.root,
            self.instances_dir,
            self.results_dir,
            self.tmp_dir,
            self.spool_dir,
        ):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = self.root.stat().st_mode & 0o777
        if mode & 0o007:
            self.root.chmod(mode & ~0o007)
        return self

    def clear_tmp(self) -> None:
        """Delete partial writes a crash left in ``tmp/``.

        Only the listener, which owns ``tmp/``, calls this, at start-up, before it accepts
        associations (another role doing it could delete a write in progress).
        """
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()

    def receiver_spool(self, index: int) -> Path:
        """The spool folder of receiving process ``index`` (0: the listener itself)."""
        return self.spool_dir / str(index)

    def spooled_files(self) -> list[Path]:
        """Every file in the spool folders of all receiving processes."""
        return sorted(p for p in self.spool_dir.rglob("*") if p.is_file())

    def clear_spool(self, index: int | None = None) -> int:
        """Delete the spooled data sets of receiving process ``index``, or of every process
        (``None``); returns how many. Only a receiving process calls this for its own folder
        while none of its associations is open, and the listener for all of them before any
        process receives (nothing can be arriving then).

        Only the receiving processes' folders (``spool/<n>``) are touched: under the systemd
        units the spool is also ``$TMPDIR`` of the worker, whose temporary files sit beside
        them (systemd-tmpfiles ages whatever a crash leaves there)."""
        if index is not None:
            folders = [self.receiver_spool(index)]
        else:
            folders = [p for p in self.spool_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        removed = 0
        for folder in folders:
            for leftover in folder.iterdir() if folder.is_dir() else ():
                if leftover.is_file():
                    leftover.unlink(missing_ok=True)
                    removed += 1
        return removed

    def remove_study_files(self, study_uid: str) -> None:
        """Delete the instances and results of a study (missing folders are fine)."""
        study = check_uid(study_uid, "StudyInstanceUID")
        for folder in (self.instances_dir / study, self.results_dir / study):
            shutil.rmtree(folder, ignore_errors=True)

    def instance_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance is kept: ``instances/<StudyUID>/<SOPInstanceUID>.dcm``."""
        study = check_uid(study_uid, "StudyInstanceUID")
        sop = check_uid(sop_instance_uid, "SOPInstanceUID")
        return self.instances_dir / study / f"{sop}.dcm"

    def open_db(self) -> StateDB:
        """Create the layout and open its state database."""
        self.create()
        return StateDB(self.db_path)


class StoreOutcome(StrEnum):
    """What storing one received instance did."""

    NEW = "new"
    REPLACED = "replaced"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class StoreResult:
    """The stored instance (for a duplicate: the one kept) and what happened."""

    instance: StoredInstance
    outcome: StoreOutcome


@contextmanager
def file_lock(path: Path, operation: int = fcntl.LOCK_EX) -> Iterator[None]:
    """An exclusive (or, with ``fcntl.LOCK_SH``, shared) ``flock`` on a new file description of
    ``path`` (created if missing) for the ``with`` block; the kernel releases it if the process
    dies holding it."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), operation)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class StoreLock:
    """Mutual exclusion for storing, across the threads of a process and the processes sharing
    a state directory (the listener and its receiver children), by ``flock`` (each hold opens
    its own file description, so threads exclude each other as processes do; the kernel
    releases a lock if its process dies).

    - :meth:`instance`: one SOP Instance UID at a time (its check-rename-record step), while
      instances with other UIDs are stored in parallel: :data:`STRIPES` lock files per kind,
      chosen by the UID's hash, each held exclusively, under a shared hold of ``path``;
    - :meth:`folder`: one study folder at a time (its creation, made durable before any
      instance in it is answered), taken only inside :meth:`instance`;
    - :meth:`everything`: ``path`` held exclusively, for retention's removals, which must not
      meet a store in progress.

    The locks are always taken in this order (``path``, instance, folder), so no two holders
    can wait for each other.
    """

    STRIPES = 64

    def __init__(self, path: Path) -> None:
        self.path = path

    def _stripe(self, kind: str, key: str) -> Path:
        index = zlib.crc32(key.encode()) % self.STRIPES
        return self.path.with_name(f"{self.path.stem}-{kind}{index:02d}{self.path.suffix}")

    @contextmanager
    def instance(self, sop_instance_uid: str) -> Iterator[None]:
        stripe = self._stripe("i", sop_instance_uid)
        with file_lock(self.path, fcntl.LOCK_SH), file_lock(stripe):
            yield

    @contextmanager
    def folder(self, study_instance_uid: str) -> Iterator[None]:
        with file_lock(self._stripe("s", study_instance_uid)):
            yield

    @contextmanager
    def everything(self) -> Iterator[None]:
        with file_lock(self.path):
            yield


class InstanceStore:
    """Writes received instances durably and records them, one row per SOP Instance UID.

    Same SOP Instance UID again: identical bytes (:func:`same_bytes`), or the same dataset in
    another encoding (:func:`same_content`, e.g. re-sent in another transfer syntax), are a
    duplicate and change nothing (the first copy is kept); different content replaces the
    stored file and row and makes the study run again (a corrected re-send). The
    check-rename-record step runs under a lock (:class:`StoreLock`, across threads and
    processes) so two associations sending the same instance at once cannot leave a row that
    disagrees with its file; instances with other UIDs are stored in parallel (their fsyncs
    overlap, as with one process per association).
    """

    def __init__(self, layout: StateLayout, db: StateDB) -> None:
        self.layout = layout
        self.db = db
        self._lock = StoreLock(layout.lock_path)

    def store(
        self,
        received: Path,
        header: InstanceHeader,
        calling_ae: str,
        now: float | None = None,
        *,
        move: bool = False,
    ) -> StoreResult:
        """Store the DICOM file ``received`` (File Meta + dataset as received) durably.

        With ``move`` the file itself is taken (the listener's spool file, which pynetdicom would
        delete next): renamed into place instead of copied, so each instance is written once,
        and not hashed (its ``sha256`` is then ``""``).
        Raises OSError (disk full, permissions) or sqlite3.Error; nothing is recorded then.
        """
        final = self.layout.instance_path(header.study_instance_uid, header.sop_instance_uid)
        partial = self.layout.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            keep = move_durably if move else copy_durably
            size, sha256 = keep(received, partial)
            instance = StoredInstance(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_instance_uid=header.study_instance_uid,
                series_instance_uid=header.series_instance_uid,
                transfer_syntax_uid=header.transfer_syntax_uid,
                path=final,
                size=size,
                sha256=sha256,
                calling_ae=calling_ae,
            )
            with self._lock.instance(header.sop_instance_uid):
                existing = self.db.instance(header.sop_instance_uid)
                if (
                    existing is not None
                    and existing.path.exists()
                    and (same_bytes(existing.path, partial) or same_content(existing.path, partial))
                ):
                    return StoreResult(existing, StoreOutcome.DUPLICATE)
                self._publish(partial, final, header.study_instance_uid)
                self.db.record_instance(instance, time.time() if now is None else now)
        finally:
            partial.unlink(missing_ok=True)
        outcome = StoreOutcome.NEW if existing is None else StoreOutcome.REPLACED
        return StoreResult(instance, outcome)

    def forget_study(self, study_uid: str, cutoff: float) -> bool:
        """Remove a finished study idle since ``cutoff``: its rows, then its instance and result
        folders. Runs under the store's lock, so an instance of the study arriving meanwhile is
        either recorded first (and the study is no longer idle) or stored after the removal."""
        with self._lock.everything():
            if not self.db.forget_study(study_uid, cutoff):
                return False
            self.layout.remove_study_files(study_uid)
        return True

    def sweep_orphans(self, cutoff: float) -> int:
        """Remove study folders no row refers to, untouched since ``cutoff`` (left by a crash
        between :meth:`forget_study`'s commit and its file removal); returns how many."""
        removed = 0
        with self._lock.everything():
            known = self.db.study_uids()
            for folder in (self.layout.instances_dir, self.layout.results_dir):
                for study in folder.iterdir():
                    if study.name not in known and study.stat().st_mtime < cutoff:
                        shutil.rmtree(study, ignore_errors=True)
                        removed += 1
        return removed

    def _publish(self, partial: Path, final: Path, study_uid: str) -> None:
        """Rename ``partial`` to ``final`` and fsync the folders whose entries changed. The
        study folder is made (and made durable) under its own lock: an instance of the same
        study stored at the same time waits for that, so it is not answered while the
        folder's entry could still be lost."""
        with self._lock.folder(study_uid):
            if not final.parent.is_dir():
                final.parent.mkdir()
                fsync_dir(final.parent.parent)
        os.replace(partial, final)
        fsync_dir(final.parent)


def installation_uid(layout: StateLayout, uid_root: str) -> str:
    """This installation's Device Observer UID: read from the state directory, or made once
    (random, under ``uid_root``) and kept there, so that it is the same for every role and
    restart of one installation and different between installations. Two roles starting at
    once agree: the file is created exclusively and the loser reads the winner's."""
    path = layout.device_uid_path
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    uid = str(generate_uid(prefix=uid_root))
    tmp = path.with_name(f".device-uid-{os.getpid()}")
    tmp.write_text(uid + "\n", encoding="ascii")
    try:
        os.link(tmp, path)  # atomic, fails if another process made it first
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(layout.root)
    return path.read_text(encoding="ascii").strip()
