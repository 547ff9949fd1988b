"""The local PACS edge: C-STORE SCU of a whole study over reused associations, and Storage Commitment requests.

Contract (PS3.4 Annex B and J, PS3.7 9.1.1 and 10.1.4)
- A study goes over ``associations_per_study`` associations at once (default 2; 1 for a PACS that takes
  one association per calling AE title: an extra one it refuses is simply not used), each reused for its
  share of the study. Each (SOP class, transfer syntax) pair of the study is proposed in its own
  presentation context, so every instance goes in its own syntax, byte for byte from its data set on (no
  re-encoding). Per SOP class a fallback context proposes Explicit and Implicit VR Little Endian: used only
  when the PACS refuses the original syntax, and then the data set is converted (inflating a deflated one,
  or re-encoding an uncompressed one with pydicom); the outcome's text says so. Encapsulated (compressed)
  pixel data cannot be decoded here (no codecs installed) and such an instance is refused permanently with
  that reason.
- Failures become :mod:`gateway.importing` outcomes: no association (connection refused, timeout,
  A-ASSOCIATE-RJ transient, A-ABORT) -> ``PacsUnavailable``; A-ASSOCIATE-RJ permanent -> ``PacsRefused``;
  a presentation context the PACS rejects -> a permanent outcome naming the reason; each C-STORE response
  -> :func:`classify_store_status` with the status and the PACS's Error Comment (0000,0902).
- ``request_commitment`` sends N-ACTION-RQ (action type 1) on the Storage Commitment Push Model SOP class
  with the Transaction UID and the Referenced SOP Sequence; the PACS answers later with N-EVENT-REPORT on a
  new association to our SCP (``adapters.dicom_scp``).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from adapters.dicom_files import RejectedFile, dataset_offset
from adapters.dicom_tls import client_context
from adapters.dicom_ul import (
    CONTEXT_RESULTS,
    UI,
    US,
    Association,
    AssociationAborted,
    AssociationRejected,
    FileSlice,
    encode_command,
)
from gateway.importing import (
    PacsOutcome,
    PacsRefused,
    PacsUnavailable,
    Verdict,
    classify_store_status,
)
from gateway.manifest import BundleFile, Manifest
from gateway.model import InstanceRecord
from gateway.settings import PacsSettings

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
VERIFICATION = "1.2.840.10008.1.1"
FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, N_ACTION_RQ = 0x0001, 0x8001, 0x0030, 0x0130


class PacsClient:
    """``gateway.importing.PacsPort`` over ``adapters.dicom_ul``; files are read from ``spool_root``."""

    def __init__(self, settings: PacsSettings, spool_root: Path) -> None:
        self.settings = settings
        self.spool_root = spool_root
        self.tls = (client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
                    if settings.tls else None)

    def _associate(self, proposals: list[tuple[str, tuple[str, ...]]], roles: dict[str, tuple[bool, bool]] | None = None) -> Association:
        s = self.settings
        try:
            return Association.open(s.host, s.port, s.calling_ae_title, s.ae_title, proposals, s.timeout_s, roles=roles, tls=self.tls)
        except AssociationRejected as exc:
            hint = self._hint() if (exc.source, exc.reason) in ((1, 3), (1, 7)) else ""
            if exc.permanent:
                raise PacsRefused(f"{s.address}: {exc}{hint}") from exc
            raise PacsUnavailable(f"{s.address}: {exc}{hint}") from exc
        except (OSError, AssociationAborted) as exc:
            hint = self._hint() if "aborted the association request" in str(exc) else ""
            raise PacsUnavailable(f"no association with {s.address}: {_describe(exc)}{hint}") from exc

    def _hint(self) -> str:
        """What a PACS that refuses or aborts the association request most often means: it does not know us."""
        s = self.settings
        return (f" (does the PACS know this gateway? It calls itself {s.calling_ae_title!r}; the PACS must list that AE "
                f"title with this host's address, e.g. Orthanc's DicomModalities, and be called {s.ae_title!r})")

    def store(self, instances: Iterable[InstanceRecord], on_result: Callable[[InstanceRecord, PacsOutcome], None],
              pairs: Iterable[tuple[str, str]] | None = None,
              transform: Callable[[InstanceRecord], bytes] | None = None) -> None:
        """C-STORE ``instances`` over up to ``associations_per_study`` associations at once, each reused for its
        share (a PACS stores in parallel what it would otherwise fsync one by one). ``pairs`` (SOP class,
        transfer syntax) announces what will come when ``instances`` is a stream still being produced (the
        early import). ``on_result`` is called once per answered instance, never from two threads at once.
        An extra association the PACS refuses is no error (the others carry the study); only when none could
        be opened, or every one was lost, does this raise."""
        if pairs is None:
            instances = list(instances)
            pairs = [(i.sop_class_uid, i.transfer_syntax_uid) for i in instances]
        pairs = sorted(set(pairs))
        classes = sorted({c for c, _ in pairs})
        proposals = [(c, (ts,)) for c, ts in pairs] + [(c, FALLBACK_SYNTAXES) for c in classes]
        if len(proposals) > 128:
            raise PacsUnavailable(f"study needs {len(proposals)} presentation contexts; PS3.8 allows 128 per association")
        count = max(1, self.settings.associations_per_study)
        if isinstance(instances, list):
            count = min(count, max(1, len(instances)))
        first = self._associate(proposals)  # the extra ones only once this one is up: a PACS with a limit may
        if count == 1:                      # refuse two requests that arrive together
            self._store_over(first, iter(instances), on_result, transform)
            return
        shared = _SharedIterator(iter(instances))
        lock = threading.Lock()

        def locked_result(instance: InstanceRecord, outcome: PacsOutcome) -> None:
            with lock:
                on_result(instance, outcome)

        errors: list[BaseException] = []
        finished: list[int] = []

        def work(index: int) -> None:
            try:
                assoc = first if index == 0 else self._associate(proposals)
                self._store_over(assoc, shared, locked_result, transform)
                finished.append(index)
            except (PacsUnavailable, PacsRefused) as exc:
                errors.append(exc)
                if index > 0:
                    log.info("extra association %d with %s not used: %s", index + 1, self.settings.address, exc)

        workers = [threading.Thread(target=work, args=(n,), name=f"pacs-store-{n + 1}", daemon=True) for n in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if not finished:
            raise errors[0]

    def _store_over(self, assoc: Association, instances: Iterator[InstanceRecord],
                    on_result: Callable[[InstanceRecord, PacsOutcome], None],
                    transform: Callable[[InstanceRecord], bytes] | None = None) -> None:
        """C-STORE what ``instances`` yields over ``assoc``, then release it (abort it if it failed)."""
        message_id = 0
        try:
            for instance in instances:
                try:
                    context_id, data, note = self._prepare(assoc, instance, transform)
                except (OSError, RejectedFile) as exc:  # the file went away or is unreadable: this one only
                    on_result(instance, PacsOutcome(Verdict.TRANSIENT, None, f"spool file not readable: {exc}"))
                    continue
                except ValueError as exc:  # the coercion cannot be applied to this data set
                    on_result(instance, PacsOutcome(Verdict.PERMANENT, None, f"could not coerce it: {exc}"))
                    continue
                if context_id is None:
                    on_result(instance, PacsOutcome(Verdict.PERMANENT, None, note))
                    continue
                message_id = (message_id % 0xFFFF) + 1
                command = encode_command([
                    (0x00000002, UI, instance.sop_class_uid), (0x00000100, US, C_STORE_RQ), (0x00000110, US, message_id),
                    (0x00000700, US, 0), (0x00000800, US, 0x0000), (0x00001000, UI, instance.sop_instance_uid),
                ])
                try:
                    assoc.send_message(context_id, command, data)
                    _ctx, response, _ds = assoc.receive_message()
                finally:
                    if isinstance(data, FileSlice):
                        os.close(data.fd)
                status = response.us(0x00000900)
                comment = response.text(0x00000902)
                detail = f"0x{status:04X}" + (f" {comment}" if comment else "") + (f" ({note})" if note else "")
                on_result(instance, PacsOutcome(classify_store_status(status), status, detail))
        except (OSError, AssociationAborted) as exc:
            assoc.abort()
            raise PacsUnavailable(f"association with {self.settings.address} lost: {_describe(exc)}") from exc
        assoc.release()

    def _prepare(self, assoc: Association, instance: InstanceRecord,
                 transform: Callable[[InstanceRecord], bytes] | None = None) -> tuple[int | None, bytes | FileSlice | None, str]:
        """(context id, data set to send, note) or (None, None, why not). ``transform``: the data set as coerced
        (``adapters.dicom_coerce``), sent in its own transfer syntax only."""
        path = self.spool_root / instance.spool_path
        original = assoc.context_for(instance.sop_class_uid, instance.transfer_syntax_uid)
        if transform is not None:
            if original is None:
                return None, None, (f"PACS refused {instance.transfer_syntax_uid} for {instance.sop_class_uid}: a "
                                    f"coerced instance goes in its own transfer syntax only")
            return original, transform(instance), ""
        if original is not None:
            fd = os.open(path, os.O_RDONLY)
            try:
                with open(fd, "rb", closefd=False) as fh:
                    offset = dataset_offset(fh, os.fstat(fd).st_size)
            except (OSError, RejectedFile):
                os.close(fd)
                raise
            return original, FileSlice(fd, offset, os.fstat(fd).st_size - offset), ""
        refused = next(
            (c for c in assoc.contexts.values()
             if c.abstract_syntax == instance.sop_class_uid and c.proposed == (instance.transfer_syntax_uid,)),
            None,
        )
        reason = CONTEXT_RESULTS.get(refused.result, str(refused.result)) if refused else "not proposed"
        for target in FALLBACK_SYNTAXES:
            context_id = assoc.context_for(instance.sop_class_uid, target)
            if context_id is None:
                continue
            try:
                data = convert_dataset(path, instance.transfer_syntax_uid, target)
            except CannotConvert as exc:
                return None, None, f"PACS refused {instance.transfer_syntax_uid} for {instance.sop_class_uid} ({reason}) and {exc}"
            note = f"converted {instance.transfer_syntax_uid} -> {target}: PACS refused the original syntax ({reason})"
            return context_id, data, note
        return None, None, f"PACS refused SOP class {instance.sop_class_uid} (presentation context: {reason})"

    def request_commitment(self, transaction_uid: str, instances: list[InstanceRecord]) -> None:
        ds = Dataset()
        ds.TransactionUID = transaction_uid
        refs = []
        for instance in instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID = instance.sop_class_uid
            ref.ReferencedSOPInstanceUID = instance.sop_instance_uid
            refs.append(ref)
        ds.ReferencedSOPSequence = refs
        assoc = self._associate([(STORAGE_COMMITMENT_PUSH, (ImplicitVRLittleEndian,))])
        try:
            context_id = assoc.context_for(STORAGE_COMMITMENT_PUSH, ImplicitVRLittleEndian)
            if context_id is None:
                raise PacsUnavailable(f"{self.settings.address} does not offer Storage Commitment Push Model")
            command = encode_command([
                (0x00000003, UI, STORAGE_COMMITMENT_PUSH), (0x00000100, US, N_ACTION_RQ), (0x00000110, US, 1),
                (0x00000800, US, 0x0000), (0x00001001, UI, STORAGE_COMMITMENT_INSTANCE), (0x00001008, US, 1),
            ])
            assoc.send_message(context_id, command, encode_dataset(ds, ImplicitVRLittleEndian))
            _ctx, response, _ds = assoc.receive_message()
        except (OSError, AssociationAborted) as exc:
            assoc.abort()
            raise PacsUnavailable(f"storage commitment request to {self.settings.address} failed: {_describe(exc)}") from exc
        assoc.release()
        status = response.us(0x00000900)
        if status != 0x0000:
            raise PacsUnavailable(f"N-ACTION refused by {self.settings.address}: status 0x{status:04X} {response.text(0x00000902)}".rstrip())

    def echo(self) -> str:
        """C-ECHO the PACS: 'Success' or raises PacsUnavailable / PacsRefused."""
        assoc = self._associate([(VERIFICATION, (ImplicitVRLittleEndian,))])
        try:
            context_id = assoc.context_for(VERIFICATION, ImplicitVRLittleEndian)
            assert context_id is not None
            assoc.send_message(context_id, encode_command([
                (0x00000002, UI, VERIFICATION), (0x00000100, US, C_ECHO_RQ), (0x00000110, US, 1), (0x00000800, US, 0x0101),
            ]))
            _ctx, response, _ds = assoc.receive_message()
        except (OSError, AssociationAborted) as exc:
            assoc.abort()
            raise PacsUnavailable(f"C-ECHO to {self.settings.address} failed: {_describe(exc)}") from exc
        assoc.release()
        return "Success" if response.us(0x00000900) == 0 else f"status 0x{response.us(0x00000900):04X}"


class StreamingImport:
    """The early import: C-STOREs the files of a bundle while the rest of it is still arriving, over one
    association, so that the PACS works while the network does. Outcomes are kept by SOP Instance UID for
    the import service, which then sends only what is not stored yet. Any failure just stops it (logged):
    the regular import does the rest."""

    def __init__(self, client: PacsClient, manifest: Manifest) -> None:
        self.client = client
        self.pairs = [(f.sop_class_uid, f.transfer_syntax_uid) for f in manifest.files]
        self.outcomes: dict[str, PacsOutcome] = {}
        self._queue: queue.Queue[InstanceRecord | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="early-import", daemon=True)
        self._thread.start()

    def feed(self, entry: BundleFile, path: Path) -> None:
        self._queue.put(InstanceRecord(
            entry.sop_instance_uid, entry.sop_class_uid, entry.transfer_syntax_uid, "", None, "", "", None, entry.size,
            entry.sha256, str(path), False, "early-import", datetime.now(UTC).replace(tzinfo=None),
        ))

    def _records(self) -> Iterator[InstanceRecord]:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            yield item

    def _run(self) -> None:
        try:
            self.client.store(self._records(), lambda i, o: self.outcomes.__setitem__(i.sop_instance_uid, o), self.pairs)
        except (PacsUnavailable, PacsRefused, OSError) as exc:
            log.info("early import stopped (the regular import will do the rest): %s", exc)

    def finish(self, timeout_s: float) -> dict[str, PacsOutcome]:
        """Wait for what was fed (at most ``timeout_s``); stop feeding after that. Returns the outcomes."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._stop.set()
            self._queue.put(None)
        return dict(self.outcomes)


class _SharedIterator:
    """One iterator drawn from by several store threads: each ``next`` under a lock."""

    def __init__(self, inner: Iterator[InstanceRecord]) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def __iter__(self) -> _SharedIterator:
        return self

    def __next__(self) -> InstanceRecord:
        with self._lock:
            return next(self._inner)


class CannotConvert(ValueError):
    pass


def convert_dataset(path: Path, source_syntax: str, target_syntax: str) -> bytes:
    """The data set of the Part-10 file at ``path`` encoded in ``target_syntax`` (uncompressed syntaxes only)."""
    if source_syntax not in UNCOMPRESSED:
        raise CannotConvert(f"the gateway cannot decompress {source_syntax} (no codec installed)")
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        offset = dataset_offset(fh, size)
        fh.seek(offset)
        body = fh.read()
    if source_syntax == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
        if target_syntax == ExplicitVRLittleEndian:
            return body
        source_syntax = ExplicitVRLittleEndian
    return encode_dataset(_read_raw(body, source_syntax), target_syntax)


def _read_raw(body: bytes, syntax: str) -> Dataset:
    from pydicom.filereader import read_dataset

    return read_dataset(io.BytesIO(body), is_implicit_VR=syntax == ImplicitVRLittleEndian, is_little_endian=syntax != ExplicitVRBigEndian)


def encode_dataset(ds: Dataset, syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__
