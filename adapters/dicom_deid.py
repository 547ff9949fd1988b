"""De-identification per destination (the sending gateway; issue 17 §4): PS3.15 Annex E, Basic Application Level
Confidentiality Profile, before a study leaves for a peer whose routing rule says ``deidentify = "basic"``.

The attribute actions come from a kept library, ``dicom-anonymizer`` (its tables are Table E.1-1 of the standard,
D / Z / X / U and their combinations; private attributes removed), not from a table of ours. On top of it:

- U (UIDs): replaced by ``2.25.<HMAC-SHA256 of the UID>`` with this gateway's secret (``deid.key`` beside its
  identity): the same everywhere, so a study's series share their new Study Instance UID and the studies of one
  patient stay linked, across restarts; the secret, and the mapping (``deid-map.csv`` beside the files, and the
  audit), stay here. Patient ID and Name become ``ANON-<HMAC>`` / ``ANON^<HMAC>`` likewise.
- Options (PS3.15 E.3): ``retain_longitudinal_dates`` (dates and times kept), ``retain_device_identity``
  (station, serial numbers), ``clean_descriptors`` (descriptions kept: the rule's owner vouches they are clean).
- Patient Identity Removed (0012,0062) "YES", De-identification Method and its Code Sequence (113100 and the
  options' codes, DCM).
- Pixel data is never decoded or changed. An instance with Burned In Annotation "YES", or a Secondary Capture
  without the attribute (text is often burned into them), is not sent unless the rule says ``allow_burned_in``:
  :class:`BurnedIn` is raised and the unit is held with the reason.

The de-identified files are written under ``<spool>/outbox/<unit>/``; the spool keeps the originals.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import hmac
import os
import secrets
from pathlib import Path

import pydicom
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from gateway.dispatch import Withheld
from gateway.manifest import BundleFile, Manifest

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES = {"retain_longitudinal_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
                "retain_device_identity": ("113109", "Retain Device Identity Option"),
                "clean_descriptors": ("113105", "Clean Descriptors Option")}
DEVICE_KEYWORDS = ("StationName", "DeviceSerialNumber", "DeviceUID", "DetectorID", "GantryID", "PlateID",
                   "GeneratorID", "CassetteID", "DeviceDescription", "PerformedStationAETitle", "PerformedStationName")
DESCRIPTOR_KEYWORDS = ("StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments",
                       "PerformedProcedureStepDescription", "RequestedProcedureDescription", "AcquisitionComments")


class BurnedIn(Withheld):
    """An instance that may carry identifying text in its pixels: not sent de-identified."""


def secret(path: Path) -> bytes:
    """This gateway's de-identification secret (made on first use, mode 600; never sent)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def _digest(key: bytes, kind: str, value: str) -> int:
    return int.from_bytes(hmac.new(key, f"{kind}\0{value}".encode(), hashlib.sha256).digest()[:16], "big")


def new_uid(key: bytes, uid: str) -> str:
    return f"2.25.{_digest(key, 'uid', uid)}"


def deidentify_bundle(manifest: Manifest, paths: list[Path], out_dir: Path, key: bytes, options: tuple[str, ...],
                      allow_burned_in: bool, gateway_name: str) -> tuple[Manifest, list[Path], dict[str, str]]:
    """De-identified copies of the bundle's files, their manifest and the UID mapping (original -> new)."""
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset

    out_dir.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}
    files, out_paths = [], []
    for entry, path in zip(manifest.files, paths, strict=True):
        ds = pydicom.dcmread(path)
        burned = str(ds.get("BurnedInAnnotation", "") or "").upper()
        if not allow_burned_in and (burned == "YES" or (not burned and str(ds.SOPClassUID).startswith(SECONDARY_CAPTURE_PREFIX))):
            raise BurnedIn(f"instance {entry.sop_instance_uid} may show identifying text in its pixels (Burned In "
                           f"Annotation {burned or 'absent, Secondary Capture'}): not sent de-identified; the rule may "
                           f"allow it with allow_burned_in = true")
        kept = {kw: copy.deepcopy(ds.data_element(kw)) for kw in _kept_keywords(ds, options) if kw in ds}  # changed in place
        patient = str(ds.get("PatientID", "") or "") + "\0" + str(ds.get("PatientName", "") or "")
        anonymize_dataset(ds, extra_anonymization_rules=_uid_rules(ds, key, mapping), delete_private_tags=True)
        for kw, element in kept.items():  # the options' attributes, as they were
            ds[element.tag] = element
        pseudonym = _digest(key, "patient", patient)  # the same patient keeps one pseudonym, study after study
        ds.PatientID = f"ANON-{pseudonym:032x}"
        ds.PatientName = f"ANON^{pseudonym:032x}"[:64]
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = f"{gateway_name}: PS3.15 Annex E Basic Profile" + "".join(f", {o}" for o in options)
        codes = []
        for value, meaning in [PROFILE_CODE, *(OPTION_CODES[o] for o in options)]:
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
            codes.append(code)
        ds.DeidentificationMethodCodeSequence = codes
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(out, enforce_file_format=True)
        data = out.read_bytes()
        files.append(BundleFile(str(ds.SOPInstanceUID), entry.sop_class_uid, entry.transfer_syntax_uid, len(data),
                                hashlib.sha256(data).hexdigest()))
        out_paths.append(out)
    with (out_dir / "deid-map.csv").open("w", newline="") as fh:  # kept here, never sent
        csv.writer(fh).writerows(sorted(mapping.items()))
    study = mapping.get(manifest.study_instance_uid, new_uid(key, manifest.study_instance_uid))
    return Manifest(study, manifest.unit_seq, manifest.chunk_bytes, tuple(files)), out_paths, mapping


def _kept_keywords(ds: Dataset, options: tuple[str, ...]) -> list[str]:
    keep: list[str] = []
    if "retain_longitudinal_dates" in options:
        keep += [keyword_for_tag(e.tag) for e in ds if e.VR in ("DA", "DT", "TM") and keyword_for_tag(e.tag)]
    if "retain_device_identity" in options:
        keep += list(DEVICE_KEYWORDS)
    if "clean_descriptors" in options:
        keep += list(DESCRIPTOR_KEYWORDS)
    return keep


def _uid_rules(ds: Dataset, key: bytes, mapping: dict[str, str]) -> dict:
    """Every UI attribute the data set holds (top level and in sequences) mapped with the secret; the transfer
    and SOP class UIDs, which name no one, stay."""
    keep = {"SOPClassUID", "ReferencedSOPClassUID", "TransferSyntaxUID", "MediaStorageSOPClassUID",
            "ImplementationClassUID", "CodingSchemeUID", "ContextUID", "MappingResource"}
    def replace(dataset: Dataset, tag: object) -> None:
        element = dataset.get(tag)
        if element is None or element.VR != "UI" or keyword_for_tag(element.tag) in keep or not element.value:
            return
        values = element.value if isinstance(element.value, list | pydicom.multival.MultiValue) else [element.value]
        replaced = []
        for value in values:
            text = str(value)
            mapping.setdefault(text, new_uid(key, text))
            replaced.append(mapping[text])
        element.value = replaced if len(replaced) > 1 else replaced[0]

    tags = {element.tag for element in ds.iterall() if element.VR == "UI"}
    return {(tag.group, tag.element): replace for tag in tags}  # the library takes (group, element)
